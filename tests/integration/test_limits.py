"""limits, OOM, stats and ttl against the real daemon and the host's real cgroups.

Each test checks what a client sees and, from the host side, what the kernel holds: the limit
files, which cgroups the supervisor is in, and that no cgroup directory survives a sandbox.
"""

from __future__ import annotations

import signal
import threading
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import Daemon, Daemons, wait_for

MiB = 1 << 20
CGROUP = Path("/sys/fs/cgroup")
V1_CONTROLLERS = ("memory", "pids", "cpu", "cpuacct")
TOUCH_400_MIB = ["python3", "-c", "data = b'x' * (400 << 20)"]  # writes every page


def host_layout() -> str | None:
    """Worked out apart from the daemon's own detect_layout, so that it can catch it out."""
    controllers = CGROUP / "cgroup.controllers"
    if controllers.exists() and "memory" in controllers.read_text().split():
        return "v2"
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        fields = line.split()
        after = fields[fields.index("-") + 1 :]
        if after[0] == "cgroup" and "memory" in after[2].split(","):
            return "v1"
    return None


LAYOUT = host_layout()


def cgroup2_root() -> Path:
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        fields = line.split()
        if fields[fields.index("-") + 1] == "cgroup2":
            return Path(fields[4])
    raise AssertionError("no cgroup2 mount")


def sandbox_cgroups(daemon: Daemon, sandbox_id: str) -> dict[str, Path]:
    """Every cgroup directory the sandbox should have: "unified" (the cgroup2 tree) and, on a
    v1 host, one per controller."""
    dirs = {"unified": cgroup2_root() / daemon.cgroup_name / sandbox_id}
    if LAYOUT == "v1":
        for controller in V1_CONTROLLERS:
            dirs[controller] = CGROUP / controller / daemon.cgroup_name / sandbox_id
    return dirs


def stats(daemon: Daemon, ref: str) -> dict[str, Any]:
    response = daemon.client.get(f"/sandboxes/{ref}/stats")
    assert response.status_code == 200, response.text
    return response.json()  # type: ignore[no-any-return]


def gone(daemon: Daemon, sandbox_id: str) -> bool:
    return daemon.client.get(f"/sandboxes/{sandbox_id}").status_code == 404


def ended(daemon: Daemon, path: str, timeout: float = 15) -> dict[str, Any]:
    """GET `path` until the sandbox or exec there is no longer running; the last answer."""
    found: dict[str, Any] = {}

    def done() -> bool:
        found.update(daemon.client.get(path).json())
        return found["state"] != "running"

    assert wait_for(done, timeout), found
    return found


# -- the layout, the limits on the host side -------------------------------------------------


def test_info_reports_the_hosts_layout(daemon: Daemon) -> None:
    assert daemon.client.get("/info").json()["cgroup"] == LAYOUT


@pytest.mark.skipif(LAYOUT is None, reason="no cgroup controllers on this host")
def test_limits_are_on_the_sandboxs_cgroups_before_anything_runs(daemon: Daemon) -> None:
    limits = {"memory_bytes": 64 * MiB, "pids": 32, "cpus": 0.25}
    box = daemon.create(limits=limits)
    dirs = sandbox_cgroups(daemon, box["id"])
    if LAYOUT == "v1":
        assert read(dirs["memory"] / "memory.limit_in_bytes") == str(64 * MiB)
        if (dirs["memory"] / "memory.memsw.limit_in_bytes").exists():
            assert read(dirs["memory"] / "memory.memsw.limit_in_bytes") == str(64 * MiB)
        assert read(dirs["pids"] / "pids.max") == "32"
        assert read(dirs["cpu"] / "cpu.cfs_quota_us") == "25000"
        assert read(dirs["cpu"] / "cpu.cfs_period_us") == "100000"
        # The supervisor (PID 1) itself is in every one of them, not only what it starts.
        for controller in V1_CONTROLLERS:
            assert str(box["pid"]) in read(dirs[controller] / "cgroup.procs").split(), controller
    else:
        assert read(dirs["unified"] / "memory.max") == str(64 * MiB)
        assert read(dirs["unified"] / "pids.max") == "32"
        assert read(dirs["unified"] / "cpu.max") == "25000 100000"
    assert read(dirs["unified"] / "init" / "cgroup.procs").split() == [str(box["pid"])]
    applied = limits | {"disk_bytes": 32 * MiB}  # half its memory: the disk as applied
    assert daemon.client.get(f"/sandboxes/{box['id']}").json()["limits"] == applied
    daemon.client.delete(f"/sandboxes/{box['id']}")


