"""Tar archives of a running sandbox's files, out and in, like `docker cp`.

Runs in: the daemon (host root, host namespaces); tar work in worker threads.

Out: the tree at a path, walked by fds (each directory opened with O_NOFOLLOW under its
parent's fd, from a root resolved in the sandbox: daemon/lifecycle/rooted.py), written as a
tar stream in chunks of about 1 MiB; owners as seen inside; files, directories, symlinks and
FIFOs (sockets and devices are left out).

In: the upload is spooled to a file without a name (O_TMPFILE) in the target directory, on
the sandbox's own disk, that nothing inside can open, let alone change; every header
is checked, and only then is anything made. Refused (422), before any write: absolute names,
`..`, symlinks whose target leaves the directory, hard links to anything but a member path
below it or to a member that is not a regular file, device nodes, ids the sandbox does not
map, and a tar that cannot be read. Every member is then made through the sandbox's root, by
fd, and files, links and FIFOs replace what is there by rename. Each is made under a temp
name the sandbox can see and swap: its owner, mode and times are set through the fd of the
inode made, never by that name (a by-name chmod follows a symlink, as host root). A hard
link is made from an fd of its source, checked to be a regular file (else 422 at that
member), and keeps the source's attributes. A disk that fills (507) takes back what this
upload made.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import posixpath
import queue
import secrets
import shutil
import stat
import tarfile
import threading
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import IO

from daemon.errors import Conflict, InsufficientStorage, Invalid, SandboxError
from daemon.lifecycle.rooted import (
    CHUNK,
    SandboxRoot,
    translated,
    write_all,
    write_chunks,
)
from daemon.linux import syscalls as sc

log = logging.getLogger(__name__)

_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_QUEUED_CHUNKS = 4


# -- out ----------------------------------------------------------------------------------------


class _Pipe:
    """A file for tarfile in a worker thread; the event loop takes its chunks. Bounded: the
    thread waits while the client reads slowly, and stops once the client is gone."""

    def __init__(self) -> None:
        self.chunks: queue.Queue[bytes | None] = queue.Queue(_QUEUED_CHUNKS)
        self.buffer = bytearray()
        self.gone = threading.Event()

    def write(self, data: bytes) -> int:
        self.buffer += data
        if len(self.buffer) >= CHUNK:
            self._put(bytes(self.buffer))
            self.buffer.clear()
        return len(data)

    def finish(self) -> None:
        if self.buffer:
            self._put(bytes(self.buffer))
        self._put(None)

    def _put(self, item: bytes | None) -> None:
        while not self.gone.is_set():
            with contextlib.suppress(queue.Full):
                self.chunks.put(item, timeout=0.2)
                return
        raise BrokenPipeError("the client is gone")


class _Exactly:
    """`size` bytes of `fd` for tarfile: cut at size if the file grew, zeros if it shrank."""

    def __init__(self, fd: int, size: int) -> None:
        self.fd, self.left = fd, size

    def read(self, n: int = -1) -> bytes:
        n = self.left if n < 0 else min(n, self.left)
        data = os.read(self.fd, n) if n else b""
        data += b"\0" * (n - len(data))
        self.left -= n
        return data


@dataclass
class Top:
    """What a tar out is of, found before the answer starts (its 404 or 409 still possible):
    `name` in the directory `parent`, as it stood (`st`)."""

    parent: int
    name: str
    arcname: str
    st: os.stat_result


def find_top(root: SandboxRoot, path: str) -> Top:
    with translated(path):
        if path == "/":
            fd = root.open("/", os.O_PATH | os.O_DIRECTORY)
            return Top(fd, ".", ".", os.stat(".", dir_fd=fd))
        parent, name = root.parent(path)
        try:
            return Top(parent, name, name, os.stat(name, dir_fd=parent, follow_symlinks=False))
        except BaseException:
            os.close(parent)
            raise


async def tar_out(root: SandboxRoot, top: Top) -> AsyncIterator[bytes]:
    """The tar of `top`, in chunks of about CHUNK bytes; its fd is closed at the end. What
    changes meanwhile is taken as found (what vanished is left out)."""
    pipe = _Pipe()

    def produce() -> None:
        try:
            with tarfile.open(fileobj=pipe, mode="w|", format=tarfile.PAX_FORMAT) as tar:  # type: ignore[call-overload]
                _add(root, tar, top.parent, top.name, top.arcname, top.st)
            pipe.finish()
        except BrokenPipeError:
            pass
        except BaseException:
            log.exception("a tar out of a sandbox failed")
            with contextlib.suppress(BrokenPipeError):
                pipe._put(None)
            raise

    loop = asyncio.get_running_loop()
    worker = loop.run_in_executor(None, produce)
    try:
        while True:
            chunk = await loop.run_in_executor(None, pipe.chunks.get)
            if chunk is None:
                break
            yield chunk
        await worker  # its error, if any, cuts the stream short (the client sees it broken)
    finally:
        pipe.gone.set()
        with contextlib.suppress(queue.Full):
            pipe.chunks.put_nowait(None)  # a getter left waiting
        with contextlib.suppress(BaseException):
            await worker
        os.close(top.parent)


def _add(
    root: SandboxRoot,
    tar: tarfile.TarFile,
    parent: int,
    name: str,
    arcname: str,
    st: os.stat_result,
) -> None:
    info = tarfile.TarInfo(arcname)
    info.mode = stat.S_IMODE(st.st_mode)
    info.uid, info.gid = root.inside_id(st.st_uid), root.inside_id(st.st_gid)
    info.mtime = int(st.st_mtime)
    if stat.S_ISREG(st.st_mode):
        try:
            fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK, dir_fd=parent)
        except OSError:
            return  # gone, or replaced by a link, meanwhile
        try:
            now = os.fstat(fd)
            if not stat.S_ISREG(now.st_mode):
                return
            info.size = now.st_size
            tar.addfile(info, _Exactly(fd, now.st_size))
        finally:
            os.close(fd)
    elif stat.S_ISDIR(st.st_mode):
        info.type = tarfile.DIRTYPE
        tar.addfile(info)
        try:
            fd = os.open(name, _DIR, dir_fd=parent)
        except OSError:
            return
        try:
            with os.scandir(fd) as listing:
                children = sorted(item.name for item in listing)
            for child in children:
                try:
                    child_st = os.stat(child, dir_fd=fd, follow_symlinks=False)
                except OSError:
                    continue  # gone meanwhile
                _add(root, tar, fd, child, f"{arcname}/{child}", child_st)
        finally:
            os.close(fd)
    elif stat.S_ISLNK(st.st_mode):
        info.type = tarfile.SYMTYPE
        try:
            info.linkname = os.readlink(name, dir_fd=parent)
        except OSError:
            return
        tar.addfile(info)
    elif stat.S_ISFIFO(st.st_mode):
        info.type = tarfile.FIFOTYPE
        tar.addfile(info)


# -- in -----------------------------------------------------------------------------------------


@dataclass
class _Made:
    """What an upload has made so far, to take back should the disk fill."""

    paths: list[tuple[str, bool]] = field(default_factory=list)  # (path, is a directory)
    dir_times: list[tuple[str, int]] = field(default_factory=list)


async def tar_in(root: SandboxRoot, directory: str, chunks: AsyncIterator[bytes]) -> None:
    """Unpack the tar (or gzip'd tar) of `chunks` into the directory `directory`."""
    with translated(directory):
        dir_fd = await asyncio.to_thread(root.open, directory, os.O_PATH | os.O_DIRECTORY)
    try:
        spool = await asyncio.to_thread(_spool_file, root, dir_fd, directory)
        try:
            await write_chunks(spool, chunks, directory)
            await asyncio.to_thread(_unpack, root, directory, dir_fd, spool)
        finally:
            os.close(spool)
    finally:
        os.close(dir_fd)


def _spool_file(root: SandboxRoot, dir_fd: int, directory: str) -> int:
    """A file for the upload, on the directory's disk, that nothing inside can open."""
    with translated(directory), root.creating():
        try:
            return os.open(".", os.O_TMPFILE | os.O_RDWR | os.O_CLOEXEC, 0o600, dir_fd=dir_fd)
        except OSError as exc:
            if exc.errno not in (errno.EOPNOTSUPP, errno.EISDIR, errno.EINVAL):
                raise
        # Mode 0000 and the name gone at once: nothing inside opens it by name meanwhile.
        name = f".sandboxd-upload-{secrets.token_hex(16)}"
        flags = os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        fd = os.open(name, flags, 0, dir_fd=dir_fd)
        os.unlink(name, dir_fd=dir_fd)
        return fd


def _member_name(name: str) -> str:
    """A member's path below the directory ('' for the directory itself); Invalid if it
    would climb out."""
    if name.startswith("/"):
        raise Invalid(f"tar member {name!r} has an absolute name")
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise Invalid(f"tar member {name!r} has '..' in its name")
    return "/".join(parts)


def _leaves(directory: str, name: str, target: str) -> bool:
    """Whether the symlink `name` (below `directory`) to `target` points out of it."""
    if target.startswith("/"):
        inside = posixpath.normpath(target)
        return directory != "/" and inside != directory and not inside.startswith(directory + "/")
    joined = posixpath.normpath(posixpath.join(posixpath.dirname(name), target))
    return joined == ".." or joined.startswith("../")


def _check(root: SandboxRoot, directory: str, members: list[tarfile.TarInfo]) -> int:
    """Every header against the rules (module docstring); the bytes the files will take."""
    total = 0
    regular: dict[str, bool] = {}  # member name: whether a regular file (or a link to one)
    for member in members:
        name = _member_name(member.name)
        if member.ischr() or member.isblk():
            raise Invalid(f"tar member {member.name!r} is a device node")
        kinds = (member.isreg(), member.isdir(), member.issym(), member.islnk(), member.isfifo())
        if not any(kinds):
            raise Invalid(f"tar member {member.name!r} is of an unsupported type")
        if member.issym() and _leaves(directory, name, member.linkname):
            target = member.linkname
            raise Invalid(f"tar member {member.name!r} links to {target}, out of {directory}")
        if member.islnk():
            source = _member_name(member.linkname)
            if not source:
                raise Invalid(f"tar member {member.name!r} is a hard link to the directory")
            if not regular.get(source, True):  # a source out of the tar is checked when linked
                raise Invalid(
                    f"tar member {member.name!r} is a hard link to {member.linkname!r},"
                    " which is not a regular file"
                )
        regular[name] = member.isreg() or (
            member.islnk() and regular.get(_member_name(member.linkname), True)
        )
        root.host_id(member.uid)
        root.host_id(member.gid)
        if member.isreg():
            total += member.size
    return total


def _unpack(root: SandboxRoot, directory: str, dir_fd: int, spool: int) -> None:
    os.lseek(spool, 0, os.SEEK_SET)
    with os.fdopen(os.dup(spool), "rb") as raw:
        try:
            with tarfile.open(fileobj=raw, mode="r:*") as tar:
                members = tar.getmembers()
                needed = _check(root, directory, members)
                free = os.statvfs(dir_fd)
                if needed > free.f_bavail * free.f_frsize:
                    raise InsufficientStorage(
                        f"the archive's {needed} bytes do not fit on the sandbox's disk"
                    )
                made = _Made()
                try:
                    for member in members:
                        _extract(root, directory, tar, member, made)
                    for path, mtime in reversed(made.dir_times):
                        with contextlib.suppress(OSError):
                            _set_dir_time(root, path, mtime)
                except BaseException as exc:
                    if isinstance(exc, InsufficientStorage) or (
                        isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT)
                    ):
                        _take_back(root, made)
                    raise
        except (tarfile.TarError, EOFError) as exc:
            raise Invalid(f"the body is not a readable tar: {exc}") from exc


