"""The daemon's side of a supervisor's mailbox (RUN/sandboxes/ID/execs/EXEC/): what it reads
there once an exec, or the whole supervisor, has ended. The layout is daemon/protocol.py's.
"""

from __future__ import annotations

import contextlib
import os
import shutil
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
    try:
        for name in os.listdir(path):
            os.unlink(path / name)
        os.rmdir(path)
    except FileNotFoundError:
        pass
    except OSError:  # not what a supervisor leaves: the careful way
        with contextlib.suppress(OSError):
            shutil.rmtree(path)


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
