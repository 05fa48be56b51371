"""The Linux system calls Python's os module lacks, by ctypes: mounts, namespaces, pidfds,
capabilities and seccomp.

Python 3.11 has no unshare/setns, and no Python version has mount, pivot_root, open_tree,
mount_setattr or move_mount, nor the AT_EMPTY_PATH forms of linkat, fchownat and utimensat
(which act on the inode an O_PATH fd holds, a symlink included, never on a name). Each
wrapper raises OSError with the errno, like os does.
"""

from __future__ import annotations

import ctypes
import os
import platform
from collections.abc import Iterator

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long

# The syscalls added since 5.x share one number on every architecture; the older ones do not.
_ARCH_NUMBERS = {
    "x86_64": {"pivot_root": 155, "unshare": 272, "setns": 308, "renameat2": 316},
    "aarch64": {"pivot_root": 41, "unshare": 97, "setns": 268, "renameat2": 276},
}
_NR = {
    **_ARCH_NUMBERS[platform.machine()],
    "pidfd_send_signal": 424,
    "clone3": 435,
    "open_tree": 428,
    "move_mount": 429,
    "close_range": 436,
    "mount_setattr": 442,
    "openat2": 437,
}

CLONE_NEWNS = 0x00020000
CLONE_NEWCGROUP = 0x02000000
CLONE_NEWUTS = 0x04000000
CLONE_NEWIPC = 0x08000000
CLONE_NEWUSER = 0x10000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000

NAMESPACE_FLAGS = {
    "mnt": CLONE_NEWNS,
    "uts": CLONE_NEWUTS,
    "ipc": CLONE_NEWIPC,
    "user": CLONE_NEWUSER,
    "pid": CLONE_NEWPID,
    "net": CLONE_NEWNET,
}

MS_RDONLY = 1
MS_NOSUID = 2
MS_NODEV = 4
MS_NOEXEC = 8
MS_REMOUNT = 32
MS_BIND = 4096
MS_REC = 16384
MS_PRIVATE = 1 << 18

MNT_DETACH = 2

AT_FDCWD = -100
AT_SYMLINK_NOFOLLOW = 0x100
AT_EMPTY_PATH = 0x1000
AT_RECURSIVE = 0x8000
OPEN_TREE_CLONE = 1
OPEN_TREE_CLOEXEC = os.O_CLOEXEC
MOVE_MOUNT_F_EMPTY_PATH = 0x4

MOUNT_ATTR_RDONLY = 0x1
MOUNT_ATTR_IDMAP = 0x100000

# openat2(2)'s resolve flags, and renameat2(2)'s
RESOLVE_NO_XDEV = 0x01
RESOLVE_NO_MAGICLINKS = 0x02
RESOLVE_NO_SYMLINKS = 0x04
RESOLVE_BENEATH = 0x08
RESOLVE_IN_ROOT = 0x10
RENAME_NOREPLACE = 1

PR_SET_PDEATHSIG = 1
PR_SET_NAME = 15
PR_SET_DUMPABLE = 4
PR_SET_SECCOMP = 22
PR_CAPBSET_DROP = 24
PR_SET_NO_NEW_PRIVS = 38
PR_CAP_AMBIENT = 47
PR_CAP_AMBIENT_CLEAR_ALL = 4

SECCOMP_MODE_FILTER = 2
_LINUX_CAPABILITY_VERSION_3 = 0x20080522


class _MountAttr(ctypes.Structure):
    _fields_ = [
        ("attr_set", ctypes.c_uint64),
        ("attr_clr", ctypes.c_uint64),
        ("propagation", ctypes.c_uint64),
        ("userns_fd", ctypes.c_uint64),
    ]


class _OpenHow(ctypes.Structure):
    _fields_ = [("flags", ctypes.c_uint64), ("mode", ctypes.c_uint64), ("resolve", ctypes.c_uint64)]


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [
        ("effective", ctypes.c_uint32),
        ("permitted", ctypes.c_uint32),
        ("inheritable", ctypes.c_uint32),
    ]


class SockFprog(ctypes.Structure):
    """struct sock_fprog: a BPF program (`len` instructions of 8 bytes) at `filter`."""

    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]


def _check(result: int, what: str) -> int:
    if result < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")
    return result


def _path(path: str | None) -> bytes | None:
    return None if path is None else os.fsencode(path)


def mount(
    source: str | None, target: str, fstype: str | None, flags: int = 0, data: str | None = None
) -> None:
    result = _libc.mount(_path(source), _path(target), _path(fstype), flags, _path(data))
    _check(result, f"mount {fstype or source} on {target}")


def umount2(target: str, flags: int = 0) -> None:
    _check(_libc.umount2(_path(target), flags), f"umount {target}")


def pivot_root(new_root: str, put_old: str) -> None:
    result = _libc.syscall(_NR["pivot_root"], _path(new_root), _path(put_old))
    _check(result, f"pivot_root {new_root}")


