"""An exec's end stored from its EXITED message, the mailbox only its output and the fallback;
its slot emptied afterwards off the loop; and a running sandbox found without the store.

A real store on a temporary SQLite file and a real mailbox directory; the supervisor's part
is the message handed to Execs.on_message, as the link hands it."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest

from daemon.errors import NotFound
from daemon.lifecycle.execs import Execs
from daemon.lifecycle.mailbox import Sweeper
from daemon.lifecycle.running import LiveSandbox
from daemon.lifecycle.states import LifecycleState
from daemon.lifecycle.supervisor_link import SupervisorLink
from daemon.protocol import STATUS_FILE, Exited, ExitStatus, exec_dir
from daemon.store.database import Store

T0 = datetime(2025, 1, 2, 3, 4, 5, tzinfo=UTC)
SANDBOX = "sb_0123456789abcdef"


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    store = Store(tmp_path / "sandboxd.db")
    store.create_sandbox(
        id=SANDBOX, name="web", hostname="web", spec={}, max_live=10, now=T0, expires_at=None
    )
    store.transition(SANDBOX, LifecycleState.RUNNING, pid=10, started_at=T0)
    yield store
    store.close()


@pytest.fixture
def live(tmp_path: Path) -> LiveSandbox:
    return LiveSandbox(SANDBOX, tmp_path / "run" / SANDBOX)


@pytest.fixture
def execs(store: Store, live: LiveSandbox) -> Iterator[Execs]:
    execs = Execs(
        lambda: store, {live.id: live}, retention=3600, cgroup=lambda _: Path("/nonexistent")
    )
    yield execs
    execs.sweeper.stop()


def ended_in_mailbox(live: LiveSandbox, exec_id: str, status: ExitStatus | None) -> Path:
    """A slot as the supervisor leaves it: the output, then status.json (if given)."""
    slot = Path(exec_dir(str(live.run_dir), exec_id))
    slot.mkdir(parents=True)
    (slot / "stdout").write_bytes(b"out\n")
    (slot / "stderr").write_bytes(b"err\n")
    if status is not None:
        (slot / STATUS_FILE).write_bytes(status.to_json())
    return slot


def test_the_status_is_the_one_exited_carried_not_the_files(
    store: Store, live: LiveSandbox, execs: Execs
) -> None:
    """The file says 7, the message 3: what is stored is 3, so the file was never read.
    (The supervisors write the same status to both: tests/native/test_protocol.py.)"""
    store.insert_exec(id="ex_1", sandbox_id=SANDBOX, cmd=["true"], now=T0)
    slot = ended_in_mailbox(live, "ex_1", ExitStatus(7, None, finished_at=T0.timestamp()))
    told = ExitStatus(3, None, stdout_truncated=True, finished_at=T0.timestamp() + 1)
    execs.on_message(live, Exited("ex_1", told))
    stored = store.get_exec(SANDBOX, "ex_1")
    assert (stored.exit_code, stored.stdout_truncated) == (3, True)
    assert (stored.stdout, stored.stderr) == (b"out\n", b"err\n")  # the output: the files
    execs.sweeper.stop()  # what it was asked to empty, emptied
    assert not slot.exists()


def test_an_exited_with_no_status_file_is_stored(
    store: Store, live: LiveSandbox, execs: Execs
) -> None:
    store.insert_exec(id="ex_1", sandbox_id=SANDBOX, cmd=["true"], now=T0)
    ended_in_mailbox(live, "ex_1", None)
    execs.on_message(live, Exited("ex_1", ExitStatus(None, "SIGKILL", timed_out=True)))
    stored = store.get_exec(SANDBOX, "ex_1")
    assert (stored.exit_code, stored.signal, stored.timed_out) == (None, "SIGKILL", True)


def test_without_a_message_the_mailbox_tells(store: Store, live: LiveSandbox, execs: Execs) -> None:
    """A HELLO's `finished` (the daemon was away when it ended): status.json is read."""
    store.insert_exec(id="ex_1", sandbox_id=SANDBOX, cmd=["true"], now=T0)
    ended_in_mailbox(live, "ex_1", ExitStatus(7, None))
    execs.collect(live, "ex_1")
    assert store.get_exec(SANDBOX, "ex_1").exit_code == 7


def test_the_waiter_gets_the_stored_record(store: Store, live: LiveSandbox, execs: Execs) -> None:
    async def main() -> None:
        store.insert_exec(id="ex_1", sandbox_id=SANDBOX, cmd=["true"], now=T0)
        ended_in_mailbox(live, "ex_1", None)
        live.finished["ex_1"] = asyncio.get_running_loop().create_future()
        waiter = live.finished["ex_1"]
        execs.on_message(live, Exited("ex_1", ExitStatus(0, None)))
        record = await waiter
        assert record is not None and record.exit_code == 0 and "ex_1" not in live.finished

    asyncio.run(main())


def test_the_sweeper_empties_slots_in_order_and_restarts(tmp_path: Path) -> None:
    sweeper = Sweeper()
    slots = [tmp_path / f"ex_{i}" for i in range(5)]
    for slot in slots:
        slot.mkdir()
        (slot / "stdout").write_bytes(b"x")
        sweeper.empty(slot)
    sweeper.stop()
    assert not any(slot.exists() for slot in slots)
    again = tmp_path / "ex_again"
    again.mkdir()
    sweeper.empty(again)
    sweeper.stop()
    assert not again.exists()


def test_a_running_sandbox_is_found_in_memory(
    tmp_path: Path, store: Store, live: LiveSandbox, execs: Execs
) -> None:
    """Marked running with a link, by its id: no store read (the store has no such sandbox
    by that id). Its lock held (a create or teardown at work), or unmarked: the store decides."""
    link = SupervisorLink(str(tmp_path / "sock"), lambda _: None, _nothing, timeout=1)
    ghost = LiveSandbox("sb_ghost", tmp_path / "ghost", link=link, running=True)
    execs.live[ghost.id] = ghost
    assert execs.running("sb_ghost") is ghost

    async def held() -> None:
        async with ghost.lock:
            with pytest.raises(NotFound):
                execs.running("sb_ghost")

    asyncio.run(held())
    ghost.running = False
    with pytest.raises(NotFound):
        execs.running("sb_ghost")


async def _nothing() -> None:
    return None
