"""Resource limits and usage of sandboxes through cgroups: one interface, one module per layout.

    daemon/linux/cgroup_v2.py   the unified hierarchy: memory.max, pids.max and cpu.max on the
                          sandbox's own directory of the cgroup2 tree
                          (daemon.linux.cgroups.ProcessTree)
    daemon/linux/cgroup_v1.py   a hierarchy per controller: a directory per sandbox in each of
                          memory, pids, cpu and cpuacct, joined beside the cgroup2 tree

The daemon picks one at start from the host's layout (`for_layout`). Either way a sandbox's
first process joins every cgroup of the sandbox before it forks anything, so the supervisor
and all that follows are bounded from their first instruction; membership, deadlines and
teardown stay with the cgroup2 tree, which every host has.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Literal, Protocol

from daemon.errors import Invalid
from daemon.linux import cgroups
from daemon.shapes import Limits

Layout = Literal["v1", "v2"]
CPU_PERIOD_USEC = 100_000  # cpus times this is the quota per period (cpu.max, cpu.cfs_quota_us)


@dataclass(frozen=True)
class Placement:
    """Where a new sandbox's processes go beyond its cgroup2 directory (see SpawnRequest)."""

    join: list[str] = field(default_factory=list)  # A joins these with the cgroup2 init leaf
    memory: str | None = None  # the sandbox's memory cgroup: it counts OOM kills
    memory_per_exec: bool = False  # and each exec's leaf in it counts its own


@dataclass(frozen=True)
class Usage:
    """What a sandbox's cgroups say about it now; None where this host cannot tell."""

    memory_current: int | None = None
    memory_peak: int | None = None
    cpu_usec: int | None = None
    pids_current: int | None = None
    pids_peak: int | None = None
    oom_kills: int | None = None


class ResourceControl(Protocol):
    """What the service needs of a layout: make, limit, read and remove a sandbox's cgroups."""

    @property
    def layout(self) -> Layout | None:
        """Which layout this is, as GET /info reports it."""

    def start(self) -> None:
        """Make the daemon's own cgroups (where the sandboxes' go) and enable controllers."""

    def stop(self) -> None:
        """Remove the daemon's own cgroups if no sandbox is left in them."""

    def check(self, limits: Limits) -> None:
        """Raise Invalid if this host cannot enforce `limits`."""

    def create(self, sandbox_id: str, limits: Limits) -> Placement:
        """Make the sandbox's cgroups (its cgroup2 directory exists already) with its limits."""

    def usage(self, sandbox_id: str) -> Usage:
        """Read the sandbox's usage; FileNotFoundError if its cgroups are gone."""

    def remove(self, sandbox_id: str) -> None:
        """Remove what create made, once the processes are gone (the cgroup2 tree kills)."""

    def sandboxes(self) -> list[str]:
        """The sandboxes that have cgroups here (to find strays at start)."""


class NoControllers:
    """A host without a memory controller anywhere: no limits, and only cgroup2's cpu.stat."""

    layout: Layout | None = None

    def __init__(self, tree: cgroups.ProcessTree) -> None:
        self.tree = tree

    def start(self) -> None:
        pass

    def stop(self) -> None:
        pass

    def check(self, limits: Limits) -> None:
        if limits.model_copy(update={"disk_bytes": None}) != Limits():  # no cgroup for disk
            raise Invalid("this host has no cgroup controllers for memory, pids or cpu")

    def create(self, sandbox_id: str, limits: Limits) -> Placement:
        return Placement()

    def usage(self, sandbox_id: str) -> Usage:
        path = self.tree.path(sandbox_id)
        if not path.is_dir():
            raise FileNotFoundError(path)
        return Usage(cpu_usec=cgroups.read_key(path / "cpu.stat", "usage_usec"))

    def remove(self, sandbox_id: str) -> None:
        pass

    def sandboxes(self) -> list[str]:
        return []


def for_layout(layout: Layout | None, tree: cgroups.ProcessTree) -> ResourceControl:
    # Imported here: both modules import this one's types.
    from daemon.linux import cgroup_v1, cgroup_v2

    if layout == "v2":
        return cgroup_v2.CgroupV2(tree)
    if layout == "v1":
        return cgroup_v1.CgroupV1(tree.name)
    return NoControllers(tree)


def with_disk(limits: Limits, default: int) -> Limits:
    """`limits` as applied: with the daemon's default disk_bytes if it gives none, or half
    its memory_bytes if less (its files are charged to its memory: daemon/linux/disk.py)."""
    if limits.disk_bytes is not None:
        return limits
    if limits.memory_bytes is not None:
        default = min(default, limits.memory_bytes // 2)
    return limits.model_copy(update={"disk_bytes": default})


def check_cpus(limits: Limits) -> None:
    """More cpus than the daemon may run on would limit nothing (Docker refuses it too)."""
    available = len(os.sched_getaffinity(0))
    if limits.cpus is not None and limits.cpus > available:
        raise Invalid(f"limits.cpus {limits.cpus} is more than the {available} CPUs of this host")


def cpu_quota(cpus: float) -> int:
    """Microseconds of CPU time per CPU_PERIOD_USEC (the kernel's minimum is 1000)."""
    return max(1000, round(cpus * CPU_PERIOD_USEC))


def unavailable(limits: Limits, available: Iterable[str]) -> list[str]:
    """The controllers `limits` asks for that are not in `available`."""
    wanted = {"memory": limits.memory_bytes, "pids": limits.pids, "cpu": limits.cpus}
    have = set(available)
    return [name for name, value in wanted.items() if value is not None and name not in have]
