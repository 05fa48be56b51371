"""Cgroups: which layout the host has, and the cgroup2 tree that tracks every sandbox process.

Whatever controllers a host mounts where, a cgroup2 hierarchy is always there to be had (the
whole of /sys/fs/cgroup on a modern host, /sys/fs/cgroup/unified on a hybrid one, or one we
mount ourselves), and its core needs no controller: membership that no process can leave
without host root, `cgroup.kill`, and `cgroup.events` telling when a group empties. sandboxd
keeps each sandbox's processes in it, one leaf per exec, so an exec's deadline kills the exec's
whole tree, setsid'd and orphaned processes included:

    CGROUP2/NAME/SANDBOX/init        the supervisor (joined before it is forked)
    CGROUP2/NAME/SANDBOX/EXEC        each exec and whatever it starts ("main": the main cmd)

With `cgroup_parent = "delegated"` (a systemd unit with Delegate=yes) the tree goes where the
service manager put the daemon, OWN (read from /proc/self/cgroup), which is the daemon's to
manage and nobody else's. v2 lets a cgroup that hands controllers to its children hold no
process itself, so the daemon first moves into a leaf of its own:

    CGROUP2/OWN/daemon               the daemon, and the zygotes it forks
    CGROUP2/OWN/sandboxes/SANDBOX/…  as above

Limits and usage live where the controllers are: daemon/linux/limits.py is the interface, with
daemon/linux/cgroup_v2.py (limits on the same directories) and daemon/linux/cgroup_v1.py
(directories of
their own in each v1 hierarchy) behind it. The helpers at the end serve the supervisor, which
reaches all of a sandbox's cgroups only through fds opened before pivot_root (`SandboxCgroups`).
"""

from __future__ import annotations

import contextlib
import errno
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from daemon.linux import syscalls

CGROUP_ROOT = Path("/sys/fs/cgroup")
INIT_LEAF = "init"
DAEMON_LEAF = "daemon"
DELEGATED_TREE = "sandboxes"


class NotDelegated(Exception):
    """`cgroup_parent = "delegated"`, but the daemon has no cgroup2 subtree to manage."""


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


def own_cgroup() -> Path:
    """The daemon's own directory in the cgroup2 hierarchy: what a service manager that
    delegates (systemd's Delegate=yes) hands to it; its parent if that is a leaf named
    `daemon`. NotDelegated if there is none."""
    mount = find_cgroup2()
    if mount is None:
        raise NotDelegated("this host mounts no cgroup2 hierarchy")
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        if line.startswith("0::"):
            relative = line.removeprefix("0::").strip().lstrip("/")
            break
    else:
        raise NotDelegated("the daemon is in no cgroup2 cgroup (see /proc/self/cgroup)")
    if not relative:
        raise NotDelegated(
            "the daemon runs in the root cgroup, so nothing was delegated to it: start it "
            "from its systemd unit (Delegate=yes), or set cgroup_parent = root"
        )
    own = mount / relative
    # Started in its leaf already (systemd's DelegateSubgroup=daemon: how a restart gets
    # past OWN's controllers, which make OWN itself refuse a process).
    return own.parent if own.name == DAEMON_LEAF else own


class ProcessTree:
    """The daemon's cgroup2 subtree: one directory per sandbox, one leaf per exec in it."""

    def __init__(self, name: str, run_dir: Path, *, delegated: bool = False) -> None:
        self.name = name
        self.own_mount = run_dir / "cgroup2"
        self.delegated = delegated
        self.root = Path()

    def start(self) -> None:
        if self.delegated:
            own = own_cgroup()
            # The daemon into a leaf, first: then OWN holds no process, and may enable
            # controllers for the sandboxes' tree (the threads move with it).
            (own / DAEMON_LEAF).mkdir(exist_ok=True)
            write_file(str(own / DAEMON_LEAF / "cgroup.procs"), b"0")
            self.root = own / DELEGATED_TREE
            self.root.mkdir(exist_ok=True)
            return
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
        remove_when_empty(path, timeout)

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


