"""What root inside a sandbox must not do, and the steps that forbid it: Docker's default
capabilities, no_new_privs, a seccomp filter like Docker's, and runc's masked kernel files.

Who runs what:
  - the zygote, once, before it forks anything: prepare() compiles the filter (nothing can be
    imported or dlopen'ed after pivot_root, and compiling costs a millisecond we pay once);
  - the daemon, at start: check(), so a host without libseccomp is refused at once;
  - B, the supervisor, host root, after its mounts and sysctls: protect_kernel_files();
  - each exec's child, a fork of B: drop_capabilities() while still root inside, then
    restrict_syscalls() as the last step before execve.

The filter allows every syscall but those below, which fail with EPERM (clone3 with ENOSYS, so
libc falls back to clone, whose flags the filter can see), as in Docker's profile for its
default capabilities. A deny list, not Docker's allow list: a syscall added by a later kernel
is allowed until it is listed here (the capability checks still apply to it).
"""

from __future__ import annotations

import errno
import os
import platform
import socket
import stat
import termios
from pathlib import Path

from daemon.linux import seccomp
from daemon.linux import syscalls as sc

# Docker's default capabilities: root inside keeps these and no other (bit N = capability N).
KEPT_CAPABILITIES = {
    "CAP_CHOWN": 0,
    "CAP_DAC_OVERRIDE": 1,
    "CAP_FOWNER": 3,
    "CAP_FSETID": 4,
    "CAP_KILL": 5,
    "CAP_SETGID": 6,
    "CAP_SETUID": 7,
    "CAP_SETPCAP": 8,
    "CAP_NET_BIND_SERVICE": 10,
    "CAP_NET_RAW": 13,
    "CAP_SYS_CHROOT": 18,
    "CAP_MKNOD": 27,
    "CAP_AUDIT_WRITE": 29,
    "CAP_SETFCAP": 31,
}
KEPT_MASK = sum(1 << number for number in KEPT_CAPABILITIES.values())  # 0xa80425fb

DENIED_SYSCALLS = (
    # Kernel keyrings are not namespaced.
    "add_key", "keyctl", "request_key",
    # The kernel itself: modules, kexec, reboot, swap, accounting, the kernel log, raw I/O.
    "init_module", "finit_module", "delete_module", "kexec_load", "kexec_file_load", "reboot",
    "swapon", "swapoff", "acct", "syslog", "iopl", "ioperm", "quotactl", "quotactl_fd",
    "lookup_dcookie", "uselib", "ustat", "sysfs", "vhangup", "vm86", "vm86old",
    # Large kernel surfaces unprivileged code can reach.
    "bpf", "perf_event_open", "userfaultfd", "fanotify_init",
    "io_uring_setup", "io_uring_enter", "io_uring_register",
    # Mounts, old API and new: the mount namespace is not the sandbox's to change.
    "mount", "umount", "umount2", "pivot_root", "fsopen", "fsconfig", "fsmount", "fspick",
    "open_tree", "move_mount", "mount_setattr",
    # Other processes and namespaces: ptrace itself stays (Docker allows it since Linux 4.8).
    "setns", "kcmp", "pidfd_getfd", "process_madvise",
    # File handles bypass the path walk, and so the sandbox's root (the "shocker" escape).
    "open_by_handle_at",
    # The host's clock, names and NUMA policy.
    "settimeofday", "stime", "clock_settime", "clock_settime64", "sethostname", "setdomainname",
    "get_mempolicy", "set_mempolicy", "set_mempolicy_home_node", "mbind", "migrate_pages",
    "move_pages",
)  # fmt: skip

# No namespace may be made. The kernel already refuses every kind but a user namespace to a
# process without CAP_SYS_ADMIN; a user namespace would hand it back inside, and with it
# mount, bpf and the other surfaces above.
NAMESPACE_FLAGS = (
    sc.CLONE_NEWNS, sc.CLONE_NEWCGROUP, sc.CLONE_NEWUTS, sc.CLONE_NEWIPC, sc.CLONE_NEWUSER,
    sc.CLONE_NEWPID, sc.CLONE_NEWNET,
)  # fmt: skip
CLONE_NEWTIME = 0x80  # unshare only: in clone's flags this bit belongs to the exit signal
# TIOCSTI fakes input on a terminal, for whatever reads it (outside too); TIOCLINUX as well.
DENIED_IOCTLS = (termios.TIOCSTI, termios.TIOCLINUX)
# vsock reaches the hypervisor's host and is not namespaced; AF_ALG is the kernel's crypto.
DENIED_SOCKET_FAMILIES = (socket.AF_VSOCK, socket.AF_ALG)

# Each machine's ABIs, as in Docker's profile: a 64-bit kernel also runs 32-bit (and x32)
# code, each with its own syscall numbers; the filter covers them all.
ARCHES = {"x86_64": ("x86_64", "x86", "x32"), "aarch64": ("aarch64", "arm")}

# runc's and Docker's defaults: kernel files that leak the host or let root inside touch it.
MASKED_PATHS = (
    "/proc/acpi", "/proc/asound", "/proc/interrupts", "/proc/kcore", "/proc/keys",
    "/proc/latency_stats", "/proc/timer_list", "/proc/timer_stats", "/proc/sched_debug",
    "/proc/scsi", "/sys/firmware", "/sys/devices/virtual/powercap",
)  # fmt: skip
READ_ONLY_PATHS = ("/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys", "/proc/sysrq-trigger")
_PROC_FLAGS = sc.MS_NOSUID | sc.MS_NODEV | sc.MS_NOEXEC


