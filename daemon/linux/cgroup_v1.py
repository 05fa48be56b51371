"""Limits on cgroup v1: a directory per sandbox in each controller's own hierarchy.

Runs in: the daemon (host root). V1/C is where the hierarchy of controller C is mounted
(/sys/fs/cgroup/memory, ...); co-mounted controllers (cpu,cpuacct) share one directory:

    V1/memory/NAME/SANDBOX         memory.limit_in_bytes, memory.memsw.limit_in_bytes
    V1/pids/NAME/SANDBOX           pids.max
    V1/cpu/NAME/SANDBOX            cpu.cfs_quota_us per cpu.cfs_period_us
    V1/cpuacct/NAME/SANDBOX        cpuacct.usage, for the stats

Process A joins them all, together with the cgroup2 tree's init leaf, before it forks.
There are no per-exec leaves here: a v1 memory cgroup counts OOM kills of its own members
only, so leaves would take their kills with them when removed; the sandbox's one count stays
whole, and tells an exec's OOM kill well enough (see the README's Limits).
Teardown kills through the cgroup2 tree, which holds the same processes: a forking process
cannot slip out of cgroup.kill, so no freezer is needed; once the tree is empty so are these,
and they are rmdir'd.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Literal

from daemon.errors import Invalid
from daemon.linux import cgroups
from daemon.linux.limits import CPU_PERIOD_USEC, Placement, Usage, cpu_quota, unavailable
from daemon.shapes import Limits

HIERARCHIES = ("memory", "pids", "cpu", "cpuacct")
MOUNTINFO = Path("/proc/self/mountinfo")


class CgroupV1:
    layout: Literal["v1"] = "v1"

    def __init__(self, name: str, mountinfo: Path = MOUNTINFO) -> None:
        self.name = name
        self.mountinfo = mountinfo
        self.roots: dict[str, Path] = {}  # controller → the daemon's directory in its hierarchy

    def start(self) -> None:
        mounts = find_hierarchies(self.mountinfo.read_text())
        self.roots = {controller: mount / self.name for controller, mount in mounts.items()}
        for root in dict.fromkeys(self.roots.values()):
            root.mkdir(exist_ok=True)

    def stop(self) -> None:
        for root in dict.fromkeys(self.roots.values()):
            with contextlib.suppress(OSError):  # sandboxes left in it: they outlive us
                root.rmdir()

    def dirs(self, sandbox_id: str) -> dict[str, Path]:
        return {controller: root / sandbox_id for controller, root in self.roots.items()}

    def check(self, limits: Limits) -> None:
        if missing := unavailable(limits, self.roots):
            names = ", ".join(missing)
            raise Invalid(f"this host mounts no cgroup hierarchy for {names}: no such limit")

    def create(self, sandbox_id: str, limits: Limits) -> Placement:
        dirs = self.dirs(sandbox_id)
        unique = list(dict.fromkeys(dirs.values()))
        for path in unique:
            path.mkdir()
        memory = dirs.get("memory")
        if limits.memory_bytes is not None:
            assert memory is not None  # check() refused it otherwise
            write(memory / "memory.limit_in_bytes", limits.memory_bytes)
            # Memory and swap together: where swap is accounted, it cannot stretch the limit.
            if (memory / "memory.memsw.limit_in_bytes").exists():
                write(memory / "memory.memsw.limit_in_bytes", limits.memory_bytes)
        if limits.pids is not None:
            write(dirs["pids"] / "pids.max", limits.pids)
        if limits.cpus is not None:
            write(dirs["cpu"] / "cpu.cfs_period_us", CPU_PERIOD_USEC)
            write(dirs["cpu"] / "cpu.cfs_quota_us", cpu_quota(limits.cpus))
        return Placement(
            join=[str(path) for path in unique], memory=str(memory) if memory else None
        )

    def usage(self, sandbox_id: str) -> Usage:
        dirs = self.dirs(sandbox_id)
        if not any(path.is_dir() for path in dirs.values()):
            raise FileNotFoundError(f"no cgroup of sandbox {sandbox_id}")
        nothing = Path("/nonexistent")
        memory, pids = dirs.get("memory", nothing), dirs.get("pids", nothing)
        cpu_nsec = cgroups.read_int(dirs.get("cpuacct", nothing) / "cpuacct.usage")
        return Usage(
            memory_current=cgroups.read_int(memory / "memory.usage_in_bytes"),
            memory_peak=cgroups.read_int(memory / "memory.max_usage_in_bytes"),
            cpu_usec=None if cpu_nsec is None else cpu_nsec // 1000,
            pids_current=cgroups.read_int(pids / "pids.current"),
            pids_peak=cgroups.read_int(pids / "pids.peak"),
            oom_kills=cgroups.read_key(memory / "memory.oom_control", "oom_kill"),
        )

    def remove(self, sandbox_id: str) -> None:
        failed: OSError | None = None
        for path in dict.fromkeys(self.dirs(sandbox_id).values()):
            try:
                cgroups.remove_when_empty(path)
            except OSError as exc:
                failed = failed or exc
        if failed is not None:
            raise failed

    def sandboxes(self) -> list[str]:
        found: set[str] = set()
        for root in self.roots.values():
            if root.is_dir():
                found.update(p.name for p in root.iterdir() if p.is_dir())
        return sorted(found)


def find_hierarchies(mountinfo: str) -> dict[str, Path]:
    """Where each controller of HIERARCHIES has its v1 hierarchy mounted (the first mount)."""
    found: dict[str, Path] = {}
    for line in mountinfo.splitlines():
        fields = line.split()
        separator = fields.index("-")
        if fields[separator + 1] != "cgroup":
            continue
        options = fields[separator + 3].split(",")
        for controller in HIERARCHIES:
            if controller in options:
                found.setdefault(controller, Path(fields[4]))
    return found


def write(path: Path, value: int) -> None:
    cgroups.write_file(str(path), str(value).encode())
