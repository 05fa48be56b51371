"""Cgroups: which layout the host has, and the cgroup2 tree that tracks every sandbox process.

Whatever controllers a host mounts where, a cgroup2 hierarchy is always there to be had (the
whole of /sys/fs/cgroup on a modern host, /sys/fs/cgroup/unified on a hybrid one, or one we
mount ourselves), and its core needs no controller: membership that no process can leave
without host root, `cgroup.kill`, and `cgroup.events` telling when a group empties. sandboxd
keeps each sandbox's processes in it, one leaf per exec, so an exec's deadline kills the exec's
whole tree, setsid'd and orphaned processes included:

    CGROUP2/NAME/SANDBOX/init        the supervisor (joined before it is forked)
    CGROUP2/NAME/SANDBOX/EXEC        each exec and whatever it starts ("main": the main cmd)
"""

from __future__ import annotations

import contextlib
import errno
import os
import time
from pathlib import Path
from typing import Literal

from daemon import syscalls

CGROUP_ROOT = Path("/sys/fs/cgroup")
INIT_LEAF = "init"


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


def find_cgroup2() -> Path | None:
    """Where the host's cgroup2 hierarchy is mounted, if anywhere."""
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            separator = fields.index("-")
            if fields[separator + 1] == "cgroup2":
                return Path(fields[4])
    return None


class ProcessTree:
    """The daemon's cgroup2 subtree: one directory per sandbox, one leaf per exec in it."""

    def __init__(self, name: str, run_dir: Path) -> None:
        self.name = name
        self.own_mount = run_dir / "cgroup2"
        self.root = Path()

    def start(self) -> None:
        mount = find_cgroup2()
        if mount is None:  # a v1-only host: a hierarchy of our own, without controllers
            self.own_mount.mkdir(mode=0o700, exist_ok=True)
            syscalls.mount("cgroup2", str(self.own_mount), "cgroup2", syscalls.MS_NOSUID)
            mount = self.own_mount
        self.root = mount / self.name
        self.root.mkdir(exist_ok=True)

    def stop(self) -> None:
        """Remove the daemon's directory if no sandbox is left in it (they outlive us)."""
        with contextlib.suppress(OSError):
            self.root.rmdir()
        if self.own_mount.is_mount() and not self.root.exists():
            syscalls.umount2(str(self.own_mount), syscalls.MNT_DETACH)

    def path(self, sandbox_id: str) -> Path:
        return self.root / sandbox_id

    def create(self, sandbox_id: str) -> Path:
        path = self.path(sandbox_id)
        path.mkdir()
        (path / INIT_LEAF).mkdir()
        return path

    def kill(self, sandbox_id: str) -> None:
        """SIGKILL every process of the sandbox at once: none can fork its way out."""
        with contextlib.suppress(FileNotFoundError):
            (self.path(sandbox_id) / "cgroup.kill").write_text("1")

    def remove(self, sandbox_id: str, timeout: float = 2.0) -> None:
        """Remove the sandbox's directory and leaves once their processes are gone."""
        path = self.path(sandbox_id)
        if not path.exists():
            return
        self.kill(sandbox_id)
        deadline = time.monotonic() + timeout
        while True:
            try:
                remove_tree(path)
                return
            except OSError as exc:
                if exc.errno != errno.EBUSY or time.monotonic() > deadline:
                    raise
                time.sleep(0.005)

    def sandboxes(self) -> list[str]:
        if not self.root.is_dir():
            return []
        return [p.name for p in self.root.iterdir() if p.is_dir()]


def remove_tree(path: Path) -> None:
    """rmdir a cgroup and its descendants, deepest first (cgroup files cannot be unlinked)."""
    for child in path.iterdir():
        if child.is_dir():
            remove_tree(child)
    os.rmdir(path)


def populated(dir_fd: int, leaf: str) -> bool:
    """Whether any process is left in `leaf` (a cgroup under dir_fd) or below it."""
    try:
        fd = os.open(f"{leaf}/cgroup.events", os.O_RDONLY | os.O_CLOEXEC, dir_fd=dir_fd)
    except FileNotFoundError:
        return False
    try:
        return b"populated 1" in os.read(fd, 4096)
    finally:
        os.close(fd)


def write_file(name: str, value: bytes, dir_fd: int | None = None) -> None:
    """One write(2) to a cgroup file (they take a whole value per write)."""
    fd = os.open(name, os.O_WRONLY | os.O_CLOEXEC, dir_fd=dir_fd)
    try:
        os.write(fd, value)
    finally:
        os.close(fd)
