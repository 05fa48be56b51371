"""libseccomp by ctypes: compile a deny-list filter to a BPF program once, load it per process.

libseccomp (Debian's libseccomp2, the library runc, crun, podman and systemd build their
filters with) does what is easy to get wrong by hand: each architecture's syscall numbers, the
32-bit and x32 ABIs a 64-bit kernel also runs (x32 calls carry the x86_64 audit arch, so a
filter that checks only arch and number lets them through), and 64-bit argument comparisons
in 32-bit BPF. We call six of its documented functions (seccomp_init(3), seccomp_arch_add(3),
seccomp_rule_add(3), seccomp_merge(3), seccomp_export_bpf(3), seccomp_release(3)) in the
zygote, before any fork. A sandboxed process only hands the finished program to the kernel:
after pivot_root nothing can be imported or dlopen'ed, and one prctl costs microseconds.

Why no Python binding: libseccomp's own (Cython) is not on PyPI, and Debian's python3-seccomp
is built for /usr/bin/python3, not the interpreter the daemon runs on; pyseccomp (ctypes, like
this) has had no release since 2021; seccompy assembles its BPF itself, without the x32 check.
"""

from __future__ import annotations

import ctypes
import functools
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from daemon.linux import syscalls as sc

LIBRARY = "libseccomp.so.2"
SCMP_ACT_ALLOW = 0x7FFF0000
_SCMP_ACT_ERRNO = 0x00050000
_SCMP_ARCH_NATIVE = 0
_SCMP_CMP_MASKED_EQ = 7
_SCMP_FLTATR_CTL_OPTIMIZE = 8
_OPTIMIZE_BINARY_TREE = 2
_NR_SCMP_ERROR = -1
_BPF_INSTRUCTION_SIZE = 8


class LibseccompError(OSError):
    """libseccomp is missing, or refused the filter."""


@dataclass(frozen=True)
class ArgMask:
    """Matches when (argument `index` & `mask`) == `value`."""

    index: int
    mask: int
    value: int


@dataclass(frozen=True)
class Rule:
    """`syscall` fails with `errno` (only when `arg` matches, if given), except on `skip_arches`."""

    syscall: str
    errno: int
    arg: ArgMask | None = None
    skip_arches: frozenset[str] = frozenset()


class _ArgCmp(ctypes.Structure):
    _fields_ = [
        ("arg", ctypes.c_uint),
        ("op", ctypes.c_int),
        ("datum_a", ctypes.c_uint64),
        ("datum_b", ctypes.c_uint64),
    ]


@functools.cache
def _library() -> ctypes.CDLL:
    try:
        lib = ctypes.CDLL(LIBRARY)
    except OSError as exc:
        raise LibseccompError(
            f"cannot load {LIBRARY} ({exc}): install libseccomp (Debian: apt-get install "
            "libseccomp2); sandboxd runs no sandbox without its seccomp filter"
        ) from exc
    ctx, u32 = ctypes.c_void_p, ctypes.c_uint32
    signatures = {
        "seccomp_init": ([u32], ctx),
        "seccomp_release": ([ctx], None),
        "seccomp_arch_resolve_name": ([ctypes.c_char_p], u32),
        "seccomp_arch_remove": ([ctx, u32], ctypes.c_int),
        "seccomp_arch_add": ([ctx, u32], ctypes.c_int),
        "seccomp_attr_set": ([ctx, ctypes.c_int, u32], ctypes.c_int),
        "seccomp_syscall_resolve_name": ([ctypes.c_char_p], ctypes.c_int),
        "seccomp_rule_add_array": (
            [ctx, u32, ctypes.c_int, ctypes.c_uint, ctypes.POINTER(_ArgCmp)],
            ctypes.c_int,
        ),
        "seccomp_merge": ([ctx, ctx], ctypes.c_int),
        "seccomp_export_bpf": ([ctx, ctypes.c_int], ctypes.c_int),
    }
    for name, (argtypes, restype) in signatures.items():
        function = getattr(lib, name)
        function.argtypes, function.restype = argtypes, restype
    return lib


