"""daemon.linux.cgroup_v2: limits and usage on the cgroup2 tree.

Against the host's real cgroup2 mount first: where it has the memory, pids and cpu controllers
(a pure v2 host) every limit is checked there. On a hybrid host (this project's CI) those
controllers are bound to v1 hierarchies, and a new cgroup2 mount is the same hierarchy, so no
test can get them: the real tree then checks only what v2's core gives (cpu.stat, refusing
limits), and the rest runs against a temporary directory standing in for the tree, whose
cgroup.subtree_control writes are given the kernel's meaning by a small stand-in below.
"""

from __future__ import annotations

import errno
import os
import secrets
from collections.abc import Iterator
from pathlib import Path

import pytest

from daemon.errors import Invalid
from daemon.linux import cgroups
from daemon.linux.cgroup_v2 import CONTROLLERS, CgroupV2
from daemon.shapes import Limits

MiB = 1 << 20
SANDBOX = "sb_00000000000000aa"


# -- the host's real cgroup2 tree -------------------------------------------------------------


@pytest.fixture
def real_tree(tmp_path: Path) -> Iterator[cgroups.ProcessTree]:
    tree = cgroups.ProcessTree(f"sandboxd-unit-{secrets.token_hex(4)}", tmp_path)
    tree.start()
    try:
        yield tree
    finally:
        tree.remove(SANDBOX)
        tree.stop()
        assert not tree.root.exists()


def test_on_the_hosts_cgroup2_tree(real_tree: cgroups.ProcessTree) -> None:
    offered = set((real_tree.root.parent / "cgroup.controllers").read_text().split())
    v2 = CgroupV2(real_tree)
    v2.start()
    assert v2.controllers == offered & set(CONTROLLERS)
    real_tree.create(SANDBOX)
    limits = Limits(memory_bytes=64 * MiB, pids=32, cpus=0.25)
    if v2.controllers != set(CONTROLLERS):
        with pytest.raises(Invalid, match=r"no .* controller"):
            v2.check(limits)
        placement = v2.create(SANDBOX, Limits())
        assert placement.memory is None
        usage = v2.usage(SANDBOX)
        assert usage.cpu_usec == 0  # cpu.stat is cgroup2's core: it is there, and empty
        return
    v2.check(limits)
    placement = v2.create(SANDBOX, limits)
    path = real_tree.path(SANDBOX)
    assert (path / "memory.max").read_text() == f"{64 * MiB}\n"
    assert (path / "pids.max").read_text() == "32\n"
    assert (path / "cpu.max").read_text() == "25000 100000\n"
    assert set((path / "cgroup.subtree_control").read_text().split()) == set(CONTROLLERS)
    assert (path / "init" / "memory.events").exists()  # the leaves count their own
    assert placement.memory == str(path) and placement.memory_per_exec
    assert v2.usage(SANDBOX).pids_current == 0


def test_usage_of_a_sandbox_without_cgroup(real_tree: cgroups.ProcessTree) -> None:
    v2 = CgroupV2(real_tree)
    v2.start()
    with pytest.raises(FileNotFoundError):
        v2.usage("sb_0000000000000bad")


# -- a directory standing in for the tree -----------------------------------------------------

HOST_CONTROLLERS = "cpuset cpu io memory hugetlb pids rdma misc"
MEMORY_FILES = ("memory.max", "memory.swap.max", "memory.current", "memory.peak", "memory.events")
FILES = {
    "memory": MEMORY_FILES,
    "pids": ("pids.max", "pids.current", "pids.peak"),
    "cpu": ("cpu.max",),
}