def unshare(flags: int) -> None:
    _check(_libc.syscall(_NR["unshare"], flags), "unshare")


def setns(fd: int, nstype: int = 0) -> None:
    _check(_libc.syscall(_NR["setns"], fd, nstype), "setns")


def open_tree(path: str, flags: int, dirfd: int = AT_FDCWD) -> int:
    result = _libc.syscall(_NR["open_tree"], dirfd, _path(path), flags)
    return _check(result, f"open_tree {path}")


def mount_setattr(fd: int, attr_set: int, userns_fd: int = 0, recursive: bool = False) -> None:
    attr = _MountAttr(attr_set=attr_set, attr_clr=0, propagation=0, userns_fd=userns_fd)
    flags = AT_EMPTY_PATH | (AT_RECURSIVE if recursive else 0)
    result = _libc.syscall(
        _NR["mount_setattr"], fd, b"", flags, ctypes.byref(attr), ctypes.sizeof(attr)
    )
    _check(result, "mount_setattr")


def move_mount(fd: int, target: str) -> None:
    result = _libc.syscall(
        _NR["move_mount"], fd, b"", AT_FDCWD, _path(target), MOVE_MOUNT_F_EMPTY_PATH
    )
    _check(result, f"move_mount to {target}")


def openat2(dirfd: int, path: str, flags: int, mode: int, resolve: int) -> int:
    """openat(2) with `resolve` flags (RESOLVE_IN_ROOT: `path` is looked up as if `dirfd`
    were the root, symlinks and `..` included); O_CLOEXEC is always added."""
    how = _OpenHow(flags=flags | os.O_CLOEXEC, mode=mode, resolve=resolve)
    size = ctypes.sizeof(how)
    result = _libc.syscall(_NR["openat2"], dirfd, _path(path), ctypes.byref(how), size)
    return _check(result, f"openat2 {path}")


def renameat2(olddirfd: int, old: str, newdirfd: int, new: str, flags: int = 0) -> None:
    result = _libc.syscall(_NR["renameat2"], olddirfd, _path(old), newdirfd, _path(new), flags)
    _check(result, f"rename {old} to {new}")


def link_fd(fd: int, newdirfd: int, new: str) -> None:
    """A new name `new` in `newdirfd` for the inode `fd` holds (needs CAP_DAC_READ_SEARCH)."""
    _check(_libc.linkat(fd, b"", newdirfd, _path(new), AT_EMPTY_PATH), f"link {new}")


def chown_fd(fd: int, uid: int, gid: int) -> None:
    """The owner of the inode `fd` holds, also for an O_PATH fd (of a symlink or FIFO)."""
    flags = AT_EMPTY_PATH | AT_SYMLINK_NOFOLLOW
    _check(_libc.fchownat(fd, b"", uid, gid, flags), "chown")


class _Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


def utime_fd(fd: int, atime: int, mtime: int) -> None:
    """The times of the inode `fd` holds, also for an O_PATH fd (of a symlink or FIFO)."""
    times = (_Timespec * 2)(_Timespec(atime, 0), _Timespec(mtime, 0))
    flags = AT_EMPTY_PATH | AT_SYMLINK_NOFOLLOW
    _check(_libc.utimensat(fd, b"", times, flags), "utime")


def close_range(first: int, last: int = 0xFFFFFFFF) -> None:
    _check(_libc.syscall(_NR["close_range"], first, last, 0), "close_range")


def exited_children() -> Iterator[tuple[int, int]]:
    """(pid, wait status) of each child that has exited, collected without waiting."""
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        yield pid, status


def close_all_but(keep: set[int], first: int = 3) -> None:
    """Close every fd from `first` on but those in `keep`: one close_range per gap, not a
    close per open fd (a zygote holds hundreds: its kept user namespaces)."""
    low = first
    for fd in sorted(fd for fd in keep if fd >= first):
        if fd > low:
            close_range(low, fd - 1)
        low = fd + 1
    close_range(low)


def pidfd_send_signal(pidfd: int, sig: int) -> None:
    _check(_libc.syscall(_NR["pidfd_send_signal"], pidfd, sig, None, 0), "pidfd_send_signal")


def prctl(option: int, arg: int) -> None:
    _check(_libc.prctl(option, ctypes.c_ulong(arg), 0, 0, 0), "prctl")


class CapabilitySets:
    """The arguments of capset(2), each set a mask with bit N for capability N. Built once,
    set by apply() with one call: a freshly forked child pays for every Python object it makes.
    """

    def __init__(self, effective: int, permitted: int, inheritable: int) -> None:
        self._header = _CapHeader(_LINUX_CAPABILITY_VERSION_3, 0)
        words = [
            [(mask >> shift) & 0xFFFFFFFF for mask in (effective, permitted, inheritable)]
            for shift in (0, 32)
        ]
        self._data = (_CapData * 2)(*(_CapData(*word) for word in words))
        self._capset = _libc.capset  # looked up now: ctypes' first lookup costs 0.1 ms

    def apply(self) -> None:
        """Set this thread's effective, permitted and inheritable capabilities."""
        _check(self._capset(ctypes.byref(self._header), self._data), "capset")