def remove_when_empty(path: Path, timeout: float = 2.0) -> None:
    """remove_tree, retrying while the kernel still counts a dying process in it (EBUSY)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            remove_tree(path)
            return
        except FileNotFoundError:
            return
        except OSError as exc:
            if exc.errno != errno.EBUSY or time.monotonic() > deadline:
                raise
            time.sleep(0.001)  # a dying process takes a moment; so does a busy host


def read_int(path: Path) -> int | None:
    """A cgroup file holding one number ("max" and a missing file are None)."""
    try:
        text = path.read_text().strip()
    except FileNotFoundError:
        return None
    return int(text) if text.lstrip("-").isdigit() else None


def read_key(path: Path, key: str) -> int | None:
    """The number after `key` in a flat-keyed cgroup file (cpu.stat, memory.events, ...)."""
    try:
        return parse_key(path.read_text(), key)
    except FileNotFoundError:
        return None


def parse_key(text: str, key: str) -> int | None:
    for line in text.splitlines():
        name, _, value = line.partition(" ")
        if name == key and value.strip().isdigit():
            return int(value)
    return None


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


# -- the supervisor's side: a sandbox's cgroups as fds ----------------------------------------

# Where the OOM killer's count lives: memory.events on cgroup v2, memory.oom_control on v1.
OOM_COUNTERS = ("memory.events", "memory.oom_control")


@dataclass
class SandboxCgroups:
    """A sandbox's cgroups as the supervisor holds them: fds, opened by A before pivot_root
    (after it no host path can be opened, nor should be)."""

    tree: int  # its directory in the cgroup2 tree: exec leaves, cgroup.kill, cgroup.events
    memory: int | None  # its memory cgroup, which counts OOM kills (None: no controller)
    memory_per_exec: bool  # the memory cgroup is the tree: each exec leaf counts its own

    @classmethod
    def open(cls, tree: str, memory: str | None, memory_per_exec: bool) -> SandboxCgroups:
        flags = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC
        tree_fd = os.open(tree, flags)
        memory_fd = tree_fd if memory == tree else None
        if memory is not None and memory_fd is None:
            memory_fd = os.open(memory, flags)
        return cls(tree_fd, memory_fd, memory_per_exec and memory_fd == tree_fd)

    def fds(self) -> set[int]:
        return {self.tree} | ({self.memory} if self.memory is not None else set())

    def make_leaf(self, name: str) -> None:
        os.mkdir(name, dir_fd=self.tree)

    def join_leaf(self, name: str) -> None:
        """Move the calling process into the leaf `name`."""
        write_file(f"{name}/cgroup.procs", b"0", dir_fd=self.tree)

    def fork_into_leaf(self, name: str) -> tuple[int, bool]:
        """Fork a child born in the leaf `name`: (0 in the child, else its pid; whether it
        is in the leaf already, or must join it, on a kernel without clone3's cgroup)."""
        return fork_into(name, self.tree)

    def remove_leaf(self, name: str) -> bool:
        """rmdir the leaf if it is empty; whether it is gone."""
        try:
            os.rmdir(name, dir_fd=self.tree)
        except FileNotFoundError:
            pass
        except OSError:
            return False
        return True

    def oom_kills(self, leaf: str) -> int:
        """The OOM killer's count for the exec in `leaf`: its own on cgroup v2 (the count is
        hierarchical there, so its whole tree's); the sandbox's on v1, where each memory
        cgroup counts only its own members and the exec has none of its own."""
        if self.memory is None:
            return 0
        directory = f"{leaf}/" if self.memory_per_exec else ""
        for counter in OOM_COUNTERS:
            try:
                fd = os.open(directory + counter, os.O_RDONLY | os.O_CLOEXEC, dir_fd=self.memory)
            except FileNotFoundError:
                continue
            try:
                return parse_key(os.read(fd, 4096).decode(), "oom_kill") or 0
            finally:
                os.close(fd)
        return 0


def fork_into(cgroup: str, dir_fd: int | None = None) -> tuple[int, bool]:
    """Fork, the child born in the cgroup2 directory `cgroup` (see syscalls.fork_into_cgroup):
    (0 in the child, else its pid; whether the child is in it already). A kernel before 5.7
    has no CLONE_INTO_CGROUP: then a plain fork, and the child must join by itself."""
    fd = os.open(cgroup, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=dir_fd)
    try:
        return syscalls.fork_into_cgroup(fd), True
    except OSError as exc:
        if exc.errno not in (errno.ENOSYS, errno.E2BIG, errno.EINVAL):
            raise
        return os.fork(), False
    finally:
        os.close(fd)
