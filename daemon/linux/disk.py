"""A sandbox's disk: its writable layers on a tmpfs of its own, of `limits.disk_bytes`.

Runs in: the daemon (host root, host namespaces), from the service's create and teardown.

Each sandbox gets one tmpfs at STATE/sandboxes/ID, mounted before its supervisor is spawned
and holding the upper and work directories of every overlay layer. Its size= is the sandbox's
disk: a write past it fails with ENOSPC inside, and nothing a sandbox writes reaches the host's
disk. The pages are charged to the memory cgroup of the process that writes them, so a
sandbox's files count towards its limits.memory_bytes too. Why a tmpfs rather than a loop
device or project quotas, with the figures: docs/limits.md.

The mount lives in the host's mount namespace, so it outlives a restart of the daemon (the
sandbox's overlay keeps using it, and the pool's take still writes identity files into it);
teardown and the sweep for strays at start unmount it (`unmount`) before removing the directory.
Its run directory (RUN/sandboxes/ID: the mailbox PID 1 writes each exec's output and status
to) is a tmpfs of its own too, mounted and unmounted alike (`mount_run_fs`).
"""

from __future__ import annotations

import errno
from pathlib import Path

from daemon.linux import syscalls as sc

# The kernel's own ratio for a tmpfs (its default nr_inodes is one per page of its default
# size): inodes cost memory that size= does not count, so a sandbox cannot pin more than
# about a quarter beyond its size in empty files.
BYTES_PER_INODE = 4096
_MIN_INODES = 1024
# Mounted twice at most (a create that died between mount and record); more is a bug.
_MAX_STACKED = 8


def tmpfs_options(size: int, mode: str, owner: int | None = None) -> str:
    """mount(2) data for a tmpfs of `size` bytes with a matching inode count."""
    options = f"mode={mode},size={size},nr_inodes={max(_MIN_INODES, size // BYTES_PER_INODE)}"
    return options if owner is None else f"{options},uid={owner},gid={owner}"


def mount_layers_fs(path: Path, size: int) -> None:
    """Mount the sandbox's tmpfs of `size` bytes on the (new, empty) directory `path`."""
    sc.mount("tmpfs", str(path), "tmpfs", sc.MS_NOSUID | sc.MS_NODEV, tmpfs_options(size, "0700"))


def mount_run_fs(path: Path) -> None:
    """Mount a tmpfs on the sandbox's (new, empty) run directory `path`: its mailbox, socket
    and staging root. Each exec leaves a few files there that the daemon reads and removes
    within milliseconds: on a disk's file system every one of those creates and unlinks is a
    journal entry, on a tmpfs a few pointer moves. No size= of its own: what PID 1 writes
    there is bounded by the output limits, and charged to the sandbox's memory cgroup."""
    sc.mount("tmpfs", str(path), "tmpfs", sc.MS_NOSUID | sc.MS_NODEV | sc.MS_NOEXEC, "mode=0700")


def unmount(path: Path) -> None:
    """Unmount whatever is mounted on `path` (nothing, once or stacked); a missing or plain
    directory is no error. Lazily: the overlay of a dying sandbox may still hold it for a
    moment, and its pages are freed when the last user lets go."""
    for _ in range(_MAX_STACKED):
        try:
            sc.umount2(str(path), sc.MNT_DETACH)
        except OSError as exc:
            if exc.errno in (errno.EINVAL, errno.ENOENT):  # not a mount point (any more)
                return
            raise