def test_limits_the_host_cannot_honour_are_refused(daemon: Daemon) -> None:
    for limits, field in (
        ({"pids": 1}, "pids"),  # the supervisor alone takes one
        ({"memory_bytes": 4 * MiB}, "memory_bytes"),
        ({"cpus": 0.001}, "cpus"),
        ({"cpus": 4096}, "cpus"),
        ({"memory": 1}, "memory"),
    ):
        response = daemon.client.post("/sandboxes", json={"limits": limits})
        assert response.status_code == 422, (limits, response.text)
        assert field in response.text
    assert daemon.client.get("/sandboxes").json()["items"] == []


# -- pids: a fork bomb ------------------------------------------------------------------------

BOMB = """
import subprocess, time
started = failed = 0
for _ in range(200):
    try:
        subprocess.Popen(["sleep", "4"])
        started += 1
    except BlockingIOError:  # EAGAIN: the sandbox is at its pids limit
        failed += 1
print(started, failed, flush=True)
time.sleep(4)
"""


class HealthProbe(threading.Thread):
    """GET /healthz over and over on a connection of its own; the slowest answer it saw."""

    def __init__(self, daemon: Daemon) -> None:
        super().__init__(daemon=True)
        self.client = httpx.Client(
            transport=httpx.HTTPTransport(uds=str(daemon.socket)), base_url="http://l"
        )
        self.done = threading.Event()
        self.worst = 0.0
        self.count = 0

    def run(self) -> None:
        while not self.done.is_set():
            began = time.monotonic()
            assert self.client.get("/healthz", timeout=10).status_code == 200
            self.worst = max(self.worst, time.monotonic() - began)
            self.count += 1
            time.sleep(0.005)

    def stop(self) -> float:
        self.done.set()
        self.join(15)
        self.client.close()
        return self.worst


@pytest.mark.skipif(LAYOUT is None, reason="no cgroup controllers on this host")
def test_a_fork_bomb_hits_the_pids_limit_and_the_daemon_stays_quick(daemon: Daemon) -> None:
    box = daemon.create(limits={"pids": 32})
    probe = HealthProbe(daemon)
    probe.start()
    try:
        bomb = daemon.exec(box["id"], ["python3", "-c", BOMB], wait=False)
        assert wait_for(lambda: stats(daemon, box["id"])["pids_current"] == 32)
        # Full: an exec cannot fork. It ends 126 and says why, as `docker exec` would.
        refused = daemon.exec(box["id"], ["echo", "hi"])
        assert refused["exit_code"] == 126 and refused["pid"] is None, refused
        assert "Resource temporarily unavailable" in refused["stderr"]
        assert "limits.pids" in refused["stderr"]
        done = ended(daemon, f"/sandboxes/{box['id']}/execs/{bomb['id']}")
    finally:
        worst = probe.stop()
    started, failed = map(int, done["stdout"].split())
    # 32 = the supervisor + python + 30 sleeps; the other 170 got EAGAIN.
    assert (started, failed) == (30, 170), done
    assert stats(daemon, box["id"])["pids_peak"] == 32
    print(f"\nfork bomb: worst /healthz latency {worst * 1000:.1f} ms over {probe.count} calls")
    assert probe.count > 50
    assert worst < 0.5
    # Once its processes have ended, the sandbox runs execs again.
    assert wait_for(lambda: daemon.exec(box["id"], ["echo", "hi"])["stdout"] == "hi\n", 10)
    assert daemon.client.get(f"/sandboxes/{box['id']}").json()["state"] == "running"
    daemon.client.delete(f"/sandboxes/{box['id']}")


# -- memory: the OOM killer -------------------------------------------------------------------


@pytest.mark.skipif(LAYOUT is None, reason="no cgroup controllers on this host")
def test_an_exec_past_the_memory_limit_is_oom_killed_and_the_sandbox_lives_on(
    daemon: Daemon,
) -> None:
    box = daemon.create(limits={"memory_bytes": 64 * MiB})
    killed = daemon.exec(box["id"], TOUCH_400_MIB)
    assert (killed["exit_code"], killed["signal"], killed["oom_killed"]) == (None, "SIGKILL", True)
    assert daemon.exec(box["id"], ["echo", "alive"])["stdout"] == "alive\n"
    usage = stats(daemon, box["id"])
    assert usage["oom_kills"] == 1
    assert 48 * MiB <= usage["memory_peak_bytes"] <= 64 * MiB, usage
    # A SIGKILL from anyone else is not an OOM kill.
    plain = daemon.sh(box["id"], "kill -KILL $$")
    assert (plain["signal"], plain["oom_killed"]) == ("SIGKILL", False)
    # Nor is a process that stays within the limit (32 MiB of 64).
    small = daemon.exec(box["id"], ["python3", "-c", "data = b'x' * (32 << 20); print(1)"])
    assert (small["exit_code"], small["oom_killed"]) == (0, False)
    # The record keeps it, as stored.
    listed = daemon.client.get(f"/sandboxes/{box['id']}/execs/{killed['id']}").json()
    assert listed["oom_killed"] is True
    daemon.client.delete(f"/sandboxes/{box['id']}")


