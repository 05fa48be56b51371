"""A running sandbox's root, held open by the daemon, and the file operations done through it.

Runs in: the daemon (host root, host namespaces); the blocking calls in worker threads.

How a path is resolved. The daemon holds an O_PATH fd of the supervisor's root
(/proc/PID/root, opened through a /proc/PID fd taken while the supervisor's pidfd says it
lives, so a reused pid cannot redirect it). Every lookup is one openat2(RESOLVE_IN_ROOT |
RESOLVE_NO_MAGICLINKS) from that fd: the kernel walks the sandbox's own mounts (its tmpfs
/tmp, its read-only binds), clamps `..` and absolute symlinks at the sandbox's root, and
refuses /proc magic links. What is done at a path is then done on the fds that lookup gave:
the parent's fd and the last name (mkdirat, unlinkat, renameat, fstatat without following),
or the file's own fd (fchown, fchmod). There is no check then use: a directory the sandbox
swaps for a symlink at any moment is resolved, again, inside the sandbox.

Ownership: uid/gid as seen inside map to host ids by the sandbox's uid base (its root inside
is the first uid of its range); without a user namespace they are the host's.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import posixpath
import secrets
import select
import shutil
import stat
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime
from typing import Literal

from daemon.config import UID_RANGE
from daemon.errors import Conflict, InsufficientStorage, Invalid, NotFound, SandboxError
from daemon.linux import syscalls as sc
from daemon.shapes import Entry

CHUNK = 1 << 20  # bytes per read or write of a file's contents
RESOLVE = sc.RESOLVE_IN_ROOT | sc.RESOLVE_NO_MAGICLINKS
OVERFLOW_ID = 65534  # what the kernel shows inside for a host id the sandbox does not map
MAX_LISTED = 100_000
_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC  # a dir fd, by name
_SPACE = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


def clean_path(path: str) -> str:
    """An absolute path as given, normalised lexically (`a/../b` is `b`, as docker cp
    has it); Invalid (422) if relative or with NUL."""
    if "\0" in path:
        raise Invalid(f"path {path!r} holds a NUL byte")
    if not path.startswith("/"):
        raise Invalid(f"path {path!r} is not absolute")
    try:
        path.encode()
    except UnicodeEncodeError as exc:
        raise Invalid(f"path {path!r} is not valid UTF-8") from exc
    return "/" + posixpath.normpath(path).lstrip("/")


def parse_mode(mode: str) -> int:
    if not mode or len(mode) > 4 or any(c not in "01234567" for c in mode):
        raise Invalid(f"mode {mode!r} is not 3 or 4 octal digits, like 0644")
    return int(mode, 8)


@contextlib.contextmanager
def translated(path: str) -> Iterator[None]:
    """The kernel's refusals, as the contract's statuses."""
    try:
        yield
    except OSError as exc:
        raise as_error(exc, path) from exc


def as_error(exc: OSError, path: str) -> SandboxError | OSError:
    code = exc.errno
    if code == errno.ENOENT:
        return NotFound(f"{path}: no such file or directory in the sandbox")
    if code in _SPACE:
        return InsufficientStorage(f"{path}: the sandbox's disk is full (its disk limit)")
    if code == errno.EROFS:
        return Conflict(f"{path}: a read-only place in the sandbox")
    if code in (errno.ENOTDIR, errno.EISDIR):
        return Conflict(f"{path}: {os.strerror(code)} (the wrong kind of file)")
    if code in (errno.EACCES, errno.EPERM):
        return Conflict(f"{path}: not allowed there ({os.strerror(code)})")
    if code in (errno.ENOTEMPTY, errno.EEXIST, errno.EBUSY, errno.EXDEV, errno.EINVAL):
        return Conflict(f"{path}: {os.strerror(code)}")
    if code in (errno.ELOOP, errno.ESRCH):
        return Conflict(f"{path}: {os.strerror(code)}")
    if code == errno.ENAMETOOLONG:
        return Invalid(f"{path}: {os.strerror(code)}")
    return exc


_EARLIEST = datetime.min.replace(tzinfo=UTC)
_LATEST = datetime.max.replace(tzinfo=UTC)


def _as_datetime(seconds: float) -> datetime:
    """A file's time as a datetime, clamped to datetime's years 1 to 9999: a time set inside
    (utime to 1e14 s) is any 64-bit number, and must not fail a listing."""
    try:
        return datetime.fromtimestamp(seconds, UTC)
    except (OverflowError, ValueError, OSError):
        return _LATEST if seconds > 0 else _EARLIEST


def _pidfd_exited(pidfd: int) -> bool:
    poller = select.poll()
    poller.register(pidfd, select.POLLIN)
    return bool(poller.poll(0))


class SandboxRoot:
    """An open handle on a running sandbox's root, and its uid mapping. Close it (or use it
    as a context manager); it stays usable, and contained, should the sandbox end meanwhile."""

    def __init__(self, fd: int, uid_base: int | None) -> None:
        self.fd = fd
        self.uid_base = uid_base

    @classmethod
    def of_process(cls, pid: int, pidfd: int, uid_base: int | None) -> SandboxRoot:
        """The root of the supervisor `pid`, whose pidfd is `pidfd` (to be called on the
        event loop, where the service cannot close that pidfd in between)."""
        try:
            proc = os.open(f"/proc/{pid}", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError as exc:
            raise Conflict("the sandbox is no longer running") from exc
        try:
            # Alive now: so /proc/PID, opened before, is its, and stays its (a /proc/PID fd
            # is bound to the process, not to the number).
            if _pidfd_exited(pidfd):
                raise Conflict("the sandbox is no longer running")
            fd = os.open("root", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=proc)
        except OSError as exc:
            raise Conflict("the sandbox is no longer running") from exc
        finally:
            os.close(proc)
        return cls(fd, uid_base)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> SandboxRoot:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    # -- ids ----------------------------------------------------------------------------------

    def host_id(self, inside: int | None) -> int:
        """The host id of `inside` (None: root inside); Invalid if the sandbox maps none."""
        inside = inside or 0
        if self.uid_base is None:
            return inside
        if not 0 <= inside < UID_RANGE:
            raise Invalid(f"id {inside} is not mapped in the sandbox (0 to {UID_RANGE - 1})")
        return self.uid_base + inside

    def inside_id(self, host: int) -> int:
        if self.uid_base is None:
            return host
        inside = host - self.uid_base
        return inside if 0 <= inside < UID_RANGE else OVERFLOW_ID

    @contextlib.contextmanager
    def creating(self) -> Iterator[None]:
        """Make inodes, in this thread, as the sandbox's root: with its host uid as the
        filesystem ids (an idmapped bind refuses to make a file for a host id it does not
        map) and host root's capabilities still effective (to write where root inside may)."""
        if self.uid_base is None:
            yield
            return
        sc.setfsuid(self.uid_base)
        sc.setfsgid(self.uid_base)
        try:
            sc.raise_effective_capabilities()
            yield
        finally:
            # Back to 0, which gives the capabilities back to the effective set.
            sc.setfsgid(0)
            sc.setfsuid(0)

    # -- resolution ---------------------------------------------------------------------------

    def open(self, path: str, flags: int, mode: int = 0) -> int:
        """openat2 of the absolute sandbox path `path`, resolved in the sandbox's root."""
        return sc.openat2(self.fd, path, flags, mode, RESOLVE)

    def parent(self, path: str) -> tuple[int, str]:
        """An O_PATH fd of `path`'s directory, and its last name (never `/`)."""
        if path == "/":
            raise Conflict("/ is the sandbox's root: it cannot be moved, replaced or deleted")
        head, name = posixpath.split(path)
        return self.open(head, os.O_PATH | os.O_DIRECTORY), name

    def make_dirs(self, path: str, mode: int = 0o755) -> int:
        """An O_PATH fd of the directory `path`, made with its missing parents (owned by root
        inside) if need be."""
        try:
            return self.open(path, os.O_PATH | os.O_DIRECTORY)
        except FileNotFoundError:
            if path == "/":
                raise
        parent = self.make_dirs(posixpath.dirname(path), mode)
        try:
            self.mkdir_at(parent, posixpath.basename(path), mode, self.host_id(0), self.host_id(0))
        except FileExistsError:
            pass  # made meanwhile: whatever it is, the open below resolves it
        finally:
            os.close(parent)
        return self.open(path, os.O_PATH | os.O_DIRECTORY)

    def mkdir_at(self, parent: int, name: str, mode: int, uid: int, gid: int) -> None:
        with self.creating():
            os.mkdir(name, 0o700, dir_fd=parent)  # private until its owner and mode are set
        fd = os.open(name, _DIR, dir_fd=parent)
        try:
            os.fchown(fd, uid, gid)
            os.fchmod(fd, mode)
        finally:
            os.close(fd)

    def entry(self, path: str, st: os.stat_result, target: str | None = None) -> Entry:
        kind: Literal["file", "dir", "symlink", "other"] = "other"
        if stat.S_ISREG(st.st_mode):
            kind = "file"
        elif stat.S_ISDIR(st.st_mode):
            kind = "dir"
        elif stat.S_ISLNK(st.st_mode):
            kind = "symlink"
        return Entry(
            path=path,
            name=posixpath.basename(path) or "/",
            type=kind,
            size=st.st_size,
            mode=f"{stat.S_IMODE(st.st_mode):04o}",
            uid=self.inside_id(st.st_uid),
            gid=self.inside_id(st.st_gid),
            mtime=_as_datetime(st.st_mtime),
            target=target,
        )

    def entry_at(self, parent: int, name: str, path: str) -> Entry:
        st = os.stat(name, dir_fd=parent, follow_symlinks=False)
        target = os.readlink(name, dir_fd=parent) if stat.S_ISLNK(st.st_mode) else None
        return self.entry(path, st, target)

    # -- operations (blocking: run them in a thread) ------------------------------------------

    def stat(self, path: str) -> Entry:
        with translated(path):
            if path == "/":
                return self.entry("/", os.fstat(self.fd))
            parent, name = self.parent(path)
            try:
                return self.entry_at(parent, name, path)
            finally:
                os.close(parent)

    def listing(self, path: str, depth: int) -> list[Entry]:
        """The entries below the directory `path`, `depth` levels down, sorted by path."""
        found: list[Entry] = []
        with translated(path):
            fd = self.open(path, os.O_RDONLY | os.O_DIRECTORY)
        try:
            self._walk(fd, path, depth, found)
        finally:
            os.close(fd)
        return sorted(found, key=lambda e: e.path)

    def _walk(self, fd: int, path: str, depth: int, found: list[Entry]) -> None:
        with os.scandir(fd) as entries:
            for item in entries:
                child = posixpath.join(path, item.name)
                try:
                    found.append(self.entry_at(fd, item.name, child))
                    if len(found) > MAX_LISTED:
                        raise Invalid(f"more than {MAX_LISTED} entries: ask for a smaller depth")
                    if depth > 1 and found[-1].type == "dir":
                        sub = os.open(item.name, _DIR, dir_fd=fd)  # no symlink: O_NOFOLLOW
                        try:
                            self._walk(sub, child, depth - 1, found)
                        finally:
                            os.close(sub)
                except (FileNotFoundError, NotADirectoryError):
                    continue  # removed or replaced while listed: as if it were not there
                except OSError as exc:
                    if exc.errno != errno.ELOOP:
                        raise

    def open_file(self, path: str) -> tuple[int, int]:
        """An fd of the regular file at `path` (symlinks followed inside), and its size."""
        with translated(path):
            # O_NONBLOCK: a FIFO the sandbox put there must not hang the open.
            fd = self.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY)
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            os.close(fd)
            kind = "a directory" if stat.S_ISDIR(st.st_mode) else "not a regular file"
            raise Conflict(f"{path} is {kind}")
        return fd, st.st_size

    def mkdir(
        self, path: str, parents: bool, mode: int, uid: int | None, gid: int | None
    ) -> tuple[Entry, bool]:
        """Make the directory `path`: its Entry, and whether it is new."""
        host_uid, host_gid = self.host_id(uid), self.host_id(gid)
        with translated(path):
            if path == "/":
                if parents:
                    return self.stat("/"), False
                raise Conflict("/ exists")
            head, name = posixpath.split(path)
            parent = self.make_dirs(head) if parents else self.parent(path)[0]
            try:
                try:
                    self.mkdir_at(parent, name, mode, host_uid, host_gid)
                    return self.entry_at(parent, name, path), True
                except FileExistsError:
                    existing = self.entry_at(parent, name, path)
                    if parents and existing.type == "dir":
                        return existing, False
                    raise Conflict(f"{path} exists") from None
            finally:
                os.close(parent)

    def move(self, source: str, target: str) -> Entry:
        with translated(source):
            from_dir, from_name = self.parent(source)
        try:
            with translated(target):
                to_dir, to_name = self.parent(target)
            try:
                with translated(source), self.creating():
                    os.rename(from_name, to_name, src_dir_fd=from_dir, dst_dir_fd=to_dir)
                with translated(target):
                    return self.entry_at(to_dir, to_name, target)
            finally:
                os.close(to_dir)
        finally:
            os.close(from_dir)

    def delete(self, path: str, recursive: bool) -> None:
        with translated(path):
            parent, name = self.parent(path)
            try:
                st = os.stat(name, dir_fd=parent, follow_symlinks=False)
                if not stat.S_ISDIR(st.st_mode):
                    os.unlink(name, dir_fd=parent)
                elif recursive:
                    # The fd-based walk: it opens each directory with O_NOFOLLOW under its
                    # parent's fd, so a symlink swapped in is removed, never followed.
                    shutil.rmtree(name, dir_fd=parent)
                else:
                    try:
                        os.rmdir(name, dir_fd=parent)
                    except OSError as exc:
                        if exc.errno == errno.ENOTEMPTY:
                            raise Conflict(f"{path} is a directory that is not empty") from exc
                        raise
            finally:
                os.close(parent)

    def replace(self, parent: int, temp: str, name: str) -> bool:
        """Rename `temp` to `name` in `parent`; True if nothing was there before."""
        with self.creating():  # an idmapped bind checks the new name's maker too
            try:
                sc.renameat2(parent, temp, parent, name, sc.RENAME_NOREPLACE)
                return True
            except FileExistsError:
                os.rename(temp, name, src_dir_fd=parent, dst_dir_fd=parent)
                return False

    # -- writing a file -----------------------------------------------------------------------

    def create_temp(self, parent: int, name: str) -> tuple[str, int]:
        """A new, empty, private file beside `name`, for a write that replaces it by rename:
        its name and the fd that made it (O_EXCL: that very inode). Use the fd, never the
        name, but to rename it: the sandbox can swap anything (a FIFO, a symlink) in under
        it meanwhile."""
        while True:
            temp = f".{name[:200]}.sandboxd-{secrets.token_hex(6)}"
            flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
            try:
                with self.creating():
                    fd = os.open(temp, flags, 0o600, dir_fd=parent)
            except FileExistsError:
                continue
            except FileNotFoundError as exc:  # the directory is there: e.g. in /proc
                raise Conflict(f"no file can be made in the directory of {name}") from exc
            return temp, fd

    def _start_write(
        self, parent: int, name: str, path: str, mode: int, uid: int, gid: int
    ) -> tuple[str, int]:
        """The temp file of a write (name, fd), its owner and mode set through the fd."""
        with translated(path):
            with contextlib.suppress(FileNotFoundError):
                if stat.S_ISDIR(os.stat(name, dir_fd=parent, follow_symlinks=False).st_mode):
                    raise Conflict(f"{path} is a directory")
            temp, fd = self.create_temp(parent, name)
            try:
                os.fchown(fd, uid, gid)
                os.fchmod(fd, mode)  # after chown, which clears setuid and setgid
            except BaseException:
                os.close(fd)
                with contextlib.suppress(OSError):
                    os.unlink(temp, dir_fd=parent)
                raise
            return temp, fd

    def _finish_write(self, parent: int, temp: str, name: str, path: str) -> tuple[Entry, bool]:
        with translated(path):
            created = self.replace(parent, temp, name)
            return self.entry_at(parent, name, path), created

    async def write(
        self,
        path: str,
        chunks: AsyncIterator[bytes],
        mode: int,
        uid: int | None,
        gid: int | None,
    ) -> tuple[Entry, bool]:
        """Write the file `path` from `chunks`, replacing it by rename (a reader sees the old
        file or the new, never half of one); its Entry and whether it is new. Missing parents
        are made. On any failure, nothing of the write is left. Every blocking call is in a
        worker thread: what the sandbox puts in the way (a FIFO) holds up this write only."""
        host_uid, host_gid = self.host_id(uid), self.host_id(gid)
        if path == "/":
            raise Conflict("/ is a directory")
        head, name = posixpath.split(path)
        with translated(path):
            parent = await asyncio.to_thread(self.make_dirs, head)
        try:
            temp, fd = await asyncio.to_thread(
                self._start_write, parent, name, path, mode, host_uid, host_gid
            )
            try:
                try:
                    await write_chunks(fd, chunks, path)
                finally:
                    os.close(fd)
                return await asyncio.to_thread(self._finish_write, parent, temp, name, path)
            except BaseException:
                with contextlib.suppress(OSError):
                    os.unlink(temp, dir_fd=parent)
                raise
        finally:
            os.close(parent)


async def write_chunks(fd: int, chunks: AsyncIterator[bytes], path: str) -> None:
    """Everything of `chunks` to `fd`, in writes of about CHUNK bytes, off the event loop."""
    pending: list[bytes] = []
    size = 0
    async for chunk in chunks:
        if not chunk:
            continue
        pending.append(chunk)
        size += len(chunk)
        if size >= CHUNK:
            with translated(path):
                await asyncio.to_thread(write_all, fd, b"".join(pending))
            pending, size = [], 0
    if pending:
        with translated(path):
            await asyncio.to_thread(write_all, fd, b"".join(pending))


def write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


async def read_chunks(fd: int, size: int) -> AsyncIterator[bytes]:
    """The first `size` bytes of `fd` (less if it shrank meanwhile), then the fd is closed."""
    try:
        left = size
        while left > 0:
            data = await asyncio.to_thread(os.read, fd, min(CHUNK, left))
            if not data:
                return
            left -= len(data)
            yield data
    finally:
        os.close(fd)
