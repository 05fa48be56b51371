"""POST /sandboxes with an Idempotency-Key: a retry gets the sandbox the first request made,
never a second one; across a restart, under concurrency, and not for a create that failed."""

from __future__ import annotations

import threading
import uuid
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest

from daemon.errors import Conflict
from daemon.lifecycle.running import utcnow
from daemon.store.database import Store
from tests.conftest import Daemon

pytestmark = pytest.mark.usefixtures("nothing_carries_over")


def post(daemon: Daemon, key: str, body: dict[str, Any]) -> httpx.Response:
    return daemon.client.post("/sandboxes", json=body, headers={"Idempotency-Key": key})


def labelled(daemon: Daemon, tag: str) -> list[dict[str, Any]]:
    """The sandboxes of this test: those carrying its label."""
    answer = daemon.client.get("/sandboxes", params={"label": f"test={tag}"})
    assert answer.status_code == 200
    return answer.json()["items"]  # type: ignore[no-any-return]


def new_key() -> str:
    return str(uuid.uuid4())


def test_the_same_key_and_body_give_the_same_sandbox(daemon: Daemon) -> None:
    key, body = new_key(), {"labels": {"test": "same"}, "cmd": ["sh", "-c", "exit 3"]}
    first = post(daemon, key, body)
    assert first.status_code == 201, first.text
    daemon.await_state(f"/sandboxes/{first.json()['id']}", "exited")

    again = post(daemon, key, body)
    assert again.status_code == 201, again.text
    assert again.json()["id"] == first.json()["id"]
    assert again.headers["Location"] == f"/sandboxes/{first.json()['id']}"
    # As it stands now, not as it was created.
    assert again.json()["state"] == "exited" and again.json()["exit"]["exit_code"] == 3
    assert [s["id"] for s in labelled(daemon, "same")] == [first.json()["id"]]


def test_the_same_key_with_another_body_is_422_and_stores_nothing(daemon: Daemon) -> None:
    key = new_key()
    first = post(daemon, key, {"labels": {"test": "other"}})
    assert first.status_code == 201, first.text

    other = post(daemon, key, {"labels": {"test": "other"}, "name": "another-body"})
    assert other.status_code == 422, other.text
    assert other.headers["content-type"] == "application/problem+json"
    assert "Idempotency-Key" in other.json()["detail"]
    assert [s["id"] for s in labelled(daemon, "other")] == [first.json()["id"]]
    assert daemon.client.get("/sandboxes/another-body").status_code == 404
    # The key still answers for its own body.
    assert post(daemon, key, {"labels": {"test": "other"}}).json()["id"] == first.json()["id"]


def test_a_key_outlives_a_daemon_restart(daemon: Daemon) -> None:
    key, body = new_key(), {"labels": {"test": "restart"}}
    first = post(daemon, key, body)
    assert first.status_code == 201, first.text
    daemon.stop()
    daemon.start()
    again = post(daemon, key, body)
    assert again.status_code == 201, again.text
    assert again.json()["id"] == first.json()["id"]
    assert len(labelled(daemon, "restart")) == 1


def test_a_failed_create_does_not_use_up_its_key(daemon: Daemon) -> None:
    key = new_key()
    taken = daemon.create(name="taken-name", labels={"test": "failed"})
    conflict = post(daemon, key, {"name": "taken-name", "labels": {"test": "failed"}})
    assert conflict.status_code == 409, conflict.text
    invalid = post(daemon, key, {"rootfs": "/no/such/dir", "labels": {"test": "failed"}})
    assert invalid.status_code == 422, invalid.text
    # Had either stored the key, this other body would be a 422.
    made = post(daemon, key, {"labels": {"test": "failed"}})
    assert made.status_code == 201, made.text
    assert {s["id"] for s in labelled(daemon, "failed")} == {taken["id"], made.json()["id"]}


def test_concurrent_creates_with_one_key_make_one_sandbox(daemon: Daemon) -> None:
    key, body = new_key(), {"labels": {"test": "concurrent"}}
    start = threading.Barrier(4)
    answers: list[httpx.Response] = []

    def create() -> None:
        with httpx.Client(
            transport=httpx.HTTPTransport(uds=str(daemon.socket)),
            base_url="http://localhost",
            timeout=60,
        ) as client:
            start.wait()
            answers.append(client.post("/sandboxes", json=body, headers={"Idempotency-Key": key}))

    threads = [threading.Thread(target=create) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    daemon.created |= {a.json()["id"] for a in answers if a.status_code == 201}
    assert [a.status_code for a in answers] == [201] * 4, [a.text for a in answers]
    assert len({a.json()["id"] for a in answers}) == 1
    assert len(labelled(daemon, "concurrent")) == 1


def test_the_key_of_a_deleted_sandbox_is_409(daemon: Daemon) -> None:
    key, body = new_key(), {"labels": {"test": "deleted"}}
    first = post(daemon, key, body)
    assert first.status_code == 201, first.text
    assert daemon.client.delete(f"/sandboxes/{first.json()['id']}").status_code == 204
    again = post(daemon, key, body)
    assert again.status_code == 409, again.text
    assert first.json()["id"] in again.json()["detail"]
    assert labelled(daemon, "deleted") == []


@pytest.mark.parametrize("key", ["k" * 256, "", "caf\u00e9"], ids=["too-long", "empty", "latin1"])
def test_a_bad_key_is_422_and_makes_nothing(daemon: Daemon, key: str) -> None:
    answer = daemon.client.post(
        "/sandboxes",
        json={"labels": {"test": "bad-key"}},
        headers={"Idempotency-Key": key.encode("latin-1")},  # type: ignore[dict-item]
    )
    assert answer.status_code == 422, answer.text
    assert answer.headers["content-type"] == "application/problem+json"
    assert labelled(daemon, "bad-key") == []


def test_keys_older_than_a_day_are_forgotten_and_purged(tmp_path: Path) -> None:
    """The store's side, on a database of its own: the window and the purge on write."""
    store = Store(tmp_path / "sandboxd.db")
    try:
        now = utcnow()
        day_ago = now - timedelta(hours=24)
        old = now - timedelta(hours=25)
        store.record_idempotency_key("old", body_hash="h", sandbox_id="sb_1", now=old, since=old)
        assert store.find_idempotency_key("old", old) is not None
        assert store.find_idempotency_key("old", day_ago) is None  # past the window
        store.record_idempotency_key(
            "new", body_hash="h", sandbox_id="sb_2", now=now, since=day_ago
        )
        assert store.find_idempotency_key("old", old) is None  # purged by that write
        found = store.find_idempotency_key("new", day_ago)
        assert found is not None and (found.sandbox_id, found.body_hash) == ("sb_2", "h")
        # Once expired, a key can be recorded again; until then it cannot.
        with pytest.raises(Conflict):
            store.record_idempotency_key(
                "new", body_hash="g", sandbox_id="sb_3", now=now, since=old
            )
        later = now + timedelta(hours=24, seconds=1)
        store.record_idempotency_key(
            "new", body_hash="g", sandbox_id="sb_3", now=later, since=later - timedelta(hours=24)
        )
    finally:
        store.close()