def _extract(
    root: SandboxRoot, directory: str, tar: tarfile.TarFile, member: tarfile.TarInfo, made: _Made
) -> None:
    name = _member_name(member.name)
    if not name:
        return  # the directory itself: it exists, and keeps its owner and mode
    path = posixpath.join(directory, name)
    head, base = posixpath.split(path)
    mode = stat.S_IMODE(member.mode)
    uid, gid = root.host_id(member.uid), root.host_id(member.gid)
    with translated(path):
        existed = _exists(root, path)
        parent = root.make_dirs(head)
    try:
        with translated(path):
            if member.isdir():
                _extract_dir(root, parent, base, mode, uid, gid)
                made.dir_times.append((path, int(member.mtime)))
            else:
                temp = f".{base[:200]}.sandboxd-{secrets.token_hex(6)}"
                try:
                    made_fd = _make_temp(root, tar, member, directory, parent, temp)
                    if made_fd is not None:
                        try:
                            _set_attributes(made_fd, member, uid, gid, mode)
                        finally:
                            os.close(made_fd)
                    root.replace(parent, temp, base)
                except BaseException:
                    with contextlib.suppress(OSError):
                        os.unlink(temp, dir_fd=parent)
                    raise
        if not existed:
            made.paths.append((path, member.isdir()))
    finally:
        os.close(parent)


