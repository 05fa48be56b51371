"""Following an exec's output live: the daemon's side of SUBSCRIBE/OUTPUT (daemon/protocol.py).

A follower first gets the output that is already in the exec's files, up to the offsets the
supervisor gave when it subscribed it, then every chunk the supervisor relays after them, and
at last whatever the stored record holds beyond what it has seen (the record is complete up
to the output limit, so a follower that fell behind still ends with all that was kept).

The files are read when SUBSCRIBED is handled, not later by the follower's task: the EXITED
that may follow at once moves the exec to the store and empties its files before that task
runs again, and the bytes before the offsets would be lost to it.
"""

from __future__ import annotations

import asyncio
import base64
import codecs
import contextlib
from dataclasses import dataclass, field
from pathlib import Path

STREAMS = ("stdout", "stderr")
# Chunks (up to 64 KiB each) a follower may fall behind before it misses some live output.
QUEUE_CHUNKS = 256

Chunk = tuple[str, int, bytes]  # stream, offset of its first byte, bytes


@dataclass(frozen=True)
class Subscription:
    """What SUBSCRIBED gave a follower: the offset of the first byte it will relay of each
    stream, and the bytes before it that the exec's files held (fewer past the limit)."""

    offsets: dict[str, int]
    prefix: dict[str, bytes]

    @classmethod
    def read(cls, path: Path, offsets: dict[str, int]) -> Subscription:
        """The subscription of the exec whose files are in `path`, read now."""
        return cls(offsets, {s: read_prefix(path / s, offsets[s]) for s in STREAMS})


def _subscription_future() -> asyncio.Future[Subscription | None]:
    return asyncio.get_running_loop().create_future()


@dataclass(eq=False)
class Follower:
    """One client following one exec."""

    queue: asyncio.Queue[Chunk | None] = field(default_factory=lambda: asyncio.Queue(QUEUE_CHUNKS))
    subscribed: asyncio.Future[Subscription | None] = field(default_factory=_subscription_future)

    def push(self, chunk: Chunk) -> None:
        with contextlib.suppress(asyncio.QueueFull):  # too slow: a gap, seen by its offset
            self.queue.put_nowait(chunk)

    def end(self) -> None:
        """The exec ended (or its sandbox did): no more chunks will come."""
        if not self.subscribed.done():
            self.subscribed.set_result(None)
        if self.queue.full():
            self.queue.get_nowait()  # the end must arrive; a chunk lost is a gap like any
        self.queue.put_nowait(None)


@dataclass
class OutputCursor:
    """What a follower has been sent of each stream, and the bytes as the exec's encoding
    wants them: base64 of each piece (the pieces decoded and joined are the bytes), or text
    decoded incrementally (UTF-8, invalid bytes replaced), which yields exactly what decoding
    the whole would.
    """

    encoding: str = "utf-8"
    seen: dict[str, int] = field(default_factory=lambda: dict.fromkeys(STREAMS, 0))
    decoders: dict[str, codecs.IncrementalDecoder] = field(
        default_factory=lambda: {
            s: codecs.getincrementaldecoder("utf-8")("replace") for s in STREAMS
        }
    )

    def feed(self, stream: str, offset: int, data: bytes) -> str:
        """The bytes at `offset` that were not seen yet, encoded ('' if none)."""
        end = offset + len(data)
        if end <= self.seen[stream]:
            return ""
        data = data[max(0, self.seen[stream] - offset) :]
        self.seen[stream] = end
        if self.encoding == "base64":
            return base64.b64encode(data).decode()
        return self.decoders[stream].decode(data)

    def rest(self, stream: str, stored: bytes) -> str:
        """What the stored record holds beyond the bytes already seen, and the end of the
        stream: a sequence the decoder held back incomplete comes out replaced."""
        text = self.feed(stream, 0, stored)
        if self.encoding == "base64":
            return text
        return text + self.decoders[stream].decode(b"", final=True)


def read_prefix(path: Path, size: int | None = None) -> bytes:
    """The first `size` bytes of an exec's output file (all of it with None; fewer if it
    holds fewer, nothing if it is gone)."""
    try:
        with open(path, "rb") as f:
            return f.read(size)
    except OSError:
        return b""
