"""daemon/lifecycle/pool.py's bookkeeping, with fills and drains that only count: which requests a
pooled sandbox can serve, refilling to size, trimming, retrying, and a stop that waits for the
fill under way and then drains everything. (tests/integration/test_pool.py runs real ones.)"""

from __future__ import annotations

import asyncio
import itertools

import pytest

import daemon.lifecycle.pool
from daemon.errors import SetupFailed
from daemon.lifecycle.pool import Pool, poolable
from daemon.shapes import SandboxCreate


@pytest.mark.parametrize(
    "body",
    [{}, {"name": "a", "hostname": "h", "labels": {"k": "v"}, "env": {"A": "1"}, "ttl_seconds": 5}],
)
def test_what_a_pooled_sandbox_can_serve(body: dict[str, object]) -> None:
    assert poolable(SandboxCreate.model_validate(body))


@pytest.mark.parametrize(
    "body",
    [
        {"cmd": ["true"]},
        {"namespaces": ["pid", "mnt", "net"]},
        {"rootfs": "/"},
        {"mounts": [{"source": "/usr", "target": "/x"}]},
        {"network": {"mode": "bridge"}},
        {"limits": {"pids": 10}},
    ],
)
def test_what_it_cannot(body: dict[str, object]) -> None:
    assert not poolable(SandboxCreate.model_validate(body))


class Counting:
    def __init__(self, failures: int = 0, delay: float = 0.0) -> None:
        self.ids = (f"sb_{n}" for n in itertools.count())
        self.failures, self.delay = failures, delay
        self.made: list[str] = []
        self.drained: list[str] = []

    async def fill(self) -> str:
        await asyncio.sleep(self.delay)
        if self.failures:
            self.failures -= 1
            raise SetupFailed("no")
        self.made.append(next(self.ids))
        return self.made[-1]

    async def drain(self, sandbox_id: str) -> None:
        self.drained.append(sandbox_id)


async def settle() -> None:
    for _ in range(20):
        await asyncio.sleep(0)


def test_it_fills_refills_after_a_pause_and_drains_on_stop(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(daemon.lifecycle.pool, "_REFILL_PAUSE", 0.5)  # long enough for a loaded CI

    async def scenario() -> None:
        counting = Counting()
        pool = Pool(3, counting.fill, counting.drain)
        pool.start()
        await settle()
        assert list(pool.ready) == ["sb_0", "sb_1", "sb_2"]
        assert pool.next() == "sb_0"
        pool.taken("sb_0")
        await settle()
        assert list(pool.ready) == ["sb_1", "sb_2"]  # not at once: the asker goes first
        for _ in range(100):  # then, after the pause
            await asyncio.sleep(0.02)
            if len(pool.ready) == 3:
                break
        assert list(pool.ready) == ["sb_1", "sb_2", "sb_3"]
        await pool.stop()
        assert sorted(counting.drained) == ["sb_1", "sb_2", "sb_3"] and not pool.ready

    asyncio.run(scenario())


def test_it_trims_what_a_restart_adopted_past_its_size() -> None:
    async def scenario() -> None:
        counting = Counting()
        pool = Pool(1, counting.fill, counting.drain)
        for sandbox_id in ("sb_a", "sb_b", "sb_c"):
            pool.add(sandbox_id)
        pool.start()
        await settle()
        assert list(pool.ready) == ["sb_a"] and counting.made == []
        await pool.stop()

    asyncio.run(scenario())


def test_a_failed_fill_is_tried_again_and_a_stop_does_not_wait_out_the_pause() -> None:
    async def scenario() -> None:
        counting = Counting(failures=1)
        pool = Pool(1, counting.fill, counting.drain)
        pool.start()
        await settle()
        assert not pool.ready  # failed, pausing
        await asyncio.wait_for(pool.stop(), 0.5)

    asyncio.run(scenario())


def test_a_stop_lets_the_fill_under_way_finish_and_drains_it() -> None:
    async def scenario() -> None:
        counting = Counting(delay=0.05)
        pool = Pool(1, counting.fill, counting.drain)
        pool.start()
        await asyncio.sleep(0.01)  # the fill is under way
        await pool.stop()
        assert counting.made == ["sb_0"] and counting.drained == ["sb_0"]

    asyncio.run(scenario())


def test_a_discarded_sandbox_is_destroyed_and_replaced() -> None:
    async def scenario() -> None:
        counting = Counting()
        pool = Pool(2, counting.fill, counting.drain)
        pool.start()
        await settle()
        pool.discard("sb_0")
        for _ in range(100):
            await asyncio.sleep(0.02)
            if len(pool.ready) == 2:
                break
        assert counting.drained == ["sb_0"] and list(pool.ready) == ["sb_1", "sb_2"]
        await pool.stop()

    asyncio.run(scenario())