def _exists(root: SandboxRoot, path: str) -> bool:
    try:
        root.stat(path)
        return True
    except SandboxError:
        return False


def _extract_dir(root: SandboxRoot, parent: int, name: str, mode: int, uid: int, gid: int) -> None:
    try:
        root.mkdir_at(parent, name, mode, uid, gid)
        return
    except FileExistsError:
        pass
    try:
        fd = os.open(name, _DIR, dir_fd=parent)
    except OSError as exc:
        if exc.errno not in (errno.ENOTDIR, errno.ELOOP):
            raise
        os.unlink(name, dir_fd=parent)  # a file or link where the tar has a directory
        root.mkdir_at(parent, name, mode, uid, gid)
        return
    try:
        os.fchown(fd, uid, gid)
        os.fchmod(fd, mode)
    finally:
        os.close(fd)


def _make_temp(
    root: SandboxRoot,
    tar: tarfile.TarFile,
    member: tarfile.TarInfo,
    directory: str,
    parent: int,
    temp: str,
) -> int | None:
    """Make `member` as `temp` in `parent`: an fd of the very inode made, checked to be of the
    member's kind, to set its owner, mode and times through; None for a hard link, whose
    inode is its source's and keeps its attributes.

    The name `temp` is the sandbox's to see and rename over the moment it exists: after the
    make, nothing is done by that name but the final rename (no chmod, chown or utime that
    could follow a symlink swapped in, as host root, to a host file)."""
    with root.creating():
        if member.islnk():
            _link_temp(root, member, directory, parent, temp)
            return None
        if member.isreg():
            flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
            fd = os.open(temp, flags, 0o600, dir_fd=parent)
            try:
                contents = tar.extractfile(member)
                assert contents is not None
                _copy(contents, fd)
            except BaseException:
                os.close(fd)
                raise
            return fd
        if member.issym():
            os.symlink(member.linkname, temp, dir_fd=parent)
            expected = stat.S_IFLNK
        else:
            os.mkfifo(temp, 0o600, dir_fd=parent)
            expected = stat.S_IFIFO
        # O_PATH opens neither a FIFO (no wait for a writer) nor a symlink's target.
        fd = os.open(temp, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=parent)
        if stat.S_IFMT(os.fstat(fd).st_mode) != expected:
            os.close(fd)
            raise Conflict(f"{temp} was replaced inside the sandbox while it was made")
        return fd