class StandIn:
    """A directory laid out as a cgroup2 mount, and cgroupfs's meaning for writes to it: a
    "+name" written to cgroup.subtree_control enables a controller that cgroup.controllers
    offers (else EINVAL, as the kernel answers), and the children then offer it and have its
    files; any other write replaces a file's value, which must exist (ENOENT otherwise: no
    such controller)."""

    def __init__(self, mount: Path, offered: str = HOST_CONTROLLERS) -> None:
        self.mount = mount
        self.writes: list[tuple[str, str]] = []
        self.make_cgroup(mount, offered)

    def make_cgroup(self, path: Path, offered: str) -> None:
        """A new cgroup, or an existing one whose parent now offers more."""
        path.mkdir(exist_ok=True)
        (path / "cgroup.controllers").write_text(offered + "\n")
        initial = {
            "cgroup.subtree_control": "\n",
            "cpu.stat": "usage_usec 0\nuser_usec 0\nsystem_usec 0\n",
        }
        for controller in offered.split():
            for name in FILES.get(controller, ()):
                initial[name] = "max\n" if name.endswith(".max") else "0\n"
        for name, value in initial.items():
            if not (path / name).exists():
                (path / name).write_text(value)

    def mkdir(self, path: Path) -> None:
        """What mkdir in cgroupfs makes: the files of what the parent enabled for it."""
        enabled = (path.parent / "cgroup.subtree_control").read_text().strip()
        self.make_cgroup(path, enabled)

    def write_file(self, name: str, value: bytes, dir_fd: int | None = None) -> None:
        assert dir_fd is None
        path = Path(name)
        self.writes.append((str(path.relative_to(self.mount)), value.decode()))
        if not path.exists():
            raise FileNotFoundError(errno.ENOENT, "No such file or directory", name)
        if path.name != "cgroup.subtree_control":
            path.write_text(value.decode() + "\n")
            return
        offered = (path.parent / "cgroup.controllers").read_text().split()
        enabled = path.read_text().split()
        for change in value.decode().split():
            if change[1:] not in offered:
                raise OSError(errno.EINVAL, "Invalid argument", name)
            if change.startswith("+") and change[1:] not in enabled:
                enabled.append(change[1:])
        path.write_text(" ".join(enabled) + "\n")
        for child in path.parent.iterdir():
            if child.is_dir():
                self.make_cgroup(child, " ".join(enabled))


