"""The daemon's side of a supervisor's mailbox (RUN/sandboxes/ID/execs/EXEC/): what it reads
there once an exec, or the whole supervisor, has ended. The layout is daemon/protocol.py's.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import threading
import time
from collections import deque
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from daemon.protocol import MAIN_EXEC, STATUS_FILE, ExitStatus, exec_dir


def finished_in_mailbox(run_dir: Path) -> list[str]:
    """Execs (not the main cmd) whose status.json is in the mailbox, not yet stored."""
    execs = run_dir / "execs"
    if not execs.is_dir():
        return []
    return [p.name for p in execs.iterdir() if p.name != MAIN_EXEC and (p / STATUS_FILE).exists()]


def read_status(run_dir: Path, exec_id: str) -> ExitStatus | None:
    try:
        data = (Path(exec_dir(str(run_dir), exec_id)) / STATUS_FILE).read_bytes()
    except OSError:
        return None
    return ExitStatus.from_json(data)


def read_text(path: Path) -> str:
    try:
        return path.read_text(errors="replace").strip()
    except OSError:
        return ""


def read_output(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError:
        return b""


def empty_slot(path: Path) -> None:
    """Remove a stored exec's mailbox slot: its few files, then itself. Unlinks by name, as
    rmtree's careful walk costs ten times more on the exec's hot path."""
    slot = os.fspath(path)  # strings: a Path per file costs more than its unlink on tmpfs
    try:
        for name in os.listdir(slot):
            os.unlink(os.path.join(slot, name))
        os.rmdir(slot)
    except FileNotFoundError:
        pass
    except OSError:  # not what a supervisor leaves: the careful way
        with contextlib.suppress(OSError):
            shutil.rmtree(path)


class Sweeper:
    """Empties stored execs' slots on a thread of its own, in the order they were stored:
    a few unlinks that cost the event loop up to milliseconds each on a disk's file system.
    The thread wakes at most every BATCH seconds, so that a burst of execs costs the loop a
    deque append each, not a thread's wake-up each. A slot not emptied yet (the daemon
    stopped first) is harmless: its exec is stored, and the next daemon's collect finds it
    stored already (the first result wins) and empties it.

    Runs in: the daemon; `empty` on the event loop, the removals on the thread it starts."""

    BATCH = 0.02

    def __init__(self) -> None:
        self._slots: deque[Path] = deque()
        self._wake = threading.Event()
        self._stopping = False
        self._thread: threading.Thread | None = None

    def empty(self, path: Path) -> None:
        self._slots.append(path)
        if self._thread is None:
            self._stopping = False
            self._thread = threading.Thread(target=self._run, name="mailbox-sweeper", daemon=True)
            self._thread.start()
        if not self._wake.is_set():  # set: the thread will look at the deque before it waits
            self._wake.set()

    def _run(self) -> None:
        while not self._stopping:
            self._wake.wait()
            time.sleep(self.BATCH)
            self._wake.clear()
            while self._slots:
                empty_slot(self._slots.popleft())

    def stop(self) -> None:
        """Empty what was asked for, then end the thread."""
        if self._thread is not None:
            self._stopping = True
            self._wake.set()
            self._thread.join()
            self._thread = None


def killed_exec_fields() -> dict[str, Any]:
    """An exec that ended with its sandbox, before it could report: killed, no output."""
    return {
        "exit_code": None,
        "signal": "SIGKILL",
        "timed_out": False,
        "stdout": b"",
        "stderr": b"",
        "stdout_truncated": False,
        "stderr_truncated": False,
        "finished_at": datetime.now(UTC),
    }