def _link_temp(
    root: SandboxRoot, member: tarfile.TarInfo, directory: str, parent: int, temp: str
) -> None:
    """`temp` as a hard link to the member's source, which must be a regular file: linked
    from an fd of the inode checked, so a source the sandbox swaps meanwhile (for a symlink,
    say) is never what gets linked."""
    source = posixpath.join(directory, _member_name(member.linkname))
    source_dir, source_name = root.parent(source)
    try:
        fd = os.open(source_name, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=source_dir)
    finally:
        os.close(source_dir)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise Invalid(
                f"tar member {member.name!r} is a hard link to {member.linkname!r},"
                " which is not a regular file"
            )
        sc.link_fd(fd, parent, temp)
    finally:
        os.close(fd)


def _set_attributes(fd: int, member: tarfile.TarInfo, uid: int, gid: int, mode: int) -> None:
    """Owner, mode and times of the inode `fd` holds (the one _make_temp made and checked)."""
    mtime = int(member.mtime)
    if member.isreg():
        os.fchown(fd, uid, gid)
        os.fchmod(fd, mode)  # after chown, which clears setuid and setgid
        os.utime(fd, (mtime, mtime))
        return
    sc.chown_fd(fd, uid, gid)
    if member.isfifo():
        # fchmod refuses an O_PATH fd; the fd's /proc link leads to its inode, a FIFO (checked
        # by fstat), which is no symlink: nothing further is followed.
        os.chmod(f"/proc/self/fd/{fd}", mode)
    sc.utime_fd(fd, mtime, mtime)


def _copy(source: IO[bytes], fd: int) -> None:
    while data := source.read(CHUNK):
        write_all(fd, data)


def _set_dir_time(root: SandboxRoot, path: str, mtime: int) -> None:
    fd = root.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.utime(fd, (mtime, mtime))
    finally:
        os.close(fd)


def _take_back(root: SandboxRoot, made: _Made) -> None:
    """Remove what an upload made, newest first (best effort: the sandbox may hold on)."""
    for path, _is_dir in reversed(made.paths):
        with contextlib.suppress(OSError, SandboxError):
            parent, name = root.parent(path)
            try:
                _remove(parent, name)
            finally:
                os.close(parent)


def _remove(parent: int, name: str) -> None:
    st = os.stat(name, dir_fd=parent, follow_symlinks=False)
    if stat.S_ISDIR(st.st_mode):
        shutil.rmtree(name, dir_fd=parent)
    else:
        os.unlink(name, dir_fd=parent)