@pytest.mark.skipif(LAYOUT is None, reason="no cgroup controllers on this host")
def test_a_main_cmd_killed_by_the_oom_killer_exits_with_reason_oom(daemon: Daemon) -> None:
    box = daemon.create(cmd=TOUCH_400_MIB, limits={"memory_bytes": 64 * MiB})
    oom = ended(daemon, f"/sandboxes/{box['id']}")
    assert oom["state"] == "exited"
    assert oom["exit"] == {
        "exit_code": None,
        "signal": "SIGKILL",
        "reason": "oom",
        "message": None,
    }
    # A main cmd killed otherwise is only signaled.
    other = daemon.create(cmd=["sh", "-c", "kill -KILL $$"], limits={"memory_bytes": 64 * MiB})
    assert ended(daemon, f"/sandboxes/{other['id']}")["exit"]["reason"] == "signaled"
    for sandbox in (box, other):
        daemon.client.delete(f"/sandboxes/{sandbox['id']}")


# -- cpu --------------------------------------------------------------------------------------


@pytest.mark.skipif(LAYOUT is None, reason="no cgroup controllers on this host")
def test_a_quarter_of_a_cpu_is_a_quarter_of_a_cpu(daemon: Daemon) -> None:
    box = daemon.create(limits={"cpus": 0.25})
    before, began = stats(daemon, box["id"])["cpu_seconds"], time.monotonic()
    busy = daemon.exec(box["id"], ["timeout", "2", "sh", "-c", "while :; do :; done"])
    after, wall = stats(daemon, box["id"])["cpu_seconds"], time.monotonic() - began
    assert busy["exit_code"] == 124  # timeout's: the loop ran its whole 2 s
    share = (after - before) / wall
    print(f"\ncpus 0.25: busy loop got {share:.3f} of a CPU ({after - before:.3f} s in {wall:.2f})")
    assert 0.18 < share < 0.32
    daemon.client.delete(f"/sandboxes/{box['id']}")


# -- stats ------------------------------------------------------------------------------------


def test_stats_of_a_running_sandbox(daemon: Daemon) -> None:
    box = daemon.create()
    idle = stats(daemon, box["id"])
    assert set(idle) == {
        "memory_current_bytes",
        "memory_peak_bytes",
        "cpu_seconds",
        "pids_current",
        "pids_peak",
        "oom_kills",
    }
    if LAYOUT is not None:
        assert idle["pids_current"] == 1  # the supervisor alone
        assert 0 < idle["memory_current_bytes"] <= idle["memory_peak_bytes"]
        assert idle["oom_kills"] == 0
    daemon.exec(box["id"], ["sh", "-c", "sleep 300 & sleep 300 & echo"])
    busy = stats(daemon, box["id"])
    if LAYOUT is not None:
        assert busy["pids_current"] == 3
    assert busy["cpu_seconds"] > idle["cpu_seconds"] > 0
    assert daemon.client.get("/sandboxes/nonesuch/stats").status_code == 404
    done = daemon.create(cmd=["true"])
    assert wait_for(lambda: daemon.client.get(f"/sandboxes/{done['id']}").json()["exit"])
    assert daemon.client.get(f"/sandboxes/{done['id']}/stats").status_code == 409
    for sandbox in (box, done):
        daemon.client.delete(f"/sandboxes/{sandbox['id']}")


# -- ttl --------------------------------------------------------------------------------------


def test_a_ttl_can_be_extended_cleared_and_shortened(daemon: Daemon) -> None:
    box = daemon.create(ttl_seconds=1)
    url = f"/sandboxes/{box['id']}/ttl"
    extended = daemon.client.post(url, json={"ttl_seconds": 60})
    assert extended.status_code == 200, extended.text
    assert extended.json()["expires_at"] > box["expires_at"]
    time.sleep(1.5)
    assert not gone(daemon, box["id"])
    cleared = daemon.client.post(url, json={"ttl_seconds": None}).json()
    assert cleared["expires_at"] is None
    for bad in ({"ttl_seconds": 0}, {"ttl_seconds": -1}, {}, {"ttl": 5}):
        assert daemon.client.post(url, json=bad).status_code == 422, bad
    assert daemon.client.post("/sandboxes/nonesuch/ttl", json={"ttl_seconds": 5}).status_code == 404
    shortened = daemon.client.post(url, json={"ttl_seconds": 0.5}).json()
    assert shortened["expires_at"] < extended.json()["expires_at"]
    assert wait_for(lambda: gone(daemon, box["id"]), timeout=5)
    assert not daemon.leaks()


