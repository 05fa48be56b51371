"""Try each kind of syscall the sandbox's filter denies and print {name: errno} as JSON (0: it
succeeded), then this process's hardening fields of /proc/self/status under "status".

Each call's arguments are harmless whether it is denied or not, and chosen so that, not
denied, it would succeed or fail with another errno even as host root: so a test can tell
the filter from the capability checks. Runs as a script under any python3 (inside a sandbox
that is the host's /usr/bin/python3), so it uses the standard library alone.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import json
import os
import platform
import signal
import socket
import termios

NUMBERS = {
    "x86_64": {
        "keyctl": 250, "add_key": 248, "request_key": 249, "bpf": 321, "perf_event_open": 298,
        "userfaultfd": 323, "unshare": 272, "setns": 308, "clone": 56, "clone3": 435,
        "init_module": 175, "finit_module": 313, "delete_module": 176, "kexec_load": 246,
        "open_by_handle_at": 304, "pivot_root": 155, "io_uring_setup": 425, "fsopen": 430,
        "settimeofday": 164, "swapon": 167, "reboot": 169,
    },
    "aarch64": {
        "keyctl": 219, "add_key": 217, "request_key": 218, "bpf": 280, "perf_event_open": 241,
        "userfaultfd": 282, "unshare": 97, "setns": 268, "clone": 220, "clone3": 435,
        "init_module": 105, "finit_module": 273, "delete_module": 106, "kexec_load": 104,
        "open_by_handle_at": 265, "pivot_root": 41, "io_uring_setup": 425, "fsopen": 430,
        "settimeofday": 170, "swapon": 224, "reboot": 142,
    },
}  # fmt: skip
X32_SYSCALL_BIT = 0x40000000
CLONE_NEWUSER = 0x10000000
CLONE_NEWNET = 0x40000000
SIGCHLD = 17
NOWHERE = b"/nonexistent-sandboxd-probe"

libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long


def _arg(value: object) -> object:
    return ctypes.c_long(value) if isinstance(value, int) else value


def raw(number: int, *args: object) -> int:
    """The syscall's errno, or 0 when it succeeded (a returned fd is closed)."""
    result = libc.syscall(ctypes.c_long(number), *map(_arg, args))
    if result < 0:
        return ctypes.get_errno()
    return 0


def call(name: str, *args: object) -> int:
    number = NUMBERS[platform.machine()][name]
    if name in ("userfaultfd", "fsopen"):
        fd = libc.syscall(ctypes.c_long(number), *map(_arg, args))
        if fd < 0:
            return ctypes.get_errno()
        os.close(fd)
        return 0
    return raw(number, *args)


def clone_user_namespace() -> int:
    """A fork by raw clone(2) into a new user namespace; the child leaves at once."""
    pid = libc.syscall(ctypes.c_long(NUMBERS[platform.machine()]["clone"]),
                       ctypes.c_long(CLONE_NEWUSER | SIGCHLD), None, None, None, None)  # fmt: skip
    if pid == 0:
        os._exit(0)
    if pid < 0:
        return ctypes.get_errno()
    os.waitpid(pid, 0)
    return 0


def tiocsti() -> int:
    """Push a byte into the input of our own controlling terminal."""
    signal.signal(signal.SIGHUP, signal.SIG_IGN)  # closing it hangs up its session: us
    master, slave = os.openpty()
    try:
        with contextlib.suppress(OSError):  # already a session leader, as every exec is
            os.setsid()
        fcntl.ioctl(slave, termios.TIOCSCTTY, 0)
        fcntl.ioctl(slave, termios.TIOCSTI, b"x")
        return 0
    except OSError as exc:
        return exc.errno or -1
    finally:
        os.close(master)
        os.close(slave)


def vsock() -> int:
    try:
        socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM).close()
        return 0
    except OSError as exc:
        return exc.errno or -1


def probe() -> dict[str, object]:
    results: dict[str, object] = {
        "keyctl": call("keyctl", 0, -3, 1),  # KEYCTL_GET_KEYRING_ID of the session keyring
        "add_key": call("add_key", b"user", b"sandboxd-probe", b"x", 1, -2),
        "request_key": call("request_key", b"user", b"sandboxd-probe-none", None, 0),
        "bpf": call("bpf", 999, None, 0),  # an unknown command: EINVAL
        "perf_event_open": call("perf_event_open", None, 0, -1, -1, 0),  # EFAULT
        "userfaultfd": call("userfaultfd", 1),  # UFFD_USER_MODE_ONLY: allowed unprivileged
        "clone_user": clone_user_namespace(),
        "clone3": call("clone3", None, 0),  # EINVAL; the filter makes it ENOSYS
        "setns": call("setns", -1, 0),  # EBADF
        "init_module": call("init_module", None, 0, b""),  # ENOEXEC
        "finit_module": call("finit_module", -1, b"", 0),  # EBADF
        "delete_module": call("delete_module", b"sandboxd_no_such_module", os.O_NONBLOCK),
        "kexec_load": call("kexec_load", 0, 1000, None, 0),  # too many segments: EINVAL
        "open_by_handle_at": call("open_by_handle_at", -1, None, 0),
        "mount": raw_mount(),
        "umount2": libc_errno(libc.umount2(NOWHERE, 0)),
        "pivot_root": call("pivot_root", NOWHERE, NOWHERE),
        "io_uring_setup": call("io_uring_setup", 0, None),
        "fsopen": call("fsopen", b"tmpfs", 0),
        "settimeofday": call("settimeofday", None, None),  # sets nothing
        "swapon": call("swapon", NOWHERE, 0),
        "reboot": call("reboot", 0, 0, 0, None),  # wrong magic: EINVAL
        "ioctl_tiocsti": tiocsti(),
        "socket_vsock": vsock(),
    }
    if platform.machine() == "x86_64":
        # keyctl through the x32 ABI, which carries the x86_64 audit arch.
        results["keyctl_x32"] = raw(X32_SYSCALL_BIT | 250, 0, -3, 1)
    # Last: each that succeeds moves us into a namespace where the calls above would not.
    results["unshare_net"] = call("unshare", CLONE_NEWNET)
    results["unshare_user"] = call("unshare", CLONE_NEWUSER)
    with open("/proc/self/status") as status:
        fields = dict(line.split(":", 1) for line in status if ":" in line)
    names = ("NoNewPrivs", "Seccomp", "CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb")
    results["status"] = {name: fields[name].strip() for name in names}
    return results


def raw_mount() -> int:
    return libc_errno(libc.mount(b"none", NOWHERE, b"tmpfs", ctypes.c_ulong(0), None))


def libc_errno(result: int) -> int:
    return ctypes.get_errno() if result < 0 else 0


if __name__ == "__main__":
    print(json.dumps(probe()))
