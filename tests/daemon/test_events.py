"""Events in the store (a real SQLite file) and the hub's fan-out: each change writes its event in
its own transaction (none when it rolls back), published after the commit in seq order; the
last EVENTS_KEPT are kept; a follower that falls `bound` behind is dropped, the others not."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

import daemon.store.database as database
from daemon.errors import Conflict, InvalidTransition
from daemon.lifecycle.events import Event, EventHub, EventType
from daemon.lifecycle.states import ExitReason, LifecycleState
from daemon.store.database import Store
from tests.daemon.test_store import T0, create, finished


@pytest.fixture
def published() -> list[Event]:
    return []


@pytest.fixture
def store(tmp_path: Path, published: list[Event]) -> Iterator[Store]:
    store = Store(tmp_path / "sandboxd.db", published.extend)
    yield store
    store.close()


def types(events: list[Event]) -> list[str]:
    return [str(e.type) for e in events]


def test_each_change_writes_its_event_and_publishes_it_after_commit(
    store: Store, published: list[Event]
) -> None:
    create(store, "sb1", "one", spec={"labels": {"team": "a"}})
    assert published == []  # creating: nobody is told yet
    store.transition("sb1", LifecycleState.RUNNING)
    store.insert_exec(id="ex1", sandbox_id="sb1", cmd=["true"], now=T0)
    store.finish_exec("ex1", **finished(exit_code=3))
    store.finish_exec("ex1", **finished(exit_code=4))  # a second report: ignored, no event
    store.transition("sb1", LifecycleState.EXITED, exit_reason=ExitReason.OOM, oom_kills=2)
    store.transition("sb1", LifecycleState.DESTROYING)  # marked: tells nothing yet
    store.remove_sandbox("sb1")  # gone for the API: told now
    store.delete_sandbox("sb1")  # its leases let go: nothing more to tell
    assert types(published) == [
        "sandbox.created",
        "exec.started",
        "exec.exited",
        "sandbox.oom",
        "sandbox.oom",
        "sandbox.exited",
        "sandbox.destroyed",
    ]
    assert published == store.events_after(0)
    assert [e.seq for e in published] == list(range(1, 8))
    ended = published[2]
    assert (ended.exec_id, ended.data["exit_code"], ended.data["labels"]) == (
        "ex1",
        3,
        {"team": "a"},
    )
    assert published[5].data["exit"]["reason"] == "oom"


def test_a_change_refused_writes_no_event(store: Store, published: list[Event]) -> None:
    create(store, "sb1", "one")
    store.transition("sb1", LifecycleState.RUNNING)
    published.clear()
    with pytest.raises(InvalidTransition):
        store.transition("sb1", LifecycleState.CREATING)
    with pytest.raises(Conflict):
        store.take_pooled(
            "sb1", name="one", hostname="h", spec={}, max_live=10, now=T0, expires_at=None
        )
    assert published == []
    assert types(store.events_after(0)) == ["sandbox.created"]


def test_a_sandbox_forgotten_while_creating_leaves_no_event(
    store: Store, published: list[Event]
) -> None:
    create(store, "sb1")  # its setup found its mounts bad: a 422, and nothing stored
    store.transition("sb1", LifecycleState.DESTROYING)
    store.remove_sandbox("sb1")
    store.delete_sandbox("sb1")
    assert published == [] and store.events_after(0) == []


def test_pooled_sandboxes_tell_nothing_until_taken(store: Store, published: list[Event]) -> None:
    create(store, "sbp", pooled=True)
    store.transition("sbp", LifecycleState.POOLED)
    assert published == []
    store.take_pooled(
        "sbp", name="taken", hostname="h", spec={"labels": {}}, max_live=10, now=T0, expires_at=None
    )
    assert types(published) == ["sandbox.created"]
    assert published[0].data["name"] == "taken"


def test_expiry_is_told_once(store: Store, published: list[Event]) -> None:
    create(store, "sb1")
    store.transition("sb1", LifecycleState.RUNNING)
    store.transition("sb1", LifecycleState.EXPIRING, exit_reason=ExitReason.TTL_EXPIRED)
    store.remove_sandbox("sb1", expired=True)
    store.delete_sandbox("sb1")
    create(store, "sb2")
    store.transition("sb2", LifecycleState.FAILED, exit_reason=ExitReason.SETUP_FAILED)
    store.transition("sb2", LifecycleState.DESTROYING)
    store.remove_sandbox("sb2", expired=True)  # ended before its ttl ran out
    store.delete_sandbox("sb2")
    assert types(published) == [
        "sandbox.created",
        "sandbox.expired",
        "sandbox.destroyed",
        "sandbox.failed",
        "sandbox.expired",
        "sandbox.destroyed",
    ]


def test_the_last_events_kept_are_kept(
    store: Store, published: list[Event], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(database, "EVENTS_KEPT", 10)
    monkeypatch.setattr(database, "TRIM_EVERY", 4)
    for n in range(30):
        store.emit(EventType.IMAGE_PULLED, image_id=f"sha256:{n}")
    kept = [e.seq for e in store.events_after(0)]
    # Trimmed at seq 28 to the ten up to it; 29 and 30 came after.
    assert kept == list(range(19, 31))


# -- the hub --------------------------------------------------------------------------------------


def event(seq: int) -> Event:
    return Event(seq, T0, EventType.EXEC_STARTED, "sb1", f"ex{seq}")


def test_a_follower_bound_behind_is_dropped_and_the_others_are_not() -> None:
    async def run() -> None:
        hub = EventHub(bound=3)
        hub.start()
        slow, quick = hub.subscribe(), hub.subscribe()
        got: list[int] = []
        for seq in range(1, 6):
            hub.publish([event(seq)])
            await asyncio.sleep(0)  # delivered on the loop
            got.append((await quick.get()).seq)  # type: ignore[union-attr]
        assert got == [1, 2, 3, 4, 5]
        assert slow.dropped and hub.dropped == 1
        assert hub.followers == {quick}
        assert await slow.get() is None  # its stream ends at once: nothing held for it
        hub.close()
        assert await quick.get() is None

    asyncio.run(run())


def test_events_published_from_threads_arrive_in_order() -> None:
    async def run() -> None:
        hub = EventHub(bound=1000)
        hub.start()
        follower = hub.subscribe()
        lock = threading.Lock()  # as the store's: publishing in seq order
        counter = iter(range(1, 201))

        def publish() -> None:
            for _ in range(50):
                with lock:
                    hub.publish([event(next(counter))])

        threads = [threading.Thread(target=publish) for _ in range(3)]
        for thread in threads:
            thread.start()
        for _ in range(50):
            with lock:
                hub.publish([event(next(counter))])
            await asyncio.sleep(0)
        await asyncio.to_thread(lambda: [t.join() for t in threads])
        seqs = [(await follower.get()).seq for _ in range(200)]  # type: ignore[union-attr]
        assert seqs == list(range(1, 201))

    asyncio.run(run())