def _call(result: int, what: str) -> None:
    """libseccomp returns -errno, and leaves errno alone."""
    if result < 0:
        raise LibseccompError(-result, f"libseccomp {what}: {os.strerror(-result)}")


def compile_filter(rules: Sequence[Rule], arches: Sequence[str]) -> bytes:
    """The BPF program (struct sock_filter[]) of a filter that allows every syscall but `rules`,
    for each of `arches` (libseccomp names, the native one first); any other arch is killed.

    One context per arch, merged: so a rule can leave out an arch where libseccomp would have
    to widen it (on x86, socket(2) through socketcall(2) hides its arguments behind a pointer).
    """
    lib = _library()
    merged = None
    try:
        for arch in arches:
            ctx = _context(lib, arch, [r for r in rules if arch not in r.skip_arches])
            if merged is None:
                merged = ctx
                continue
            try:
                _call(lib.seccomp_merge(merged, ctx), f"merge {arch}")  # frees ctx
            except LibseccompError:
                lib.seccomp_release(ctx)
                raise
        fd = os.memfd_create("seccomp-bpf", os.MFD_CLOEXEC)
        try:
            _call(lib.seccomp_export_bpf(merged, fd), "export")
            return os.pread(fd, os.lseek(fd, 0, os.SEEK_END), 0)
        finally:
            os.close(fd)
    finally:
        if merged is not None:
            lib.seccomp_release(merged)


def _context(lib: ctypes.CDLL, arch: str, rules: Iterable[Rule]) -> int:
    token = lib.seccomp_arch_resolve_name(arch.encode())
    if token == 0:
        raise LibseccompError(f"libseccomp does not know the architecture {arch}")
    ctx: int | None = lib.seccomp_init(SCMP_ACT_ALLOW)
    if not ctx:
        raise LibseccompError("libseccomp: seccomp_init failed")
    try:
        _call(lib.seccomp_arch_remove(ctx, _SCMP_ARCH_NATIVE), "remove the native arch")
        _call(lib.seccomp_arch_add(ctx, token), f"add arch {arch}")
        # Syscalls sorted into a binary tree, not one long chain: the kernel then loads the
        # filter in less than half the time (it runs it once per syscall number to build its
        # cache). libseccomp before 2.5 lacks it and builds the chain.
        lib.seccomp_attr_set(ctx, _SCMP_FLTATR_CTL_OPTIMIZE, _OPTIMIZE_BINARY_TREE)
        for rule in rules:
            _add_rule(lib, ctx, rule)
    except BaseException:
        lib.seccomp_release(ctx)
        raise
    return ctx


def _add_rule(lib: ctypes.CDLL, ctx: int, rule: Rule) -> None:
    number = lib.seccomp_syscall_resolve_name(rule.syscall.encode())
    if number == _NR_SCMP_ERROR:
        raise LibseccompError(f"libseccomp does not know the syscall {rule.syscall}: too old?")
    action = _SCMP_ACT_ERRNO | (rule.errno & 0xFFFF)
    if rule.arg is None:
        _call(lib.seccomp_rule_add_array(ctx, action, number, 0, None), rule.syscall)
        return
    comparison = _ArgCmp(rule.arg.index, _SCMP_CMP_MASKED_EQ, rule.arg.mask, rule.arg.value)
    _call(
        lib.seccomp_rule_add_array(ctx, action, number, 1, ctypes.byref(comparison)), rule.syscall
    )


class Program:
    """A compiled filter kept ready in memory: loading it allocates nothing and is one prctl."""

    def __init__(self, bpf: bytes) -> None:
        if not bpf or len(bpf) % _BPF_INSTRUCTION_SIZE:
            raise LibseccompError(f"not a BPF program: {len(bpf)} bytes")
        self.bpf = bpf
        self._buffer = ctypes.create_string_buffer(bpf, len(bpf))
        self._fprog = sc.SockFprog(
            len(bpf) // _BPF_INSTRUCTION_SIZE, ctypes.addressof(self._buffer)
        )

    def load(self) -> None:
        """Filter this thread, and every process it becomes or forks, from now on."""
        sc.set_seccomp_filter(self._fprog)
