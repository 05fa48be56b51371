"""A DELETE (or the ttl, or a main cmd's exit) answers once the sandbox is dead and its record
final; its files, cgroups and leases are let go after, in the background
(daemon/lifecycle/teardown.py, Removals). The removals are held by a file lock
(HOLD_VARIABLE) to catch a sandbox between its answer and its removal: no timing.
"""

from __future__ import annotations

import fcntl
import os
import signal
import sqlite3
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from daemon.lifecycle.teardown import HOLD_VARIABLE
from tests.conftest import SYS_NET, Daemon, Daemons, find_leaks, host_ifname, wait_for

pytestmark = pytest.mark.usefixtures("nothing_carries_over")


@pytest.fixture(scope="module")
def hold_file(daemons: Daemons) -> Iterator[Path]:
    """The module's daemons (and their restarts) are started with the hold file named."""
    path = daemons.root / "hold-removals"
    path.touch()
    os.environ[HOLD_VARIABLE] = str(path)
    yield path
    del os.environ[HOLD_VARIABLE]


@pytest.fixture(scope="module")
def daemon(daemons: Daemons, hold_file: Path) -> Daemon:
    return daemons.new()


class Hold:
    """Removals wait while this holds the hold file's lock."""

    def __init__(self, path: Path) -> None:
        self.fd: int | None = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        fcntl.flock(self.fd, fcntl.LOCK_EX)

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


@pytest.fixture
def hold(hold_file: Path) -> Iterator[Hold]:
    held = Hold(hold_file)
    yield held
    held.release()


def row(daemon: Daemon, sandbox_id: str) -> tuple[Any, ...] | None:
    with sqlite3.connect(daemon.state_dir / "sandboxd.db") as db:
        found = db.execute(
            "SELECT state, name, uid_slot, ip FROM sandboxes WHERE id = ?", (sandbox_id,)
        ).fetchone()
    return None if found is None else tuple(found)


def removing(daemon: Daemon) -> int:
    return daemon.client.get("/info").json()["sandboxes"]["removing"]  # type: ignore[no-any-return]


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_delete_answers_before_the_removal_and_the_leases_stay_held_till_it(
    daemon: Daemon, hold: Hold
) -> None:
    box = daemon.create(name="held", network={"mode": "bridge"})
    done = daemon.exec(box["id"], ["true"])
    files = [daemon.state_dir / "sandboxes" / box["id"], daemon.run_dir / "sandboxes" / box["id"]]
    assert daemon.client.delete("/sandboxes/held").status_code == 204

    # Answered with its removal held: PID 1 dead, its link gone, the API has forgotten it.
    assert not alive(box["pid"])
    assert not (SYS_NET / host_ifname(box["id"])).exists()
    assert daemon.client.get(f"/sandboxes/{box['id']}").status_code == 404
    assert daemon.client.get(f"/sandboxes/{box['id']}/execs/{done['id']}").status_code == 404
    assert daemon.client.delete(f"/sandboxes/{box['id']}").status_code == 404
    assert box["id"] not in {s["id"] for s in daemon.client.get("/sandboxes").json()["items"]}
    # ...but its files are there, and its record holds its uid range and address.
    assert all(path.exists() for path in files)
    state, name, slot, ip = row(daemon, box["id"])  # type: ignore[misc]
    assert (state, name, ip) == ("removing", None, box["network"]["ip"]) and slot is not None
    assert removing(daemon) == 1
    # Its name is free; its uid range and address are not handed out.
    other = daemon.create(name="held", network={"mode": "bridge"})
    assert other["network"]["ip"] != ip and row(daemon, other["id"])[2] != slot  # type: ignore[index]

    hold.release()
    daemon.settled()
    assert row(daemon, box["id"]) is None
    assert not any(path.exists() for path in files)
    assert daemon.client.delete(f"/sandboxes/{other['id']}").status_code == 204
    assert not daemon.leaks()


