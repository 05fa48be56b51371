"""Main-command logs, the daemon's side: where each sandbox's lies, and reading it as lines,
filtered, and followed until the command ends.

Runs in: the daemon, on its event loop (file reads in threads). The supervisor writes the log
(daemon/sandbox/logfile.py) into STATE/logs/ID/, a directory the daemon makes for a sandbox
with a `cmd`; it outlives the command, the supervisor and daemon restarts, and goes with the
sandbox's record (delete) or, found without one at start, as a stray.
"""

from __future__ import annotations

import asyncio
import base64
import heapq
import os
import shutil
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import BinaryIO

from daemon.errors import NotFound
from daemon.lifecycle.running import LiveSandbox
from daemon.sandbox.logfile import OLDER, read_records
from daemon.shapes import Encoding, LogLine, LogQuery, LogStream
from daemon.store.database import SandboxRecord, Store

STREAMS: tuple[LogStream, ...] = ("stdout", "stderr")
# How often a follower looks for more: a log is a file the supervisor appends to.
POLL_SECONDS = 0.1

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)

Piece = tuple[float, LogStream, bytes]  # when, which stream, bytes (a line or part of one)


class MainLogs:
    """The logs of the sandboxes' main commands, in `directory`."""

    def __init__(
        self,
        store: Callable[[], Store],
        live: dict[str, LiveSandbox],
        directory: Path,
        limit: int,
    ) -> None:
        self._get_store = store  # the service opens it at start
        self.live = live
        self.directory = directory
        self.limit = limit

    def prepare(self, sandbox_id: str) -> str:
        """The (new, empty) directory of a sandbox's log: the supervisor writes there."""
        self.directory.mkdir(mode=0o700, exist_ok=True)
        path = self.directory / sandbox_id
        path.mkdir(mode=0o700)
        return str(path)

    async def remove(self, sandbox_id: str) -> None:
        await asyncio.to_thread(shutil.rmtree, self.directory / sandbox_id, ignore_errors=True)

    async def remove_strays(self) -> None:
        """Logs of sandboxes the store does not know (a crash between the two removals)."""
        if not self.directory.is_dir():
            return
        for path in self.directory.iterdir():
            try:
                self._get_store().get_sandbox(path.name, pooled_too=True)
            except NotFound:
                await self.remove(path.name)

    def read(self, ref: str, query: LogQuery) -> AsyncIterator[LogLine]:
        """The log's lines the query asks, oldest first. NotFound now (not at the first
        line) for a sandbox that does not exist."""
        return self._read(self._get_store().get_sandbox(ref), query)

    async def _read(self, record: SandboxRecord, query: LogQuery) -> AsyncIterator[LogLine]:
        live = self.live.get(record.id)
        tail, encoding = query.tail, query.encoding
        # Compared as shown: a time is shown to the microsecond, and a client passes it back.
        after = _micros(query.since) if query.since is not None else None
        streams = STREAMS if query.stream is None else (query.stream,)
        cursors = [_Cursor(self.directory / record.id, name) for name in streams]
        try:
            pieces = _merged([await asyncio.to_thread(c.first, self.limit) for c in cursors])
            pieces = [p for p in pieces if after is None or _micros(p[0]) >= after]
            if tail is not None:
                pieces = pieces[max(0, len(pieces) - tail) :] if tail else []
            for piece in pieces:
                yield _line(piece, encoding)
            if not query.follow or record.spec.get("cmd") is None:
                return
            while True:
                # Whether it ended is asked before reading: what it wrote last is then read.
                ended = live is None or self.live.get(record.id) is not live
                for piece in _merged([await asyncio.to_thread(c.more) for c in cursors]):
                    if after is None or _micros(piece[0]) >= after:
                        yield _line(piece, encoding)
                if ended:
                    return
                await asyncio.sleep(POLL_SECONDS)
        finally:
            for cursor in cursors:
                cursor.close()


class _Cursor:
    """How far one stream's log has been read: the newer file held open, so that a follower
    finishes it when the writer turns it into the older one, then goes on with the new one."""

    def __init__(self, directory: Path, name: LogStream) -> None:
        self.path = directory / name
        self.name = name
        self.file: BinaryIO | None = None
        self.offset = 0

    def first(self, limit: int) -> list[Piece]:
        """What the log holds now: its last `limit` bytes."""
        self.file = _open(self.path)
        older = _open(self.path.with_name(self.name + OLDER))
        records = []
        if older is not None:
            with older:
                # Turned between the two opens: the file held is the older one now.
                if self.file is None or not _same(older, self.file):
                    records = read_records(older, 0)[0]
        if self.file is not None:
            newer, self.offset = read_records(self.file, 0)
            records += newer
        excess = sum(len(data) for _, data in records) - limit
        kept = []
        for when, data in records:
            if excess > 0:
                cut = min(excess, len(data))
                excess -= cut
                data = data[cut:]
            if data:
                kept.append((when, data))
        return [(when, self.name, line) for when, data in kept for line in _lines(data)]

    def more(self) -> list[Piece]:
        """What was written since the last read."""
        if self.file is None:
            self.file = _open(self.path)  # the command has not written yet
            if self.file is None:
                return []
        records, self.offset = read_records(self.file, self.offset)
        if not records:
            current = _open(self.path)
            if current is not None and not _same(current, self.file):
                self.file.close()  # turned, and read to its end: on to the new one
                self.file, self.offset = current, 0
                records, self.offset = read_records(self.file, 0)
            elif current is not None:
                current.close()
        return [(when, self.name, line) for when, data in records for line in _lines(data)]

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None


def _open(path: Path) -> BinaryIO | None:
    try:
        return open(path, "rb")  # the cursor closes it
    except FileNotFoundError:
        return None


def _same(a: BinaryIO, b: BinaryIO) -> bool:
    first, second = os.fstat(a.fileno()), os.fstat(b.fileno())
    return (first.st_dev, first.st_ino) == (second.st_dev, second.st_ino)


def _lines(data: bytes) -> list[bytes]:
    """`data` in lines, each with its newline; a last part without one is a line too."""
    parts = data.split(b"\n")
    return [part + b"\n" for part in parts[:-1]] + ([parts[-1]] if parts[-1] else [])


def _merged(streams: list[list[Piece]]) -> list[Piece]:
    """The pieces of both streams in the order of their times (each stream's own order kept)."""
    return list(heapq.merge(*streams, key=lambda piece: piece[0]))


def _micros(when: float | datetime) -> int:
    """A time in microseconds since the epoch, as the datetime shown for it holds them."""
    if not isinstance(when, datetime):
        when = datetime.fromtimestamp(when, UTC)
    return (when - _EPOCH) // timedelta(microseconds=1)


def _line(piece: Piece, encoding: Encoding) -> LogLine:
    when, stream, data = piece
    text = (
        base64.b64encode(data).decode() if encoding == "base64" else data.decode("utf-8", "replace")
    )
    return LogLine(stream=stream, data=text, time=datetime.fromtimestamp(when, UTC))