def setfsuid(uid: int) -> None:
    """This thread's filesystem uid (what new inodes get, what permission checks use)."""
    _libc.setfsuid(uid)


def setfsgid(gid: int) -> None:
    _libc.setfsgid(gid)


def raise_effective_capabilities() -> None:
    """This thread's effective set made its permitted set again: a filesystem uid changed
    from 0 clears CAP_CHOWN, CAP_DAC_OVERRIDE, CAP_FOWNER & co. from the effective set."""
    header = _CapHeader(_LINUX_CAPABILITY_VERSION_3, 0)
    data = (_CapData * 2)()
    _check(_libc.capget(ctypes.byref(header), data), "capget")
    for word in data:
        word.effective = word.permitted
    _check(_libc.capset(ctypes.byref(header), data), "capset")


def set_seccomp_filter(program: SockFprog) -> None:
    """Install a seccomp filter on this thread (needs no_new_privs, or CAP_SYS_ADMIN)."""
    mode, unused = ctypes.c_ulong(SECCOMP_MODE_FILTER), ctypes.c_ulong(0)
    _check(_libc.prctl(PR_SET_SECCOMP, mode, ctypes.byref(program), unused, unused), "seccomp")


def set_name(name: str) -> None:
    """The process's comm (what `ps -o comm` and /proc/PID/status show), up to 15 bytes."""
    buf = ctypes.create_string_buffer(name.encode()[:15])
    _check(_libc.prctl(PR_SET_NAME, buf, 0, 0, 0), "prctl")


def process_start_time(pid: int, proc_fd: int | None = None) -> int | None:
    """The start time of a process (field 22 of /proc/PID/stat): with the pid, its identity.

    `proc_fd`, an fd of the host's /proc, still reads it after a pivot_root moved our root.
    """
    try:
        fd = os.open(
            f"{pid}/stat" if proc_fd is not None else f"/proc/{pid}/stat",
            os.O_RDONLY,
            dir_fd=proc_fd,
        )
    except OSError:
        return None
    try:
        data = os.read(fd, 4096)
    finally:
        os.close(fd)
    return int(data.rsplit(b")", 1)[1].split()[19])


CLONE_INTO_CGROUP = 0x200000000
_SIGCHLD = 17


class _CloneArgs(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_uint64)
        for name in (
            "flags", "pidfd", "child_tid", "parent_tid", "exit_signal", "stack",
            "stack_size", "tls", "set_tid", "set_tid_size", "cgroup",
        )
    ]  # fmt: skip


# PyDLL: the call keeps the GIL, as os.fork does; the child then finds the interpreter whole.
_py_libc = ctypes.PyDLL(None, use_errno=True)
_py_libc.syscall.restype = ctypes.c_long
_pythonapi = ctypes.pythonapi


def fork_into_cgroup(cgroup_fd: int) -> int:
    """fork(), with the child born in the cgroup2 directory `cgroup_fd` (clone3 with
    CLONE_INTO_CGROUP): 0 in the child, its pid in the parent.

    Why not fork and write cgroup.procs: moving a process takes the global
    cgroup_threadgroup_rwsem for writing, which waits out an RCU grace period whenever no
    other move happened in the last few ms, 8-13 ms here, on every create and every exec. A
    child placed at birth pays nothing. Python's own fork bookkeeping (PyOS_BeforeFork and
    the AfterFork pair) runs around the raw call, as os.fork runs it around fork(3).
    """
    args = _CloneArgs(flags=CLONE_INTO_CGROUP, exit_signal=_SIGCHLD, cgroup=cgroup_fd)
    _pythonapi.PyOS_BeforeFork()
    pid = _py_libc.syscall(_NR["clone3"], ctypes.byref(args), ctypes.sizeof(args))
    if pid == 0:
        _pythonapi.PyOS_AfterFork_Child()
        return 0
    if pid < 0:
        err = ctypes.get_errno()
        _pythonapi.PyOS_AfterFork_Parent()
        raise OSError(err, f"clone3: {os.strerror(err)}")
    _pythonapi.PyOS_AfterFork_Parent()
    return int(pid)


def can_trim_heap() -> bool:
    """Whether the C library has malloc_trim (glibc does; musl does not)."""
    return hasattr(_libc, "malloc_trim")


def trim_heap() -> None:
    """malloc_trim(0): the free pages of every arena of the heap back to the kernel."""
    _libc.malloc_trim(0)
