"""The exec lane (daemon/store/database.py): an exec's two steps written in plain sqlite3 are
the rows and events SQLAlchemy writes and reads, value for value and type for type."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import func, insert, select, update

from daemon.errors import NotFound
from daemon.lifecycle.events import Event, EventType
from daemon.lifecycle.states import ExecState, LifecycleState
from daemon.store.database import ExecRecord, Store

T0 = datetime(2025, 1, 2, 3, 4, 5, 678901, tzinfo=UTC)
T1 = datetime(2025, 1, 2, 3, 4, 7, 1, tzinfo=UTC)
_EXECS = ExecRecord.__table__


@pytest.fixture
def db(tmp_path: Path) -> Path:
    return tmp_path / "sandboxd.db"


@pytest.fixture
def published() -> list[Event]:
    return []


@pytest.fixture
def store(db: Path, published: list[Event]) -> Iterator[Store]:
    store = Store(db, publish=published.extend)
    store.create_sandbox(
        id="sb_1", name="web", hostname="web", spec={"labels": {"team": "ci"}},
        max_live=10, now=T0, expires_at=None,
    )  # fmt: skip
    store.transition("sb_1", LifecycleState.RUNNING, pid=10, started_at=T0)
    yield store
    store.close()


def raw_row(db: Path, exec_id: str) -> dict[str, tuple[str, Any]]:
    """Every column of an exec as SQLite holds it: (its storage class, its value)."""
    columns = [c.name for c in _EXECS.columns if c.name not in ("id", "seq")]
    query = ", ".join(f"typeof({c}), {c}" for c in columns)
    with sqlite3.connect(db) as conn:
        row = conn.execute(f"SELECT {query} FROM execs WHERE id = ?", (exec_id,)).fetchone()
    return {c: (row[2 * i], row[2 * i + 1]) for i, c in enumerate(columns)}


def through_sqlalchemy(store: Store, exec_id: str, **ended: Any) -> None:
    """The same exec written the way the store wrote it before the lane: SQLAlchemy Core."""
    seq = select(func.coalesce(func.max(_EXECS.c.seq), 0) + 1).scalar_subquery()
    with store._writer.begin() as conn:
        conn.execute(
            insert(_EXECS).values(
                id=exec_id, seq=seq, sandbox_id="sb_1", cmd=["sh", "-c", "echo é"],
                state=ExecState.RUNNING, started_at=T0, encoding="base64",
                stdout=b"", stderr=b"",
            )
        )  # fmt: skip
        if ended:
            conn.execute(
                update(_EXECS).where(_EXECS.c.id == exec_id).values(state=ExecState.EXITED, **ended)
            )


ENDED: dict[str, Any] = {
    "exit_code": None,
    "signal": "SIGKILL",
    "timed_out": True,
    "stdout": b"out\x00\xff",
    "stderr": b"",
    "stdout_truncated": True,
    "stderr_truncated": False,
    "finished_at": T1,
    "oom_killed": True,
}


def test_a_new_exec_is_the_row_sqlalchemy_writes(store: Store, db: Path) -> None:
    made = store.insert_exec(
        id="ex_lane", sandbox_id="sb_1", cmd=["sh", "-c", "echo é"], now=T0, encoding="base64"
    )
    through_sqlalchemy(store, "ex_core")
    assert raw_row(db, "ex_lane") == raw_row(db, "ex_core")
    read = store.get_exec("sb_1", "ex_lane")  # read back through SQLAlchemy
    for column in (c.name for c in _EXECS.columns):
        assert getattr(made, column) == getattr(read, column), column
    assert made.started_at.tzinfo is UTC and made.state is ExecState.RUNNING


def test_an_ended_exec_is_the_row_sqlalchemy_writes(store: Store, db: Path) -> None:
    store.insert_exec(
        id="ex_lane", sandbox_id="sb_1", cmd=["sh", "-c", "echo é"], now=T0, encoding="base64"
    )
    ended = store.finish_exec("ex_lane", pid=77, oom_kills=2, **ENDED)
    through_sqlalchemy(store, "ex_core", pid=77, **ENDED)
    assert raw_row(db, "ex_lane") == raw_row(db, "ex_core")
    read = store.get_exec("sb_1", "ex_lane")
    for column in (c.name for c in _EXECS.columns):
        assert getattr(ended, column) == getattr(read, column), column
    assert ended.finished_at == T1 and ended.timed_out is True and ended.pid == 77


def test_the_lane_events_are_stored_and_published_alike(
    store: Store, published: list[Event]
) -> None:
    published.clear()
    store.insert_exec(id="ex_1", sandbox_id="sb_1", cmd=["true"], now=T0)
    store.finish_exec("ex_1", oom_kills=1, **ENDED | {"oom_killed": False})
    stored = [e for e in store.events_after(0) if e.exec_id == "ex_1"]
    assert [e.type for e in stored] == [
        EventType.EXEC_STARTED,
        EventType.SANDBOX_OOM,
        EventType.EXEC_EXITED,
    ]
    assert published == stored  # the same seq, time and data as read back
    assert stored[0].data == {"name": "web", "labels": {"team": "ci"}, "cmd": ["true"]}
    assert stored[2].data["duration_seconds"] == (T1 - T0).total_seconds()
    assert stored[2].time.tzinfo is not None


def test_the_first_result_wins_and_nothing_is_told_twice(
    store: Store, published: list[Event]
) -> None:
    store.insert_exec(id="ex_1", sandbox_id="sb_1", cmd=["true"], now=T0)
    first = store.finish_exec("ex_1", **ENDED)
    published.clear()
    again = store.finish_exec("ex_1", **ENDED | {"exit_code": 3, "signal": None})
    assert again.exit_code is None and again.signal == "SIGKILL" == first.signal
    assert published == []
    with pytest.raises(NotFound):
        store.finish_exec("ex_nope", **ENDED)


def test_an_exec_of_no_sandbox_changes_nothing(store: Store, db: Path) -> None:
    with pytest.raises(NotFound):
        store.insert_exec(id="ex_1", sandbox_id="sb_gone", cmd=["true"], now=T0)
    with sqlite3.connect(db) as conn:
        assert conn.execute("SELECT count(*) FROM execs").fetchone() == (0,)
    store.insert_exec(id="ex_2", sandbox_id="sb_1", cmd=["true"], now=T0)  # not left locked
