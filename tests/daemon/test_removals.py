"""Removals (daemon/lifecycle/teardown.py): the background steps 6 and 7 of a teardown, bounded,
queued in order, one sandbox's after its earlier ones, drained with a deadline. The steps are
stand-ins here; tests/integration/test_removal.py runs the real ones."""

from __future__ import annotations

import asyncio
import errno
import fcntl
import logging
import os
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest

from daemon.lifecycle.teardown import REMOVALS_AT_ONCE, Host, Removals, remove


class Steps:
    """Stand-in removals that record when each starts, and end when let go."""

    def __init__(self) -> None:
        self.running = 0
        self.most = 0
        self.started: list[str] = []
        self.gates: dict[str, asyncio.Event] = {}

    def of(self, name: str) -> Callable[[], Awaitable[None]]:
        gate = self.gates[name] = asyncio.Event()

        async def steps() -> None:
            self.running += 1
            self.most = max(self.most, self.running)
            self.started.append(name)
            try:
                await gate.wait()
            finally:
                self.running -= 1

        return steps


async def settle() -> None:
    for _ in range(20):
        await asyncio.sleep(0)


def test_at_most_a_few_at_once_the_rest_queued_in_order() -> None:
    async def main() -> None:
        removals, steps = Removals(), Steps()
        names = [f"sb{i}" for i in range(6)]
        for name in names:
            removals.submit(name, steps.of(name))
        await settle()
        assert len(removals) == 6
        assert steps.started == names[:REMOVALS_AT_ONCE] == ["sb0", "sb1"]
        steps.gates["sb1"].set()
        await settle()
        assert steps.started == ["sb0", "sb1", "sb2"] and len(removals) == 5
        for gate in steps.gates.values():
            gate.set()
        assert await removals.drain(5) == 0
        assert steps.started == names and steps.most == REMOVALS_AT_ONCE
        assert len(removals) == 0

    asyncio.run(main())


def test_a_sandbox_removed_again_waits_for_its_earlier_removal() -> None:
    async def main() -> None:
        removals, steps = Removals(at_once=4), Steps()
        removals.submit("sb", steps.of("first"))
        removals.submit("sb", steps.of("again"))
        await settle()
        assert steps.started == ["first"] and len(removals) == 1
        steps.gates["first"].set()
        await settle()
        assert steps.started == ["first", "again"]
        steps.gates["again"].set()
        assert await removals.drain(5) == 0

    asyncio.run(main())


def test_a_failed_removal_is_logged_and_let_go(caplog: pytest.LogCaptureFixture) -> None:
    async def failing() -> None:
        raise OSError("busy")

    async def main() -> None:
        removals = Removals()
        removals.submit("sb", failing)
        assert await removals.drain(5) == 0 and len(removals) == 0

    with caplog.at_level(logging.ERROR, logger="daemon.lifecycle.teardown"):
        asyncio.run(main())
    assert "sb: its removal failed" in caplog.text


def test_drain_gives_up_at_its_deadline_and_says_how_many_are_left() -> None:
    async def main() -> None:
        removals, steps = Removals(), Steps()
        for name in ("sb0", "sb1", "sb2"):
            removals.submit(name, steps.of(name))
        await settle()
        assert await removals.drain(0.05) == 3
        assert len(removals) == 0 and steps.running == 0

    asyncio.run(main())


def test_the_hold_file_holds_removals_while_another_holds_its_lock(tmp_path: Path) -> None:
    hold = tmp_path / "hold"
    hold.touch()
    fd = os.open(hold, os.O_RDONLY)
    fcntl.flock(fd, fcntl.LOCK_EX)

    async def main() -> None:
        removals, steps = Removals(hold=hold), Steps()
        removals.submit("sb", steps.of("sb"))
        steps.gates["sb"].set()
        await asyncio.sleep(0.2)
        assert steps.started == []
        os.close(fd)  # let go
        assert await removals.drain(5) == 0
        assert steps.started == ["sb"]

    asyncio.run(main())


class Tree:
    """A stand-in cgroup2 tree whose removal fails (a process that would not die) or not."""

    def __init__(self, stuck: bool) -> None:
        self.stuck = stuck

    def remove(self, sandbox_id: str) -> None:
        if self.stuck:
            raise OSError(errno.EBUSY, "Device or resource busy")


class Nothing:
    def remove(self, sandbox_id: str) -> None:
        pass


class Record:
    def __init__(self) -> None:
        self.released = False

    async def release(self) -> None:
        self.released = True


def test_a_range_is_not_released_while_its_cgroup_tree_stays(tmp_path: Path) -> None:
    """Step 7 lets the uid range go only once step 6 emptied the cgroup2 tree: a process
    that outlived the kill must not share the range (and its user namespace) with the
    sandbox given it next. The record keeps its leases for the next start to finish."""

    def removed(stuck: bool) -> bool:
        host = Host(Tree(stuck), Nothing(), None, tmp_path / "run", tmp_path / "state")  # type: ignore[arg-type]
        record = Record()
        asyncio.run(remove(host, "sb1", record))  # type: ignore[arg-type]
        return record.released

    assert not removed(stuck=True)
    assert removed(stuck=False)
