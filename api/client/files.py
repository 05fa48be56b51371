"""`sandboxd cp`: copy files and trees between this machine and a sandbox, as `docker cp`
does, as tar streams through the archive endpoints (binary-safe, any size, never whole in
memory)."""

from __future__ import annotations

import io
import os
import posixpath
import sys
import tarfile
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import click
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TextColumn,
    TransferSpeedColumn,
)

from api.client.base import client, examples
from api.client.render import stderr
from api.client.transport import ApiError, Client, path

CHUNK = 1 << 16

HELP = """Copy SRC to DST; one of them is REF:/path in a sandbox, the other a local path
(or `-` for a tar on stdin or stdout).

As `docker cp`: a file or a whole tree is copied. Into an existing directory it lands under
its own name; otherwise it takes DST's name (DST's parent must exist). Files copied in are
owned by root inside; files copied out by the user running `cp`."""


@click.command(
    "cp",
    short_help="Copy files or trees between here and a sandbox",
    help=HELP,
    epilog=examples(
        "sandboxd cp ./app web:/srv/          # the tree app/ into /srv/app",
        "sandboxd cp web:/var/log/app.log .",
        "sandboxd cp web:/data - | tar t      # a tar on stdout",
    ),
)
@click.argument("src")
@click.argument("dst")
def cp(src: str, dst: str) -> int:
    source, target = _split(src), _split(dst)
    if (source[0] is None) == (target[0] is None):
        raise click.UsageError("one of SRC and DST must be REF:/path, the other a local path")
    api = client()
    if source[0] is not None:
        _copy_out(api, source[0], source[1], dst)
    else:
        assert target[0] is not None
        _copy_in(api, src, target[0], target[1])
    return 0


def _split(arg: str) -> tuple[str | None, str]:
    """'REF:/path' → (REF, '/path'); a local path (one with a `/` before any `:`) → (None, it)."""
    ref, sep, rest = arg.partition(":")
    if sep and ref and "/" not in ref:
        return ref, rest or "/"
    return None, arg


def _progress(what: str) -> Progress:
    console = stderr()
    return Progress(
        TextColumn(what),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        console=console,
        transient=False,
        disable=not console.is_terminal,
    )


# -- out of the sandbox ------------------------------------------------------------------------


def _copy_out(api: Client, ref: str, inside: str, local: str) -> None:
    where = path("sandboxes", ref, "archive")
    with api.stream("GET", where, params={"path": inside}) as response, _progress(inside) as bar:
        task = bar.add_task(inside, total=None)

        def chunks() -> Iterator[bytes]:
            for chunk in response.iter_bytes(CHUNK):
                bar.advance(task, len(chunk))
                yield chunk

        if local == "-":
            for chunk in chunks():
                sys.stdout.buffer.write(chunk)
            sys.stdout.buffer.flush()
            return
        _unpack(io.BufferedReader(_ChunkReader(chunks()), CHUNK), Path(local))


def _unpack(stream: io.BufferedReader, local: Path) -> None:
    """Members under `local` if it is a directory, else with the top one renamed to it."""
    if local.is_dir():
        into, rename = local, None
    else:
        into, rename = local.parent if str(local.parent) else Path("."), local.name
        if not into.is_dir():
            raise click.ClickException(f"{into}: no such directory")
    owner = {"uid": os.getuid(), "gid": os.getgid(), "uname": "", "gname": ""}
    top: list[str] = []

    def renamed(name: str) -> str:
        first, sep, rest = (
            name.lstrip("./").partition("/") if name not in (".", "./") else (".", "", "")
        )
        if not top:
            top.append(first)
        if rename is None or first != top[0]:
            return name
        return rename + sep + rest

    def member_filter(member: tarfile.TarInfo, dest: str) -> tarfile.TarInfo:
        changes: dict[str, Any] = {"name": renamed(member.name), **owner}
        if member.islnk():
            changes["linkname"] = renamed(member.linkname)
        filtered = tarfile.data_filter(member.replace(**changes, deep=False), dest)
        return filtered

    with tarfile.open(fileobj=stream, mode="r|*") as archive:
        for member in archive:
            archive.extract(member, into, filter=member_filter)


class _ChunkReader(io.RawIOBase):
    """A file to read from an iterator of byte chunks (what tarfile's stream mode reads)."""

    def __init__(self, chunks: Iterator[bytes]) -> None:
        self.chunks = chunks
        self.pending = b""

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        while not self.pending:
            chunk = next(self.chunks, None)
            if chunk is None:
                return 0
            self.pending = chunk
        size = min(len(buffer), len(self.pending))
        buffer[:size] = self.pending[:size]
        self.pending = self.pending[size:]
        return size


# -- into the sandbox --------------------------------------------------------------------------


def _copy_in(api: Client, local: str, ref: str, inside: str) -> None:
    where = path("sandboxes", ref, "archive")
    if local == "-":  # a tar as it is, into the directory `inside`
        body: Iterator[bytes] = iter(lambda: sys.stdin.buffer.read(CHUNK), b"")
        api.request("PUT", where, params={"path": inside}, content=body, headers=_TAR)
        return
    source = Path(local)
    if not source.exists() and not source.is_symlink():
        raise click.ClickException(f"{local}: no such file or directory")
    into, name = _destination(api, ref, inside, source)
    with _progress(local) as bar:
        task = bar.add_task(local, total=_size(source))
        body = _tar_stream(source, name, lambda n: bar.advance(task, n))
        api.request("PUT", where, params={"path": into}, content=body, headers=_TAR)


_TAR = {"Content-Type": "application/x-tar"}


def _destination(api: Client, ref: str, inside: str, source: Path) -> tuple[str, str]:
    """Where the tar is unpacked and the name the source gets there."""
    try:
        entry = api.get(path("sandboxes", ref, "files", "stat"), params={"path": inside})
    except ApiError as exc:
        if exc.status != 404 or exc.detail.startswith("no route"):
            raise
        entry = None
    if entry is not None and entry.get("type") == "dir":
        return inside, source.name or "."
    if entry is not None and source.is_dir():
        raise click.ClickException(f"cannot copy a directory onto the file {inside}")
    parent, name = posixpath.split(inside.rstrip("/") or "/")
    return parent or "/", name


def _size(source: Path) -> int:
    if not source.is_dir():
        return source.lstat().st_size
    return sum(
        (Path(root) / name).lstat().st_size for root, _, names in os.walk(source) for name in names
    )


def _tar_stream(source: Path, name: str, advance: Callable[[int], None]) -> Iterator[bytes]:
    """A tar of `source` named `name`, made in a thread as it is read (never whole in memory);
    owned by root, as the sandbox will see it."""
    read_end, write_end = os.pipe()
    failure: list[BaseException] = []

    def as_root(member: tarfile.TarInfo) -> tarfile.TarInfo:
        member.uid = member.gid = 0
        member.uname = member.gname = ""
        return member

    def write() -> None:
        try:
            with (
                os.fdopen(write_end, "wb") as pipe,
                tarfile.open(fileobj=pipe, mode="w|", format=tarfile.PAX_FORMAT) as archive,
            ):
                archive.add(source, arcname=name, filter=as_root)
        except BaseException as exc:
            failure.append(exc)

    writer = threading.Thread(target=write, daemon=True, name="tar-writer")
    writer.start()
    with os.fdopen(read_end, "rb") as pipe:
        while chunk := pipe.read(CHUNK):
            advance(len(chunk))
            yield chunk
    writer.join()
    if failure:
        raise click.ClickException(f"reading {source}: {failure[0]}")
