"""Which cgroup layout the host has: v2 (unified), v1 (per-controller hierarchies), or none."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

CGROUP_ROOT = Path("/sys/fs/cgroup")


def detect_layout(root: Path = CGROUP_ROOT) -> Literal["v1", "v2"] | None:
    """v2 when the unified hierarchy at the root has the memory controller; else v1 if a
    memory hierarchy is mounted; else None. A hybrid host (v1 controllers beside a nearly
    empty v2 mount at unified/) is v1: that is where the controllers are.
    """
    controllers = root / "cgroup.controllers"
    if controllers.exists() and "memory" in controllers.read_text().split():
        return "v2"
    if (root / "memory" / "memory.limit_in_bytes").exists():
        return "v1"
    return None
