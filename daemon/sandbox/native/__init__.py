"""The native PID 1 (sandboxd-init.c): where its binary lies, how it is built, and how the
supervisor's fork of the zygote hands itself over to it.

Runs in: the build (setup.py, the tests' conftest) for `build`; B, the sandbox's PID 1, host
root, for `open_binary` (before pivot_root: after it the host's files are out of sight) and
`become` (once the root is built). The binary is linked statically, so it needs nothing of
the sandbox's root, which may hold no libc at all.
"""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Mapping
from pathlib import Path

HERE = Path(__file__).resolve().parent
BINARY = HERE / "sandboxd-init"
SOURCES = (HERE / "sandboxd-init.c", HERE / "json.c")
HEADERS = (HERE / "json.h",)
CFLAGS = ("-O2", "-Wall", "-Wextra", "-Werror", "-std=gnu11")
SANITIZERS = ("-fsanitize=address,undefined", "-fno-omit-frame-pointer", "-g", "-O1")


def build(output: Path = BINARY, *, sanitize: bool = False, compiler: str = "gcc") -> Path:
    """Compile the binary to `output`: static and warning-free, or (sanitize) with ASan and
    UBSan, for the tests (a sanitized binary cannot be static)."""
    flags = [*CFLAGS, *SANITIZERS] if sanitize else [*CFLAGS, "-static"]
    output.parent.mkdir(parents=True, exist_ok=True)
    partial = output.with_name(output.name + ".partial")
    subprocess.run(
        [compiler, *flags, "-o", str(partial), *map(str, SOURCES)], check=True, capture_output=True
    )
    partial.replace(output)
    return output


def stale(output: Path = BINARY) -> bool:
    """Whether `output` is missing or older than a source."""
    try:
        built = output.stat().st_mtime
    except FileNotFoundError:
        return True
    return any(source.stat().st_mtime > built for source in (*SOURCES, *HEADERS))


def open_binary() -> int:
    """The binary, opened for fexecve: B calls this before pivot_root."""
    return os.open(BINARY, os.O_RDONLY | os.O_CLOEXEC)


def become(
    binary_fd: int, config: Mapping[str, object], seccomp_bpf: bytes, fds: list[int]
) -> None:
    """Exec the native PID 1 (never returns, or raises OSError): `config` and the filter go
    in memfds, `fds` (named by number in `config`) stay open across the exec."""
    filter_fd = os.memfd_create("seccomp-bpf", 0)
    os.write(filter_fd, seccomp_bpf)
    config_fd = os.memfd_create("sandboxd-init", 0)
    os.write(config_fd, json.dumps({**config, "seccomp": filter_fd}).encode())
    for fd in fds:
        os.set_inheritable(fd, True)
    os.execve(binary_fd, ["sandboxd-init", str(config_fd)], {})