def test_an_extended_ttl_survives_a_restart(daemons: Daemons) -> None:
    daemon = daemons.new()
    box = daemon.create(ttl_seconds=1)
    url = f"/sandboxes/{box['id']}/ttl"
    # Extended far enough that no restart, however slow, reaches it.
    expires_at = daemon.client.post(url, json={"ttl_seconds": 3600}).json()["expires_at"]
    daemon.stop(signal.SIGKILL)
    past(box["expires_at"])  # the first expiry passes while no daemon runs
    daemon.start()
    after = daemon.client.get(f"/sandboxes/{box['id']}").json()
    assert (after["state"], after["expires_at"]) == ("running", expires_at)
    # The stored expiry is what a restarted daemon enforces: one that passed while it was
    # down ends the sandbox once it is back.
    short = daemon.client.post(url, json={"ttl_seconds": 1}).json()["expires_at"]
    daemon.stop(signal.SIGKILL)
    past(short)
    daemon.start()
    assert wait_for(lambda: gone(daemon, box["id"]), timeout=30)
    assert not daemon.leaks()
    daemon.stop()  # the leak check of the module's first daemon would count this one


def past(instant: str) -> None:
    """Return once the wall clock is past `instant` (an RFC 3339 time of the API)."""
    moment = datetime.fromisoformat(instant.replace("Z", "+00:00"))
    while datetime.now(UTC) <= moment:
        time.sleep(0.1)


def test_ttl_expired_shows_while_the_sandbox_is_torn_down(daemon: Daemon) -> None:
    box = daemon.create()
    # Many files in its writable layer make the teardown take long enough to be seen.
    made = daemon.sh(box["id"], "mkdir /root/f && cd /root/f && seq 30000 | xargs touch")
    assert made["exit_code"] == 0, made
    daemon.client.post(f"/sandboxes/{box['id']}/ttl", json={"ttl_seconds": 0.2})
    seen: list[dict[str, Any]] = []
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        response = daemon.client.get(f"/sandboxes/{box['id']}")
        if response.status_code == 404:
            break
        sandbox = response.json()
        if sandbox["state"] != "running":
            seen.append(sandbox)
    assert gone(daemon, box["id"])
    assert seen, "the sandbox went from running to 404 without showing ttl_expired"
    assert seen[0]["state"] == "exited"
    assert seen[0]["exit"] == {
        "exit_code": None,
        "signal": "SIGKILL",
        "reason": "ttl_expired",
        "message": None,
    }
    assert seen[0]["pid"] is None
    assert not daemon.leaks()


# -- teardown ---------------------------------------------------------------------------------


def test_destroy_leaves_no_cgroup_in_any_hierarchy(daemon: Daemon) -> None:
    box = daemon.create(limits={"memory_bytes": 64 * MiB, "pids": 64, "cpus": 0.5})
    # Background processes, one that left its session, and an exec still running.
    daemon.sh(box["id"], "sleep 300 & (setsid sleep 300 &); echo")
    daemon.exec(box["id"], ["sleep", "300"], wait=False)
    dirs = sandbox_cgroups(daemon, box["id"])
    assert all(path.is_dir() for path in dirs.values()), dirs
    assert daemon.client.delete(f"/sandboxes/{box['id']}").status_code == 204
    daemon.settled()  # its removal comes after the answer
    assert [path for path in dirs.values() if path.exists()] == []
    assert not list(CGROUP.glob(f"*/{daemon.cgroup_name}/{box['id']}"))
    assert not daemon.leaks()


@pytest.mark.skipif(LAYOUT != "v1", reason="v1 hierarchies only")
def test_stray_v1_cgroups_are_removed_at_start(daemons: Daemons) -> None:
    daemon = daemons.new()
    daemon.stop()
    stray = CGROUP / "pids" / daemon.cgroup_name / "sb_00000000000000ff"
    stray.parent.mkdir(exist_ok=True)
    stray.mkdir()
    daemon.start()
    assert not stray.exists()
    daemon.stop()


@pytest.mark.skipif(LAYOUT is None, reason="no cgroup controllers on this host")
def test_a_restarted_daemon_keeps_limits_and_stats(daemons: Daemons) -> None:
    daemon = daemons.new()
    box = daemon.create(limits={"pids": 8})
    daemon.stop(signal.SIGKILL)
    daemon.start()
    assert stats(daemon, box["id"])["pids_current"] == 1
    script = "for i in 1 2 3 4 5 6 7 8 9 10; do sleep 30 & done 2>/dev/null; sleep 1; echo"
    daemon.sh(box["id"], script)
    assert stats(daemon, box["id"])["pids_current"] <= 8
    daemon.client.delete(f"/sandboxes/{box['id']}")
    assert not daemon.leaks()
    daemon.stop()


def read(path: Path) -> str:
    return path.read_text().strip()
