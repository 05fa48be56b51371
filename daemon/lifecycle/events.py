"""What happened to sandboxes, execs and images, as numbered events: their types, and the live
fan-out of each committed event to the streams that follow them.

Runs in: the daemon, on its event loop (a store write made in a worker thread hands its
events over with call_soon_threadsafe).

The store writes an event in the transaction of the change that causes it and hands the
committed events to `EventHub.publish`, in the order of their sequence numbers. Each follower
has a queue of at most `bound` events: a follower that falls that far behind is dropped (its
queue is emptied and ended), so a client that reads slowly never makes the daemon hold an
unbounded backlog.
"""

from __future__ import annotations

import asyncio
import enum
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any


class EventType(enum.StrEnum):
    SANDBOX_CREATED = "sandbox.created"
    SANDBOX_EXITED = "sandbox.exited"
    SANDBOX_FAILED = "sandbox.failed"
    SANDBOX_OOM = "sandbox.oom"
    SANDBOX_EXPIRED = "sandbox.expired"
    SANDBOX_DESTROYED = "sandbox.destroyed"
    EXEC_STARTED = "exec.started"
    EXEC_EXITED = "exec.exited"
    IMAGE_PULLED = "image.pulled"
    IMAGE_IMPORTED = "image.imported"
    IMAGE_REMOVED = "image.removed"


@dataclass(frozen=True)
class Event:
    """One stored event. `data` holds the fields of its type (name, labels, exit, ...)."""

    seq: int
    time: datetime
    type: EventType
    sandbox_id: str | None = None
    exec_id: str | None = None
    image_id: str | None = None
    data: dict[str, Any] = field(default_factory=dict)

    def as_json(self) -> dict[str, Any]:
        """The public shape: the fixed fields, then the type's own."""
        return {
            **self.data,
            "seq": self.seq,
            "time": self.time.isoformat().replace("+00:00", "Z"),
            "type": str(self.type),
            "sandbox_id": self.sandbox_id,
            "exec_id": self.exec_id,
            "image_id": self.image_id,
        }


class Subscription:
    """One follower's queue of live events; None in it ends the stream (closed or dropped)."""

    def __init__(self, hub: EventHub, bound: int) -> None:
        self._hub = hub
        self._queue: asyncio.Queue[Event | None] = asyncio.Queue(maxsize=bound + 1)
        self._bound = bound
        self.dropped = False
        self.ended = False

    def offer(self, event: Event) -> bool:
        """Queue `event`; False (and the stream ends) if the follower is `bound` behind."""
        if self.ended:
            return False
        if self._queue.qsize() >= self._bound:
            self.dropped = True
            self._end()
            return False
        self._queue.put_nowait(event)
        return True

    def _end(self) -> None:
        # What it had not read yet goes: the follower resumes from the store with its last id.
        self.ended = True
        while not self._queue.empty():
            self._queue.get_nowait()
        self._queue.put_nowait(None)

    async def get(self) -> Event | None:
        """The next live event; None once the stream has ended."""
        return await self._queue.get()

    def close(self) -> None:
        self._hub.unsubscribe(self)
        if not self.ended:
            self._end()


class EventHub:
    """The daemon's live followers of events, and listeners (metrics) that see every one."""

    def __init__(self, bound: int) -> None:
        self.bound = bound
        self.followers: set[Subscription] = set()
        self.listeners: list[Callable[[Event], None]] = []
        self.dropped = 0  # followers dropped for being too slow, since the daemon started
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread = 0

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._thread = threading.get_ident()

    def publish(self, events: Sequence[Event]) -> None:
        """Deliver committed `events` on the loop, from any thread. The store calls this
        under its write lock, so calls come in sequence order; both paths below append to the
        loop's one FIFO of callbacks, so they are delivered in that order too."""
        loop = self._loop
        if loop is None or loop.is_closed():
            return
        batch = list(events)
        if threading.get_ident() == self._thread:
            loop.call_soon(self._deliver, batch)
        else:
            loop.call_soon_threadsafe(self._deliver, batch)

    def _deliver(self, events: list[Event]) -> None:
        for event in events:
            for listener in self.listeners:
                listener(event)
            for follower in list(self.followers):
                if not follower.offer(event):
                    self.followers.discard(follower)
                    self.dropped += 1

    def subscribe(self) -> Subscription:
        follower = Subscription(self, self.bound)
        self.followers.add(follower)
        return follower

    def unsubscribe(self, follower: Subscription) -> None:
        self.followers.discard(follower)

    def close(self) -> None:
        """End every stream (the daemon stops)."""
        for follower in list(self.followers):
            follower.close()
        self._loop = None
