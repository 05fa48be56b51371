"""daemon.linux.cgroup_v1 against the host's real v1 hierarchies (skipped where there are none),
and its reading of /proc/self/mountinfo for hosts laid out otherwise than this one."""

from __future__ import annotations

import secrets
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from daemon.linux import cgroups
from daemon.linux.cgroup_v1 import HIERARCHIES, CgroupV1, find_hierarchies
from daemon.shapes import Limits

MiB = 1 << 20
SANDBOX = "sb_00000000000000bb"

# A typical systemd hybrid host: cpu and cpuacct co-mounted, with links beside them.
COMOUNTED = """\
25 31 0:22 / /sys/fs/cgroup ro,nosuid,nodev,noexec shared:9 - tmpfs tmpfs ro,mode=755
26 25 0:23 / /sys/fs/cgroup/unified rw,nosuid,nodev,noexec,relatime shared:10 - cgroup2 cgroup2 rw
30 25 0:27 / /sys/fs/cgroup/cpu,cpuacct rw,nosuid,nodev,noexec,relatime shared:14 - cgroup cgroup rw,cpu,cpuacct
31 25 0:28 / /sys/fs/cgroup/memory rw,nosuid,nodev,noexec,relatime shared:15 - cgroup cgroup rw,memory
32 25 0:29 / /sys/fs/cgroup/pids rw,nosuid,nodev,noexec,relatime shared:16 - cgroup cgroup rw,pids
33 25 0:30 / /sys/fs/cgroup/net_cls,net_prio rw,nosuid,nodev,noexec,relatime shared:17 - cgroup cgroup rw,net_cls,net_prio
34 25 0:31 / /sys/fs/cgroup/systemd rw,nosuid,nodev,noexec,relatime shared:11 - cgroup cgroup rw,xattr,name=systemd
"""  # noqa: E501


def test_co_mounted_controllers_share_a_directory() -> None:
    found = find_hierarchies(COMOUNTED)
    assert found == {
        "memory": Path("/sys/fs/cgroup/memory"),
        "pids": Path("/sys/fs/cgroup/pids"),
        "cpu": Path("/sys/fs/cgroup/cpu,cpuacct"),
        "cpuacct": Path("/sys/fs/cgroup/cpu,cpuacct"),
    }


def test_a_pure_v2_host_has_no_hierarchies() -> None:
    line = "26 1 0:23 / /sys/fs/cgroup rw,nosuid - cgroup2 cgroup2 rw,nsdelegate\n"
    assert find_hierarchies(line) == {}


HOST_V1 = find_hierarchies(Path("/proc/self/mountinfo").read_text())


@pytest.fixture
def v1() -> Iterator[CgroupV1]:
    if "memory" not in HOST_V1:
        pytest.skip("this host mounts no v1 memory hierarchy")
    control = CgroupV1(f"sandboxd-unit-{secrets.token_hex(4)}")
    control.start()
    try:
        yield control
    finally:
        control.remove(SANDBOX)
        control.stop()
        assert not any(root.exists() for root in control.roots.values())


def test_a_sandbox_gets_a_cgroup_in_each_hierarchy_with_its_limits(v1: CgroupV1) -> None:
    placement = v1.create(SANDBOX, Limits(memory_bytes=64 * MiB, pids=16, cpus=0.5))
    dirs = v1.dirs(SANDBOX)
    assert set(dirs) == set(HIERARCHIES) & set(HOST_V1)
    assert placement.join == [str(p) for p in dict.fromkeys(dirs.values())]
    assert placement.memory == str(dirs["memory"]) and not placement.memory_per_exec
    assert (dirs["memory"] / "memory.limit_in_bytes").read_text() == f"{64 * MiB}\n"
    if (dirs["memory"] / "memory.memsw.limit_in_bytes").exists():
        assert (dirs["memory"] / "memory.memsw.limit_in_bytes").read_text() == f"{64 * MiB}\n"
    assert (dirs["pids"] / "pids.max").read_text() == "16\n"
    assert (dirs["cpu"] / "cpu.cfs_quota_us").read_text() == "50000\n"
    assert v1.sandboxes() == [SANDBOX]


def test_usage_counts_a_process_that_joined(v1: CgroupV1) -> None:
    placement = v1.create(SANDBOX, Limits(pids=16))
    idle = v1.usage(SANDBOX)
    assert (idle.pids_current, idle.oom_kills) == (0, 0)
    join = "; ".join(f"echo $$ > {path}/cgroup.procs" for path in placement.join)
    work = "i=0; while [ $i -lt 20000 ]; do i=$((i + 1)); done; echo done"
    child = subprocess.Popen(["sh", "-c", f"{join}; {work}; exec sleep 30"], stdout=subprocess.PIPE)
    try:
        assert child.stdout is not None and child.stdout.readline() == b"done\n"
        assert cgroups_hold(placement.join, child.pid)
        busy = v1.usage(SANDBOX)
        assert busy.pids_current == 1
        assert busy.memory_current is not None and busy.memory_current > 0
        assert busy.cpu_usec is not None and busy.cpu_usec > 0
    finally:
        child.kill()
        child.wait()
    v1.remove(SANDBOX)
    assert not any(path.exists() for path in v1.dirs(SANDBOX).values())
    with pytest.raises(FileNotFoundError):
        v1.usage(SANDBOX)


def test_a_stray_is_listed_and_removed(v1: CgroupV1) -> None:
    (v1.roots["pids"] / SANDBOX).mkdir()  # as a crash between two steps would leave it
    assert v1.sandboxes() == [SANDBOX]
    v1.remove(SANDBOX)
    assert v1.sandboxes() == []


def cgroups_hold(paths: list[str], pid: int) -> bool:
    def joined() -> bool:
        return all(str(pid) in Path(p, "cgroup.procs").read_text().split() for p in paths)

    for _ in range(200):
        if joined():
            return True
        cgroups.time.sleep(0.01)
    return False
