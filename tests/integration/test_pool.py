"""The warm pool (`--pool-size`): a create on the default options takes a sandbox started
before it was asked for, made the asker's (name, host name, env, labels, ttl); the API never
sees a pooled one; the pool refills, replaces one that died, survives a daemon restart and is
destroyed by a graceful stop.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import Daemon, Daemons, wait_for

POOL = 2


@pytest.fixture(scope="module")
def daemon(daemons: Daemons) -> Daemon:
    return daemons.new("--pool-size", str(POOL), "--max-sandboxes", "3")


@pytest.fixture(autouse=True)
def pool_ready_and_nothing_carried_over(daemon: Daemon) -> Iterator[None]:
    if daemon.proc is None:
        start(daemon)
    wait_until_ready(daemon)
    yield
    if daemon.proc is None:
        start(daemon)
    daemon.destroy_all()


def start(daemon: Daemon) -> None:
    daemon.start("--pool-size", str(POOL), "--max-sandboxes", "3")


def wait_until_ready(daemon: Daemon) -> dict[str, Any]:
    info: dict[str, Any] = {}

    def ready() -> bool:
        info.update(daemon.client.get("/info").json())
        return bool(info["pool"] == {"size": POOL, "ready": POOL})

    assert wait_for(ready, timeout=20), info
    return info


def on_disk(daemon: Daemon) -> set[str]:
    """The sandboxes whose runtime directories exist: pooled ones and created ones."""
    return {p.name for p in (daemon.run_dir / "sandboxes").iterdir()}


def pooled(daemon: Daemon) -> set[str]:
    listed = {s["id"] for s in daemon.client.get("/sandboxes").json()["items"]}
    return on_disk(daemon) - listed


def test_the_api_does_not_see_pooled_sandboxes(daemon: Daemon) -> None:
    info = wait_until_ready(daemon)
    assert info["sandboxes"] == {"running": 0, "total": 0, "removing": 0}
    assert daemon.client.get("/sandboxes").json()["items"] == []
    ids = pooled(daemon)
    assert len(ids) == POOL
    for sandbox_id in ids:
        assert daemon.client.get(f"/sandboxes/{sandbox_id}").status_code == 404
        exec_response = daemon.client.post(f"/sandboxes/{sandbox_id}/exec", json={"cmd": ["id"]})
        assert exec_response.status_code == 404
        assert daemon.client.delete(f"/sandboxes/{sandbox_id}").status_code == 404
    assert pooled(daemon) == ids  # nothing of them changed


def test_a_default_create_takes_one_and_makes_it_the_askers(daemon: Daemon) -> None:
    ready = pooled(daemon)
    box = daemon.create(name="from-pool", env={"GREETING": "hi"}, labels={"team": "a"})
    assert box["id"] in ready and box["state"] == "running"
    assert (box["name"], box["hostname"], box["labels"]) == (
        "from-pool",
        "from-pool",
        {"team": "a"},
    )
    result = daemon.sh(
        box["id"], "hostname; cat /etc/hostname; grep -c from-pool /etc/hosts; echo $GREETING"
    )
    assert result["stdout"] == "from-pool\nfrom-pool\n1\nhi\n", result
    overridden = daemon.sh(box["id"], "echo $GREETING", env={"GREETING": "hello"})
    assert overridden["stdout"] == "hello\n"
    # Still a sandbox on the defaults: PID 1 ours, only lo, root inside.
    inside = daemon.sh(box["id"], "ls /sys/class/net; id -u; cat /proc/1/comm")
    assert inside["stdout"].split() == ["lo", "0", "sandboxd-sup"], inside
    listed = daemon.client.get("/sandboxes").json()["items"]
    assert [s["id"] for s in listed] == [box["id"]]
    # The pool makes another in its place.
    wait_until_ready(daemon)
    assert len(pooled(daemon)) == POOL and box["id"] not in pooled(daemon)


def test_without_a_name_it_keeps_its_id_as_host_name(daemon: Daemon) -> None:
    ready = pooled(daemon)
    box = daemon.create()
    assert box["id"] in ready and box["hostname"] == box["id"]
    assert daemon.sh(box["id"], "hostname")["stdout"] == box["id"] + "\n"


def test_a_create_asking_for_more_is_built_afresh(daemon: Daemon) -> None:
    ready = pooled(daemon)
    box = daemon.create(cmd=["sleep", "60"])
    assert box["id"] not in ready
    assert pooled(daemon) == ready


def test_the_newest_taken_sandbox_lists_last(daemon: Daemon) -> None:
    first = daemon.create(cmd=["sleep", "60"])  # built afresh
    second = daemon.create()  # from the pool, started before the first
    listed = [s["id"] for s in daemon.client.get("/sandboxes").json()["items"]]
    assert listed == [first["id"], second["id"]]
    assert second["created_at"] > first["created_at"]


def test_a_refused_create_leaves_the_pool_as_it_was(daemon: Daemon) -> None:
    daemon.create(name="taken")
    wait_until_ready(daemon)
    ready = pooled(daemon)
    conflict = daemon.client.post("/sandboxes", json={"name": "taken"})
    assert conflict.status_code == 409
    daemon.create()
    daemon.create()  # three live: the limit; pooled ones do not count
    wait_until_ready(daemon)
    full = daemon.client.post("/sandboxes", json={})
    assert full.status_code == 503, full.text
    assert len(pooled(daemon)) == POOL and ready - pooled(daemon) <= ready


def test_the_ttl_asked_for_applies(daemon: Daemon) -> None:
    box = daemon.create(ttl_seconds=1)
    assert box["expires_at"] is not None
    assert wait_for(lambda: daemon.client.get(f"/sandboxes/{box['id']}").status_code == 404)


def test_a_pooled_sandbox_that_dies_is_replaced(daemon: Daemon) -> None:
    victim = sorted(pooled(daemon))[0]
    pid = int(next(p for p in os.listdir("/proc") if p.isdigit() and is_supervisor(p, victim)))
    os.kill(pid, signal.SIGKILL)
    assert wait_for(lambda: victim not in on_disk(daemon))
    wait_until_ready(daemon)
    assert victim not in pooled(daemon)
    assert daemon.client.get("/info").json()["sandboxes"]["total"] == 0  # no record of it
    # Nothing of it is left: files, cgroups, processes.
    assert not (daemon.state_dir / "sandboxes" / victim).exists()
    assert not list(Path("/sys/fs/cgroup").glob(f"*/{daemon.cgroup_name}/{victim}"))
    assert not list(Path("/sys/fs/cgroup").glob(f"{daemon.cgroup_name}/{victim}"))
    assert not [p for p in os.listdir("/proc") if p.isdigit() and holds_mounts_of(p, victim)]


def is_supervisor(pid: str, sandbox_id: str) -> bool:
    """Whether `pid` is the supervisor (PID 1) of `sandbox_id`."""
    try:
        comm = Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return False
    return comm == "sandboxd-sup" and holds_mounts_of(pid, sandbox_id)


def holds_mounts_of(pid: str, sandbox_id: str) -> bool:
    try:
        return f"/{sandbox_id}/" in Path(f"/proc/{pid}/mountinfo").read_text()
    except OSError:
        return False


def test_pooled_sandboxes_survive_a_crash_and_go_with_a_graceful_stop(daemon: Daemon) -> None:
    ready = pooled(daemon)
    daemon.stop(signal.SIGKILL)
    start(daemon)
    wait_until_ready(daemon)
    assert pooled(daemon) == ready  # adopted, not made again
    box = daemon.create(name="after-restart")
    assert box["id"] in ready
    assert daemon.sh(box["id"], "hostname")["stdout"] == "after-restart\n"
    daemon.destroy_all()
    wait_until_ready(daemon)
    daemon.stop()
    assert on_disk(daemon) == set()  # the pool was destroyed with the stop
