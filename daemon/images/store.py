"""The image store's files: blobs by digest, and each layer unpacked once, by diff id.

Runs in: the daemon (host root); unpacking in worker threads.

    STATE/images/              0700: nothing in it is reachable by the host's other users, so
                               a setuid file of an image cannot be run from the host
        blobs/sha256/HEX       manifests, configs and layers as they came, content-addressed
        layers/HEX             a layer (by its diff id's hex) unpacked, read-only from then on:
                               one overlay lower layer of every sandbox whose image has it
        tmp/                   blobs being received and layers being unpacked; emptied at start
A blob or layer appears under its final name only once complete and checked (a rename), so a
crash or a dropped connection leaves at most a file in tmp/, never a corrupt blob.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import IO

from daemon.images.unpack import LayerError, unpack_layer

DIGEST_PREFIX = "sha256:"


class DigestMismatch(Exception):
    """What was received is not what its digest or size says."""


def hex_of(digest: str) -> str:
    """The hex of a sha256 digest; ValueError for anything else (a path must never come of
    a digest that is not 64 hex digits)."""
    algorithm, _, value = digest.partition(":")
    if algorithm != "sha256" or len(value) != 64 or not all(c in "0123456789abcdef" for c in value):
        raise ValueError(f"not a sha256 digest: {digest!r}")
    return value


class BlobWriter:
    """A blob being received into tmp/: written in chunks, hashed as it goes, then committed
    under its digest (checked) or thrown away."""

    def __init__(self, files: ImageFiles) -> None:
        self.files = files
        fd, name = tempfile.mkstemp(dir=files.tmp, prefix="blob-")
        self.path = Path(name)
        self.file: IO[bytes] = os.fdopen(fd, "wb")
        self.hash = hashlib.sha256()
        self.size = 0

    def write(self, chunk: bytes) -> None:
        self.file.write(chunk)
        self.hash.update(chunk)
        self.size += len(chunk)

    def reset(self) -> None:
        """Start again from nothing (a server that would not resume)."""
        self.file.seek(0)
        self.file.truncate()
        self.hash = hashlib.sha256()
        self.size = 0

    def commit(self, digest: str | None, size: int | None = None) -> str:
        """Move the blob to its place: under `digest`, DigestMismatch (and nothing kept) if it
        is not that or not `size` bytes; under its own digest when `digest` is None."""
        self.file.close()
        actual = DIGEST_PREFIX + self.hash.hexdigest()
        try:
            if size is not None and self.size != size:
                raise DigestMismatch(f"{digest}: got {self.size} bytes, expected {size}")
            if digest is not None and actual != digest:
                raise DigestMismatch(f"{digest}: the content's digest is {actual}")
            os.rename(self.path, self.files.blob_path(actual))
        except BaseException:
            self.path.unlink(missing_ok=True)
            raise
        return actual

    def abort(self) -> None:
        self.file.close()
        self.path.unlink(missing_ok=True)


class ImageFiles:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.blobs = root / "blobs" / "sha256"
        self.layers = root / "layers"
        self.tmp = root / "tmp"

    def setup(self) -> None:
        """Make the directories (root only), and empty tmp/ of what a crash left."""
        self.root.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(self.root, 0o700)
        for path in (self.blobs, self.layers, self.tmp):
            path.mkdir(mode=0o700, parents=True, exist_ok=True)
        for leftover in self.tmp.iterdir():
            _remove(leftover)

    def blob_path(self, digest: str) -> Path:
        return self.blobs / hex_of(digest)

    def has_blob(self, digest: str) -> bool:
        return self.blob_path(digest).is_file()

    def read_blob(self, digest: str) -> bytes:
        return self.blob_path(digest).read_bytes()

    def writer(self) -> BlobWriter:
        return BlobWriter(self)

    def layer_path(self, diff_id: str) -> Path:
        return self.layers / hex_of(diff_id)

    def unpack(self, blob_digest: str, diff_id: str) -> Path:
        """The layer `diff_id` unpacked from its blob, unpacked now unless it is already.
        DigestMismatch (nothing kept) if the blob's tar is not `diff_id`; LayerError if the
        blob is no tar."""
        target = self.layer_path(diff_id)
        if target.is_dir():
            return target
        work = Path(tempfile.mkdtemp(dir=self.tmp, prefix="layer-"))
        try:
            os.chmod(work, 0o755)  # the image's root directory: seen by the sandbox as /
            actual = unpack_layer(str(self.blob_path(blob_digest)), str(work))
            if actual != diff_id:
                raise DigestMismatch(f"layer {blob_digest}: its tar is {actual}, not {diff_id}")
            try:
                os.rename(work, target)
            except OSError:  # unpacked meanwhile by another import: theirs is as good
                if not target.is_dir():
                    raise
                _remove(work)
        except BaseException:
            _remove(work)
            raise
        return target

    def remove_unused(self, blobs: set[str], layers: set[str]) -> None:
        """Remove every blob and layer not in `blobs` (digests) and `layers` (diff ids)."""
        keep_blobs = {hex_of(d) for d in blobs}
        keep_layers = {hex_of(d) for d in layers}
        for path in self.blobs.iterdir():
            if path.name not in keep_blobs:
                path.unlink(missing_ok=True)
        for path in self.layers.iterdir():
            if path.name not in keep_layers:
                _remove(path)


def _remove(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()


__all__ = ["BlobWriter", "DigestMismatch", "ImageFiles", "LayerError", "hex_of"]
