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
    """Remove a stored exec's mailbox slot: its few files, then itself (on the Sweeper's
    thread). Unlinks by name: rmtree's careful walk costs ten times more."""
    slot = os.fspath(path)
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
    The thread looks every BATCH seconds, so that a burst of execs costs the loop a deque
    append each, not a wake-up each; it ends once LINGER seconds pass with nothing to do,
    and the next slot starts another. A slot not emptied yet (the daemon stopped first) is
    harmless: its exec is stored, and the next daemon's collect finds it stored already (the
    first result wins) and empties it.

    Runs in: the daemon; `empty` on the event loop, the removals on the thread it starts."""

    BATCH = 0.02
    LINGER = 1.0

    def __init__(self) -> None:
        self._slots: deque[Path] = deque()
        # Taken to add a slot and by the thread to decide to end: no slot is left behind
        # by a thread that had just found the deque empty.
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._stopping = False

    def empty(self, path: Path) -> None:
        with self._lock:
            self._slots.append(path)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="mailbox-sweeper")
                self._thread.daemon = True
                self._thread.start()

    def _run(self) -> None:
        idle = 0.0
        while True:
            time.sleep(self.BATCH)
            idle = 0.0 if self._slots else idle + self.BATCH
            while self._slots:
                empty_slot(self._slots.popleft())
            with self._lock:
                if not self._slots and (self._stopping or idle >= self.LINGER):
                    self._thread = None
                    return

    def stop(self) -> None:
        """Empty what was asked for, then end the thread."""
        with self._lock:
            thread, self._stopping = self._thread, True
        if thread is not None:
            thread.join()
        self._stopping = False


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
