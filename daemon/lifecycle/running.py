"""What the daemon holds for a sandbox whose supervisor runs, and how it names and dates
what it records. Shared by the lifecycle (daemon/lifecycle/service.py) and the execs
(daemon/lifecycle/execs.py).
"""

from __future__ import annotations

import asyncio
import secrets
from collections import deque
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from daemon.lifecycle.following import Follower
from daemon.lifecycle.supervisor_link import SupervisorLink
from daemon.network.ports import PublishedPorts
from daemon.store.database import ExecRecord


@dataclass
class LiveSandbox:
    """What the daemon holds for a sandbox whose supervisor runs."""

    id: str
    run_dir: Path
    pidfd: int | None = None
    link: SupervisorLink | None = None
    ports: PublishedPorts | None = None
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    # Its record said `running` when this daemon last moved it there (create, a pool's take,
    # adoption), and its image: what an exec needs to know of it without a store read. A
    # teardown holds `lock`, and the sandbox leaves `live` before releasing it.
    running: bool = False
    image_id: str | None = None
    started: dict[str, asyncio.Future[int | None]] = field(default_factory=dict)
    finished: dict[str, asyncio.Future[ExecRecord | None]] = field(default_factory=dict)
    # Waited-for execs: their pid is stored with their end (one write fewer), kept here till then.
    quiet: set[str] = field(default_factory=set)
    pids: dict[str, int] = field(default_factory=dict)
    followers: dict[str, set[Follower]] = field(default_factory=dict)
    subscribing: dict[str, deque[Follower]] = field(default_factory=dict)

    def end_followers(self, exec_id: str) -> None:
        for follower in self.followers.pop(exec_id, set()):
            follower.end()
        self.subscribing.pop(exec_id, None)

    def release_waiters(self) -> None:
        for started in self.started.values():
            if not started.done():
                started.set_result(None)
        for finished in self.finished.values():
            if not finished.done():
                finished.set_result(None)
        self.started.clear()
        self.finished.clear()
        for exec_id in list(self.followers):
            self.end_followers(exec_id)


def new_id(prefix: str) -> str:
    return f"{prefix}_{secrets.token_hex(8)}"


def utcnow() -> datetime:
    return datetime.now(UTC)