@pytest.fixture
def stand_in(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> StandIn:
    kernel = StandIn(tmp_path / "cgroup2")
    monkeypatch.setattr(cgroups, "write_file", kernel.write_file)
    return kernel


def started(kernel: StandIn, parent_enabled: str = "cpu memory pids") -> CgroupV2:
    (kernel.mount / "cgroup.subtree_control").write_text(parent_enabled + "\n")
    tree = cgroups.ProcessTree("sandboxd", kernel.mount / "run")
    tree.root = kernel.mount / "sandboxd"
    kernel.mkdir(tree.root)
    v2 = CgroupV2(tree)
    v2.start()
    return v2


def make_sandbox(kernel: StandIn, v2: CgroupV2) -> Path:
    path = v2.tree.path(SANDBOX)
    kernel.mkdir(path)
    return path


def test_start_enables_the_controllers_for_the_sandboxes(stand_in: StandIn) -> None:
    v2 = started(stand_in)
    assert v2.controllers == {"memory", "pids", "cpu"}
    control = (v2.tree.root / "cgroup.subtree_control").read_text().split()
    assert sorted(control) == ["cpu", "memory", "pids"]
    assert ("sandboxd/cgroup.subtree_control", "+memory") in stand_in.writes


def test_start_enables_them_one_level_up_when_the_host_did_not(stand_in: StandIn) -> None:
    v2 = started(stand_in, parent_enabled="")
    assert v2.controllers == {"memory", "pids", "cpu"}
    assert ("cgroup.subtree_control", "+pids") in stand_in.writes


def test_a_controller_the_host_does_not_offer_is_left_out(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    kernel = StandIn(tmp_path / "cgroup2", offered="cpu pids")
    monkeypatch.setattr(cgroups, "write_file", kernel.write_file)
    v2 = started(kernel, parent_enabled="cpu pids")
    assert v2.controllers == {"pids", "cpu"}
    v2.check(Limits(pids=10, cpus=1))
    with pytest.raises(Invalid, match="no memory controller"):
        v2.check(Limits(memory_bytes=64 * MiB))
    path = make_sandbox(kernel, v2)
    placement = v2.create(SANDBOX, Limits(pids=10))
    assert placement.memory is None and not placement.memory_per_exec
    assert (path / "pids.max").read_text() == "10\n"


def test_create_writes_each_limit(stand_in: StandIn) -> None:
    v2 = started(stand_in)
    path = make_sandbox(stand_in, v2)
    placement = v2.create(SANDBOX, Limits(memory_bytes=64 * MiB, pids=32, cpus=0.25))
    assert (path / "memory.max").read_text() == f"{64 * MiB}\n"
    assert (path / "memory.swap.max").read_text() == "0\n"  # swap cannot stretch it
    assert (path / "pids.max").read_text() == "32\n"
    assert (path / "cpu.max").read_text() == "25000 100000\n"
    # Controllers for its leaves too: each exec's leaf then counts its own OOM kills.
    assert sorted((path / "cgroup.subtree_control").read_text().split()) == [
        "cpu",
        "memory",
        "pids",
    ]
    stand_in.mkdir(path / "init")
    assert (path / "init" / "memory.events").exists()
    assert placement.join == []
    assert placement.memory == str(path) and placement.memory_per_exec


def test_create_without_limits_writes_none(stand_in: StandIn) -> None:
    v2 = started(stand_in)
    path = make_sandbox(stand_in, v2)
    before = len(stand_in.writes)
    v2.create(SANDBOX, Limits())
    written = [name for name, _ in stand_in.writes[before:]]
    assert written == [f"sandboxd/{SANDBOX}/cgroup.subtree_control"] * 3
    assert (path / "memory.max").read_text() == "max\n"


def test_no_swap_accounting_no_swap_limit(stand_in: StandIn) -> None:
    v2 = started(stand_in)
    path = make_sandbox(stand_in, v2)
    (path / "memory.swap.max").unlink()  # a kernel without swap accounting
    v2.create(SANDBOX, Limits(memory_bytes=32 * MiB))
    assert (path / "memory.max").read_text() == f"{32 * MiB}\n"
    assert not (path / "memory.swap.max").exists()


def test_a_tiny_cpu_share_is_the_kernels_minimum_quota(stand_in: StandIn) -> None:
    v2 = started(stand_in)
    path = make_sandbox(stand_in, v2)
    v2.create(SANDBOX, Limits(cpus=0.01))
    assert (path / "cpu.max").read_text() == "1000 100000\n"


def test_usage_reads_the_kernels_files(stand_in: StandIn) -> None:
    v2 = started(stand_in)
    path = make_sandbox(stand_in, v2)
    (path / "memory.current").write_text("3211264\n")
    (path / "memory.peak").write_text("67108864\n")
    (path / "cpu.stat").write_text("usage_usec 2512345\nuser_usec 2500000\nsystem_usec 12345\n")
    (path / "pids.current").write_text("7\n")
    (path / "pids.peak").write_text("32\n")
    (path / "memory.events").write_text("low 0\nhigh 0\nmax 12\noom 2\noom_kill 2\n")
    usage = v2.usage(SANDBOX)
    assert usage.memory_current == 3211264
    assert usage.memory_peak == 67108864
    assert usage.cpu_usec == 2512345
    assert (usage.pids_current, usage.pids_peak) == (7, 32)
    assert usage.oom_kills == 2
    (path / "memory.peak").unlink()  # a kernel before 5.19
    assert v2.usage(SANDBOX).memory_peak is None


def test_the_supervisors_oom_count_reads_an_execs_own_leaf(stand_in: StandIn) -> None:
    v2 = started(stand_in)
    path = make_sandbox(stand_in, v2)
    placement = v2.create(SANDBOX, Limits(memory_bytes=64 * MiB))
    stand_in.mkdir(path / "ex_1")
    (path / "ex_1" / "memory.events").write_text("max 3\noom 1\noom_kill 1\noom_group_kill 0\n")
    held = cgroups.SandboxCgroups.open(str(path), placement.memory, placement.memory_per_exec)
    try:
        assert held.memory == held.tree and held.memory_per_exec
        assert held.oom_kills("ex_1") == 1
        assert held.oom_kills("init") == 0
    finally:
        os.close(held.tree)