def test_a_daemon_killed_before_the_removal_finishes_it_at_start(
    daemon: Daemon, hold: Hold
) -> None:
    deleted = daemon.create(network={"mode": "bridge"}, limits={"memory_bytes": 64 << 20})
    daemon.sh(deleted["id"], "echo data > /root/file")
    ended = daemon.create(cmd=["sh", "-c", "exit 3"], network={"mode": "bridge"})
    assert daemon.client.delete(f"/sandboxes/{deleted['id']}").status_code == 204
    daemon.await_state(f"/sandboxes/{ended['id']}", "exited")
    # Both answered, their removals held: the one deleted removing, the one ended exited,
    # each still holding its uid range and address.
    assert row(daemon, deleted["id"])[0] == "removing"  # type: ignore[index]
    state, _name, slot, ip = row(daemon, ended["id"])  # type: ignore[misc]
    assert state == "exited" and slot is not None and ip == ended["network"]["ip"]
    assert daemon.client.get(f"/sandboxes/{ended['id']}").json()["exit"]["exit_code"] == 3
    assert wait_for(lambda: removing(daemon) == 2)

    daemon.stop(signal.SIGKILL)
    hold.release()
    left = find_leaks(daemon.root, daemon.uid_base)
    assert any(deleted["id"] in leak for leak in left), left  # there was something to finish

    daemon.start()
    assert row(daemon, deleted["id"]) is None
    assert row(daemon, ended["id"]) == ("exited", None, None, None)
    assert daemon.client.get(f"/sandboxes/{ended['id']}").json()["exit"]["exit_code"] == 3
    # Nothing of it runs or is mounted, no cgroup or file of it is left but its cmd's log
    # (kept with its record).
    leaks = daemon.leaks()
    assert leaks == [f"file {daemon.state_dir / 'logs' / ended['id']}"], leaks
    assert daemon.client.delete(f"/sandboxes/{ended['id']}").status_code == 204
    assert not daemon.leaks()


def test_an_expiry_answers_as_a_delete(daemon: Daemon, hold: Hold) -> None:
    box = daemon.create(ttl_seconds=0.5)
    path = f"/sandboxes/{box['id']}"
    assert wait_for(lambda: daemon.client.get(path).status_code == 404)
    assert row(daemon, box["id"])[0] == "removing"  # type: ignore[index]
    assert (daemon.state_dir / "sandboxes" / box["id"]).exists()
    hold.release()
    daemon.settled()
    assert row(daemon, box["id"]) is None
    assert not daemon.leaks()


def test_a_stopping_daemon_finishes_the_removals_queued(daemon: Daemon, hold: Hold) -> None:
    boxes = [daemon.create(network={"mode": "bridge"}) for _ in range(4)]
    for box in boxes:
        assert daemon.client.delete(f"/sandboxes/{box['id']}").status_code == 204
    assert removing(daemon) == 4
    assert daemon.proc is not None
    daemon.proc.send_signal(signal.SIGTERM)
    assert wait_for(lambda: "for 4 removals to finish" in daemon.log_text(), 30)
    assert daemon.proc.poll() is None
    hold.release()  # it stops: it must finish them first
    assert daemon.proc.wait(60) == 0
    daemon.proc = None
    with sqlite3.connect(daemon.state_dir / "sandboxd.db") as db:
        assert db.execute("SELECT id, state FROM sandboxes").fetchall() == []
    assert not find_leaks(daemon.root, daemon.uid_base, bridge=daemon.bridge)
    daemon.start()


def test_many_deletes_at_once_all_complete_and_leave_nothing(daemon: Daemon) -> None:
    boxes = [daemon.create(network={"mode": "bridge"} if i % 2 else {}) for i in range(10)]
    with ThreadPoolExecutor(len(boxes)) as pool:
        codes = list(
            pool.map(lambda b: daemon.client.delete(f"/sandboxes/{b['id']}").status_code, boxes)
        )
    assert codes == [204] * len(boxes)
    for box in boxes:
        assert daemon.client.get(f"/sandboxes/{box['id']}").status_code == 404
    daemon.settled()
    with sqlite3.connect(daemon.state_dir / "sandboxd.db") as db:
        assert db.execute("SELECT count(*) FROM sandboxes").fetchone() == (0,)
    assert not daemon.leaks()


def test_a_create_at_the_limit_right_after_a_delete_waits_for_its_leases(
    daemons: Daemons, hold_file: Path
) -> None:
    small = daemons.new("--max-sandboxes", "1")  # one uid range in all
    try:
        first = small.create()
        slot = row(small, first["id"])[2]  # type: ignore[index]
        held = Hold(hold_file)
        assert small.client.delete(f"/sandboxes/{first['id']}").status_code == 204
        assert row(small, first["id"])[0] == "removing"  # type: ignore[index]
        with ThreadPoolExecutor(1) as pool:
            creating = pool.submit(small.client.post, "/sandboxes", json={})
            assert wait_for(lambda: "waiting for a removal to let one go" in small.log_text())
            held.release()
            response = creating.result()
        # Not a 503: it got the one uid range, once the DELETE's removal let it go.
        assert response.status_code == 201, response.text
        second = response.json()
        assert row(small, first["id"]) is None and row(small, second["id"])[2] == slot  # type: ignore[index]
        assert small.client.delete(f"/sandboxes/{second['id']}").status_code == 204
        assert not small.leaks()
    finally:
        small.stop()