class HardeningUnavailable(RuntimeError):
    """The host lacks what the hardening needs: the daemon refuses to start (it says so as a
    ConfigError, daemon/lifecycle/service.py)."""


def seccomp_rules() -> list[seccomp.Rule]:
    rules = [seccomp.Rule(name, errno.EPERM) for name in DENIED_SYSCALLS]
    rules.append(seccomp.Rule("clone3", errno.ENOSYS))  # its flags are behind a pointer
    for flag in NAMESPACE_FLAGS:
        # clone's flags are its first argument on every arch we run on (not on s390).
        rules.append(seccomp.Rule("clone", errno.EPERM, seccomp.ArgMask(0, flag, flag)))
    for flag in (*NAMESPACE_FLAGS, CLONE_NEWTIME):
        rules.append(seccomp.Rule("unshare", errno.EPERM, seccomp.ArgMask(0, flag, flag)))
    for request in DENIED_IOCTLS:
        # The kernel reads the request as 32 bits: compare those only, or setting a high bit
        # would slip past (CVE-2019-10063, in flatpak's filter).
        rules.append(seccomp.Rule("ioctl", errno.EPERM, seccomp.ArgMask(1, 0xFFFFFFFF, request)))
    for family in DENIED_SOCKET_FAMILIES:
        # Not on x86: there libseccomp would have to deny socketcall(SYS_SOCKET) whole.
        arg = seccomp.ArgMask(0, 0xFFFFFFFF, family)
        rules.append(seccomp.Rule("socket", errno.EPERM, arg, frozenset({"x86"})))
    return rules


def compile_program() -> bytes:
    try:
        arches = ARCHES[platform.machine()]
    except KeyError:
        raise HardeningUnavailable(f"no seccomp filter for {platform.machine()}") from None
    try:
        return seccomp.compile_filter(seccomp_rules(), arches)
    except OSError as exc:
        raise HardeningUnavailable(str(exc)) from exc


# Set once by prepare() in the zygote; its forks (supervisors, their exec children) share them.
_program: seccomp.Program | None = None
_dropped_capabilities: tuple[int, ...] = ()
# Inheritable stays empty, as in Docker since CVE-2022-24769: then a file's inheritable
# capabilities grant nothing to a process that is not root.
_capabilities = sc.CapabilitySets(effective=KEPT_MASK, permitted=KEPT_MASK, inheritable=0)


def check() -> None:
    """In the daemon, at start: raise HardeningUnavailable unless the filter compiles here."""
    compile_program()


def prepare() -> None:
    """In the zygote, before it forks: compile the filter and list the capabilities to drop."""
    global _program, _dropped_capabilities
    last = int(Path("/proc/sys/kernel/cap_last_cap").read_text())
    _dropped_capabilities = tuple(
        cap for cap in range(last + 1) if cap not in KEPT_CAPABILITIES.values()
    )
    _program = seccomp.Program(compile_program())


def program_bytes() -> bytes:
    """The compiled filter (struct sock_filter[]), for the native PID 1 to load per exec."""
    return _prepared().bpf


def last_capability() -> int:
    """The highest capability number this kernel knows (set by prepare())."""
    return max((*_dropped_capabilities, *KEPT_CAPABILITIES.values()))


def _prepared() -> seccomp.Program:
    if _program is None:
        raise RuntimeError("hardening.prepare() was not called: refusing to run unconfined")
    return _program


def drop_capabilities() -> None:
    """Exec child, root in the sandbox's user namespace (host root without one), before it
    switches to the exec's uid: keep Docker's default capabilities and nothing else.

    Now, not later: shrinking the bounding set needs CAP_SETPCAP, which the switch to another
    uid takes away; and entering a user namespace gave this process a full bounding set.
    """
    _prepared()
    for cap in _dropped_capabilities:
        sc.prctl(sc.PR_CAPBSET_DROP, cap)
    sc.prctl(sc.PR_CAP_AMBIENT, sc.PR_CAP_AMBIENT_CLEAR_ALL)
    _capabilities.apply()


def restrict_syscalls() -> None:
    """Exec child, the last step before execve: no_new_privs (setuid and file capabilities
    grant nothing from now on; the filter needs it), then the seccomp filter."""
    program = _prepared()
    sc.prctl(sc.PR_SET_NO_NEW_PRIVS, 1)
    program.load()


def protect_kernel_files(owner: int) -> None:
    """B, host root, after pivot_root and the sysctls: mask and make read-only, as runc does.

    A masked file gets /dev/null bound over it, a masked directory an empty read-only tmpfs
    owned by `owner` (the host uid of root inside); a read-only path is bound onto itself and
    remounted read-only. Paths this kernel lacks are skipped. Root inside cannot undo any of
    it: it holds no capability over the mount namespace, and the filter denies umount.
    """
    for path in MASKED_PATHS:
        kind = _file_type(path)
        if kind is None:
            continue
        if stat.S_ISDIR(kind):
            options = f"mode=0555,size=4k,uid={owner},gid={owner}"
            sc.mount("tmpfs", path, "tmpfs", sc.MS_RDONLY | _PROC_FLAGS, options)
        else:
            sc.mount("/dev/null", path, None, sc.MS_BIND)
    for path in READ_ONLY_PATHS:
        if _file_type(path) is None:
            continue
        sc.mount(path, path, None, sc.MS_BIND | sc.MS_REC)
        flags = sc.MS_BIND | sc.MS_REMOUNT | sc.MS_RDONLY | _PROC_FLAGS
        sc.mount(None, path, None, flags)


def _file_type(path: str) -> int | None:
    try:
        return os.lstat(path).st_mode
    except FileNotFoundError:
        return None
