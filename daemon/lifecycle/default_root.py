"""The default base of a sandbox (`rootfs` null): what of the host a sandbox may see.

Mapping host root to root inside (the idmapped lower layers) would hand a sandbox everything
only host root can read, so the base is chosen, not the whole host: the host's /usr (and
/bin, /sbin, /lib* as the host has them: links into /usr, or directories of their own), a copy
of the world-readable part of the host's /etc prepared here, and an empty FHS skeleton. The
copy is made anew at each daemon start, in a directory of its own (a "generation"), so a
sandbox that is running keeps the generation it was built on.
"""

from __future__ import annotations

import os
import shutil
import stat
import time
from pathlib import Path

TOP_LEVEL_LINKS = ("bin", "sbin", "lib", "lib32", "lib64", "libx32")
EMPTY_DIRS = {
    "dev": 0o755, "proc": 0o555, "sys": 0o555, "tmp": 0o1777, "usr": 0o755, "root": 0o700,
    "home": 0o755, "var": 0o755, "run": 0o755, "srv": 0o755, "mnt": 0o755, "opt": 0o755,
    "media": 0o755,
}  # fmt: skip


def host_layers() -> list[tuple[str, str]]:
    """The host directories a default base shows read-only: (host path, path inside)."""
    layers = [("/usr", "/usr")]
    for name in TOP_LEVEL_LINKS:
        path = f"/{name}"
        if os.path.isdir(path) and not os.path.islink(path):
            layers.append((path, path))
    return layers


def prepare(bases_dir: Path) -> Path:
    """Make a new generation of the base skeleton with a fresh copy of the host's /etc."""
    bases_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    target = bases_dir / f"{time.time_ns():x}"
    work = bases_dir / (target.name + ".tmp")
    work.mkdir(mode=0o755)
    for name, mode in EMPTY_DIRS.items():
        (work / name).mkdir()
        os.chmod(work / name, mode)
    for name in TOP_LEVEL_LINKS:
        path = Path("/") / name
        if path.is_symlink():
            os.symlink(os.readlink(path), work / name)
        elif path.is_dir():
            (work / name).mkdir(mode=0o755)
    copy_readable(Path("/etc"), work / "etc")
    work.rename(target)
    return target


def copy_readable(source: Path, target: Path) -> None:
    """Copy what an unprivileged user could read of `source`: nothing else, no device nodes."""
    target.mkdir()
    shutil.copystat(source, target)
    with os.scandir(source) as entries:
        for entry in entries:
            st = entry.stat(follow_symlinks=False)
            dest = target / entry.name
            if stat.S_ISLNK(st.st_mode):
                os.symlink(os.readlink(entry.path), dest)
            elif stat.S_ISDIR(st.st_mode) and st.st_mode & 0o005 == 0o005:
                copy_readable(Path(entry.path), dest)
            elif stat.S_ISREG(st.st_mode) and st.st_mode & 0o004:
                shutil.copy2(entry.path, dest, follow_symlinks=False)
                os.chmod(dest, stat.S_IMODE(st.st_mode) & ~0o6000)
            else:
                continue
            os.lchown(dest, st.st_uid, st.st_gid)


def remove_unused(bases_dir: Path, in_use: set[str], keep: Path) -> None:
    """Remove generations no live sandbox was built on (and half-made ones)."""
    for path in bases_dir.iterdir():
        if str(path) not in in_use and path != keep:
            shutil.rmtree(path, ignore_errors=True)


def write_identity_files(
    upper: Path, hostname: str, owner: int, ip: str | None = None, resolv: str = ""
) -> None:
    """The sandbox's own /etc/hostname, /etc/hosts and /etc/resolv.conf, in its upper layer.

    Its host name stands for its bridge address if it has one, else for 127.0.1.1 (as on
    Debian). `resolv` names servers only when the sandbox can reach them (egress): with none,
    a lookup fails at once instead of waiting for a timeout.
    """
    etc = upper / "etc"
    etc.mkdir(mode=0o755, exist_ok=True)
    os.chown(etc, owner, owner)
    files = {
        "hostname": f"{hostname}\n",
        "hosts": f"127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n"
        f"{ip or '127.0.1.1'}\t{hostname}\n",
        "resolv.conf": resolv,
    }
    for name, content in files.items():
        path = etc / name
        path.write_text(content)
        os.chmod(path, 0o644)
        os.chown(path, owner, owner)
