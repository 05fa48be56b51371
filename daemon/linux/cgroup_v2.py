"""Limits on cgroup v2: the controllers sit on the sandbox's own directory of the cgroup2 tree.

Runs in: the daemon (host root). The directories are daemon.linux.cgroups.ProcessTree's:

    CGROUP2/NAME                  cgroup.subtree_control +memory +pids +cpu
    CGROUP2/NAME/SANDBOX          memory.max, memory.swap.max, pids.max, cpu.max; and
                                  cgroup.subtree_control +memory +pids +cpu, so that
    CGROUP2/NAME/SANDBOX/init     the supervisor's leaf, and
    CGROUP2/NAME/SANDBOX/EXEC     each exec's, count memory and OOM kills of their own

Processes live only in the leaves, so v2's rule that a cgroup which hands controllers to its
children holds no process itself is kept by construction.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterable
from pathlib import Path
from typing import Literal

from daemon.errors import Invalid
from daemon.linux import cgroups
from daemon.linux.limits import CPU_PERIOD_USEC, Placement, Usage, cpu_quota, unavailable
from daemon.shapes import Limits

log = logging.getLogger(__name__)

CONTROLLERS = ("memory", "pids", "cpu")


class CgroupV2:
    layout: Literal["v2"] = "v2"

    def __init__(self, tree: cgroups.ProcessTree) -> None:
        self.tree = tree
        self.controllers: frozenset[str] = frozenset()

    def start(self) -> None:
        root = self.tree.root
        missing = [name for name in CONTROLLERS if name not in available(root)]
        if missing:  # a host whose init enabled none at the top: we need them one level up
            enable(root.parent, missing)
        self.controllers = enable(root, CONTROLLERS)
        if len(self.controllers) < len(CONTROLLERS):
            log.warning(
                "cgroup2 at %s gives sandboxd only %s: limits on the others are refused",
                root,
                sorted(self.controllers) or "no controller",
            )

    def stop(self) -> None:
        pass  # the ProcessTree removes the directories

    def check(self, limits: Limits) -> None:
        if missing := unavailable(limits, self.controllers):
            names = ", ".join(missing)
            raise Invalid(f"this host's cgroup2 tree gives sandboxd no {names} controller")

    def create(self, sandbox_id: str, limits: Limits) -> Placement:
        path = self.tree.path(sandbox_id)
        enable(path, self.controllers)  # for its leaves: an exec's own memory.events
        if limits.memory_bytes is not None:
            write(path / "memory.max", limits.memory_bytes)
            if (path / "memory.swap.max").exists():  # swap must not stretch the limit
                write(path / "memory.swap.max", 0)
        if limits.pids is not None:
            write(path / "pids.max", limits.pids)
        if limits.cpus is not None:
            write(path / "cpu.max", f"{cpu_quota(limits.cpus)} {CPU_PERIOD_USEC}")
        if "memory" not in self.controllers:
            return Placement()
        return Placement(memory=str(path), memory_per_exec=True)

    def usage(self, sandbox_id: str) -> Usage:
        path = self.tree.path(sandbox_id)
        if not path.is_dir():
            raise FileNotFoundError(path)
        return Usage(
            memory_current=cgroups.read_int(path / "memory.current"),
            memory_peak=cgroups.read_int(path / "memory.peak"),  # Linux 5.19 and later
            cpu_usec=cgroups.read_key(path / "cpu.stat", "usage_usec"),
            pids_current=cgroups.read_int(path / "pids.current"),
            pids_peak=cgroups.read_int(path / "pids.peak"),
            oom_kills=cgroups.read_key(path / "memory.events", "oom_kill"),
        )

    def remove(self, sandbox_id: str) -> None:
        pass  # the same directories as the ProcessTree's, which removes them

    def sandboxes(self) -> list[str]:
        return []


def available(cgroup: Path) -> set[str]:
    """The controllers `cgroup` may hand to its children (its parent enabled them for it)."""
    return set((cgroup / "cgroup.controllers").read_text().split())


def enable(cgroup: Path, wanted: Iterable[str]) -> frozenset[str]:
    """Enable what it can of `wanted` for the children of `cgroup`; return what is enabled.

    One write per controller, so that one refused (EBUSY: the cgroup holds processes itself;
    EINVAL or ENOENT: not available) does not keep the others off.
    """
    wanted = list(wanted)
    control = cgroup / "cgroup.subtree_control"
    enabled = set(control.read_text().split())
    for name in wanted:
        if name not in enabled and name in available(cgroup):
            with contextlib.suppress(OSError):
                cgroups.write_file(str(control), f"+{name}".encode())
    enabled = set(control.read_text().split())
    return frozenset(name for name in wanted if name in enabled)


def write(path: Path, value: int | str) -> None:
    cgroups.write_file(str(path), str(value).encode())
