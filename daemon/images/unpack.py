"""Unpacking one image layer (a tar, maybe gzipped) into a directory of its own, once.

Runs in: the daemon (host root), in a worker thread; the directory is new and nothing else
writes to it while this runs.

The directory becomes one overlay lower layer of every sandbox that uses it, so the OCI
whiteouts are turned into overlayfs's own (as containerd's overlay snapshotter does):
`.wh.NAME` becomes a character device 0/0 named NAME, and `.wh..wh..opq` the xattr
trusted.overlay.opaque=y on its directory. Containment: every member's parent is opened with
openat2(RESOLVE_IN_ROOT) from the layer's root, so `..` and absolute symlinks (a member
`a -> /` followed by `a/etc/passwd`) stop at the layer's root and nothing lands outside it.
Owners are kept as numbers, as the image has them (the layer is idmapped over a sandbox's own
uid range when mounted); device nodes are skipped, since a sandbox must never reach the host's
devices through one.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import os
import posixpath
import shutil
import stat
import tarfile
import zlib
from typing import IO, BinaryIO, cast

from daemon.linux import syscalls as sc

WHITEOUT = ".wh."
OPAQUE = ".wh..wh..opq"
_RESOLVE = sc.RESOLVE_IN_ROOT | sc.RESOLVE_NO_MAGICLINKS
_CHUNK = 1 << 20


class LayerError(Exception):
    """A layer that cannot be read as a tar, or whose content is not what its digest says."""


class _HashingReader:
    """A read-only stream that hashes what passes through it: the layer's diff id is the
    sha256 of its uncompressed tar, read once for both."""

    def __init__(self, raw: IO[bytes]) -> None:
        self.raw = raw
        self.hash = hashlib.sha256()

    def read(self, size: int = -1) -> bytes:
        data = self.raw.read(size)
        self.hash.update(data)
        return data

    def drain(self) -> str:
        while self.read(_CHUNK):
            pass
        return "sha256:" + self.hash.hexdigest()


def unpack_layer(blob: str, target: str) -> str:
    """Apply the layer `blob` (a file: tar or gzipped tar) to the new directory `target`;
    returns the layer's diff id (sha256 of the uncompressed tar)."""
    with open(blob, "rb") as raw:
        compressed = raw.read(2) == b"\x1f\x8b"
        raw.seek(0)
        stream: IO[bytes] = (
            cast(IO[bytes], gzip.GzipFile(fileobj=raw, mode="rb")) if compressed else raw
        )
        reader = _HashingReader(stream)
        root = os.open(target, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            with tarfile.open(fileobj=reader, mode="r|") as tar:  # type: ignore[call-overload]
                for member in tar:
                    try:
                        _apply(tar, member, root)
                    except OSError as exc:
                        raise LayerError(f"cannot unpack {member.name}: {exc}") from exc
            return reader.drain()
        except (tarfile.TarError, EOFError, gzip.BadGzipFile, zlib.error) as exc:
            raise LayerError(f"the layer is not a readable tar: {exc}") from exc
        finally:
            os.close(root)


def _apply(tar: tarfile.TarFile, member: tarfile.TarInfo, root: int) -> None:
    """One member: a whiteout, or a file, directory, link or fifo put in place."""
    path = _contained(member.name)
    if path is None:
        return  # the layer's root itself: its metadata is the layer directory's own
    parent_path, name = posixpath.split(path)
    parent = _open_dir(root, parent_path)
    try:
        if name == OPAQUE:
            os.setxattr(f"/proc/self/fd/{parent}", "trusted.overlay.opaque", b"y")
            return
        if name.startswith(WHITEOUT):
            hidden = name[len(WHITEOUT) :]
            if hidden and hidden not in (".", ".."):
                _remove(parent, hidden)
                os.mknod(hidden, stat.S_IFCHR | 0o600, os.makedev(0, 0), dir_fd=parent)
            return
        if member.ischr() or member.isblk():
            return  # device nodes: never, whatever the image says
        existing = _lstat(parent, name)
        if not (member.isdir() and existing is not None and stat.S_ISDIR(existing.st_mode)):
            if existing is not None:
                _remove(parent, name)
            _create(tar, member, root, parent, name)
        if member.islnk():
            return  # a second name of a file whose owner and mode are set already
        os.chown(name, member.uid, member.gid, dir_fd=parent, follow_symlinks=False)
        if not member.issym():
            # After chown, which clears the setuid and setgid bits.
            os.chmod(name, member.mode & 0o7777, dir_fd=parent)
        os.utime(name, (member.mtime, member.mtime), dir_fd=parent, follow_symlinks=False)
    finally:
        os.close(parent)


def _create(
    tar: tarfile.TarFile, member: tarfile.TarInfo, root: int, parent: int, name: str
) -> None:
    if member.isdir():
        os.mkdir(name, 0o700, dir_fd=parent)
    elif member.issym():
        os.symlink(member.linkname, name, dir_fd=parent)
    elif member.islnk():
        target = _contained(member.linkname)
        if target is None:
            raise LayerError(f"{member.name} is a hard link to the layer's root")
        target_parent, target_name = posixpath.split(target)
        source = _open_dir(root, target_parent)
        try:
            os.link(
                target_name,
                name,
                src_dir_fd=source,
                dst_dir_fd=parent,
                follow_symlinks=False,
            )
        finally:
            os.close(source)
    elif member.isfifo():
        os.mkfifo(name, 0o600, dir_fd=parent)
    elif member.isreg():
        fd = os.open(
            name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600, dir_fd=parent
        )
        with os.fdopen(fd, "wb") as out:
            source_file = tar.extractfile(member)
            assert source_file is not None
            _copy(source_file, out)
    else:
        raise LayerError(f"{member.name}: a tar member of an unknown type")


def _copy(source: IO[bytes], out: BinaryIO) -> None:
    while chunk := source.read(_CHUNK):
        out.write(chunk)


def _contained(name: str) -> str | None:
    """`name` as a path relative to the layer's root, `..` stopped at the root; None for the
    root itself."""
    path = posixpath.normpath("/" + name).lstrip("/")
    return path or None


def _open_dir(root: int, path: str) -> int:
    """An O_PATH fd of the directory `path` in the layer, made (with its parents) if missing;
    symlinks on the way resolve inside the layer."""
    if not path:
        return os.dup(root)
    flags = os.O_PATH | os.O_DIRECTORY
    with contextlib.suppress(FileNotFoundError):
        return sc.openat2(root, path, flags, 0, _RESOLVE)
    above, name = posixpath.split(path)
    parent = _open_dir(root, above)
    try:
        # Existing: a dangling symlink, or made meanwhile by the walk: resolved below.
        with contextlib.suppress(FileExistsError):
            os.mkdir(name, 0o755, dir_fd=parent)
    finally:
        os.close(parent)
    # From the root again: a symlink at `name` must resolve inside the layer, not `parent`.
    return sc.openat2(root, path, flags, 0, _RESOLVE)


def _lstat(parent: int, name: str) -> os.stat_result | None:
    try:
        return os.stat(name, dir_fd=parent, follow_symlinks=False)
    except FileNotFoundError:
        return None


def _remove(parent: int, name: str) -> None:
    """Remove what is at `name` in `parent`, a whole directory included."""
    existing = _lstat(parent, name)
    if existing is None:
        return
    if stat.S_ISDIR(existing.st_mode):
        shutil.rmtree(name, dir_fd=parent)
    else:
        os.unlink(name, dir_fd=parent)
