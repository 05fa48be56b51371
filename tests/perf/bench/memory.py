"""What memory costs: the host's MemAvailable, its kernel's share, the PSS of processes.

Runs in: the bench's process, on the daemon's host (it reads /proc); as root to read the
smaps of processes that are not its own. PSS (proportional set size) splits each shared page
among the processes that map it, so the PSS of a zygote and its forks adds up to what they
really cost, where RSS would count every shared page once per process.
"""

from __future__ import annotations

import contextlib
import os
import statistics
import time
from collections.abc import Iterable
from pathlib import Path

KIB_PER_MIB = 1024


def meminfo() -> dict[str, int]:
    """/proc/meminfo in KiB, by field name."""
    fields = {}
    for line in Path("/proc/meminfo").read_text().splitlines():
        name, _, rest = line.partition(":")
        fields[name] = int(rest.split()[0])
    return fields


def mem_available_kib(reads: int = 5, interval: float = 0.05) -> float:
    """The median of a few reads of MemAvailable: other work on the host makes it jitter."""
    values = []
    for i in range(reads):
        if i:
            time.sleep(interval)
        values.append(meminfo()["MemAvailable"])
    return statistics.median(values)


def kernel_kib() -> int:
    """Memory the kernel holds for objects (slab), stacks and page tables."""
    info = meminfo()
    return info["Slab"] + info["KernelStack"] + info["PageTables"]


def pss_kib(pids: Iterable[int]) -> tuple[int, int]:
    """The summed PSS of `pids` in KiB, and how many of them could be read."""
    total = counted = 0
    for pid in pids:
        with contextlib.suppress(OSError, ValueError):
            total += _rollup_field(pid, "Pss")
            counted += 1
    return total, counted


def _rollup_field(pid: int, name: str) -> int:
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        if line.startswith(name + ":"):
            return int(line.split()[1])
    raise ValueError(f"no {name} in /proc/{pid}/smaps_rollup")


def children(pid: int) -> list[int]:
    """The direct children of `pid` (of any of its threads)."""
    found: list[int] = []
    with contextlib.suppress(OSError):
        for task in os.listdir(f"/proc/{pid}/task"):
            with contextlib.suppress(OSError):
                text = Path(f"/proc/{pid}/task/{task}/children").read_text()
                found.extend(int(p) for p in text.split())
    return found


def descendants(pid: int) -> list[int]:
    """Every process below `pid` that is still its descendant (not reparented away)."""
    found, queue = [], children(pid)
    while queue:
        child = queue.pop()
        found.append(child)
        queue.extend(children(child))
    return found


def is_local(pid: int) -> bool:
    return Path(f"/proc/{pid}").exists()
