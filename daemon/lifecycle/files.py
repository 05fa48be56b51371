"""A running sandbox's files for the HTTP face: the contract's operations on one open root.

Runs in: the daemon's event loop; each blocking step in a worker thread.

What it adds to daemon/lifecycle/rooted.py (resolution in the sandbox's root, by fd) and
daemon/lifecycle/archive.py (tar out and in): the checks of what a client sends (absolute
paths without NUL, modes, ids), the threads, and who closes the root: `close()` for the
operations that answer at once, the end of the stream for those that stream.
"""

from __future__ import annotations

import asyncio
import builtins
from collections.abc import AsyncIterator

from daemon.errors import Invalid
from daemon.lifecycle import archive
from daemon.lifecycle.rooted import SandboxRoot, clean_path, parse_mode, read_chunks
from daemon.shapes import Entry, MkdirRequest

MAX_DEPTH = 64


class Files:
    """One sandbox's files through its open root (daemon.shapes.SandboxFiles)."""

    def __init__(self, root: SandboxRoot) -> None:
        self.root = root

    def close(self) -> None:
        self.root.close()

    async def stat(self, path: str) -> Entry:
        return await asyncio.to_thread(self.root.stat, clean_path(path))

    async def list(self, path: str, depth: int) -> builtins.list[Entry]:
        if not 1 <= depth <= MAX_DEPTH:
            raise Invalid(f"depth must be from 1 to {MAX_DEPTH}")
        return await asyncio.to_thread(self.root.listing, clean_path(path), depth)

    async def mkdir(self, spec: MkdirRequest) -> tuple[Entry, bool]:
        path, mode = clean_path(spec.path), parse_mode(spec.mode)
        make = self.root.mkdir
        return await asyncio.to_thread(make, path, spec.parents, mode, spec.uid, spec.gid)

    async def move(self, source: str, to: str) -> Entry:
        return await asyncio.to_thread(self.root.move, clean_path(source), clean_path(to))

    async def delete(self, path: str, recursive: bool) -> None:
        await asyncio.to_thread(self.root.delete, clean_path(path), recursive)

    async def read(self, path: str) -> tuple[int, AsyncIterator[bytes]]:
        """The file's size and its bytes; the stream closes the root when it ends."""
        fd, size = await asyncio.to_thread(self.root.open_file, clean_path(path))
        return size, self._closing(read_chunks(fd, size))

    async def write(
        self,
        path: str,
        chunks: AsyncIterator[bytes],
        mode: str,
        uid: int | None,
        gid: int | None,
    ) -> tuple[Entry, bool]:
        return await self.root.write(clean_path(path), chunks, parse_mode(mode), uid, gid)

    async def archive(self, path: str) -> AsyncIterator[bytes]:
        """The tar of `path`, checked to exist first; the stream closes the root."""
        top = await asyncio.to_thread(archive.find_top, self.root, clean_path(path))
        return self._closing(archive.tar_out(self.root, top))

    async def unpack(self, path: str, chunks: AsyncIterator[bytes]) -> None:
        await archive.tar_in(self.root, clean_path(path), chunks)

    async def _closing(self, chunks: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
        try:
            async for chunk in chunks:
                yield chunk
        finally:
            self.close()
