"""Reading an image archive: an OCI image layout in a tar, or a `docker save` / `podman
save` tar, into the blob store.

Runs in: the daemon, in a worker thread, over the archive spooled to a file (an OCI layout may
put index.json after its blobs, so the tar is read by random access, not as a stream).

An OCI layout: index.json → (an index, resolved by platform) → a manifest → config and layers,
every blob under blobs/sha256/HEX and checked against its digest as it is copied. A docker
archive: manifest.json names the config file and the layer tars (uncompressed); sandboxd
writes the OCI manifest those make, so that the image has a manifest digest like any other.
Newer Docker writes both: the OCI layout is then the one read.
"""

from __future__ import annotations

import json
import posixpath
import tarfile
from typing import IO, Any

from daemon.images.manifests import (
    MAX_JSON,
    OCI_LAYER,
    OCI_MANIFEST,
    ManifestError,
    Resolved,
    descriptor,
    is_index,
    load,
    pick_platform,
    resolve,
)
from daemon.images.store import ImageFiles

_CHUNK = 1 << 20
_REF_NAME = "org.opencontainers.image.ref.name"


class ArchiveError(Exception):
    """The tar is not an image archive sandboxd can read."""


def read_archive(path: str, files: ImageFiles, platform: str) -> Resolved:
    """Copy the image in the archive at `path` into `files`' blobs; what it is."""
    try:
        with tarfile.open(path, "r:*") as tar:
            members = {_clean(m.name): m for m in tar.getmembers() if m.isreg()}
            if "index.json" in members:
                return _oci_layout(tar, members, files, platform)
            if "manifest.json" in members:
                return _docker_archive(tar, members, files)
    except (tarfile.TarError, EOFError, OSError) as exc:
        raise ArchiveError(f"the body is not a readable tar: {exc}") from exc
    raise ArchiveError("the tar holds neither index.json (OCI layout) nor manifest.json (docker)")


def _clean(name: str) -> str:
    return posixpath.normpath("/" + name).lstrip("/")


def _member(tar: tarfile.TarFile, members: dict[str, tarfile.TarInfo], name: str) -> IO[bytes]:
    member = members.get(_clean(name))
    stream = None if member is None else tar.extractfile(member)
    if stream is None:
        raise ArchiveError(f"the archive has no file {name}")
    return stream


def _json(tar: tarfile.TarFile, members: dict[str, tarfile.TarInfo], name: str) -> Any:
    data = _member(tar, members, name).read(MAX_JSON + 1)
    if len(data) > MAX_JSON:
        raise ArchiveError(f"{name} is too large for a manifest")
    try:
        return json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ArchiveError(f"{name} is not JSON: {exc}") from exc


def _copy_blob(
    tar: tarfile.TarFile,
    members: dict[str, tarfile.TarInfo],
    files: ImageFiles,
    name: str,
    digest: str | None,
    size: int | None,
) -> str:
    """The file `name` of the archive into the blob store, checked against `digest` and
    `size` when given; its digest."""
    if digest is not None and files.has_blob(digest):
        return digest
    source = _member(tar, members, name)
    writer = files.writer()
    try:
        while chunk := source.read(_CHUNK):
            writer.write(chunk)
    except BaseException:
        writer.abort()
        raise
    return writer.commit(digest, size)


def _oci_layout(
    tar: tarfile.TarFile, members: dict[str, tarfile.TarInfo], files: ImageFiles, platform: str
) -> Resolved:
    def blob(digest: str, size: int) -> str:
        return _copy_blob(tar, members, files, f"blobs/sha256/{digest[7:]}", digest, size)

    index = _json(tar, members, "index.json")
    if not isinstance(index, dict):
        raise ArchiveError("index.json is not a JSON object")
    entry = pick_platform(index, platform)
    for _depth in range(4):  # an index may point at an index
        digest, size, media_type = descriptor(entry, "a manifest", MAX_JSON)
        data = files.read_blob(blob(digest, size))
        manifest = load(data, f"manifest {digest}")
        if not is_index(manifest, media_type or None):
            break
        entry = pick_platform(manifest, platform)
    else:
        raise ManifestError("indexes nested too deep")
    config_digest, config_size, _ = descriptor(manifest.get("config"), "the config", MAX_JSON)
    config = files.read_blob(blob(config_digest, config_size))
    resolved = resolve(manifest, digest, config, config_digest)
    for layer in resolved.layers:
        blob(layer.digest, layer.size)
    name = (index.get("manifests", [{}])[0].get("annotations") or {}).get(_REF_NAME)
    if isinstance(name, str) and ":" in name and "/" in name:  # a full reference, not a bare tag
        resolved.names = [name]
    return resolved


def _docker_archive(
    tar: tarfile.TarFile, members: dict[str, tarfile.TarInfo], files: ImageFiles
) -> Resolved:
    entries = _json(tar, members, "manifest.json")
    if not isinstance(entries, list) or not entries or not isinstance(entries[0], dict):
        raise ArchiveError("manifest.json lists no image")
    if len(entries) > 1:
        raise ArchiveError("the archive holds several images: sandboxd imports one at a time")
    entry = entries[0]
    config_name, layer_names = entry.get("Config"), entry.get("Layers")
    if not isinstance(config_name, str) or not isinstance(layer_names, list):
        raise ArchiveError("manifest.json names no Config or no Layers")
    config_digest = _copy_blob(tar, members, files, config_name, None, None)
    config = files.read_blob(config_digest)
    layers = []
    for name in layer_names:
        digest = _copy_blob(tar, members, files, str(name), None, None)
        size = files.blob_path(digest).stat().st_size
        layers.append({"mediaType": OCI_LAYER, "digest": digest, "size": size})
    manifest = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": {
            "mediaType": "application/vnd.oci.image.config.v1+json",
            "digest": config_digest,
            "size": len(config),
        },
        "layers": layers,
    }
    writer = files.writer()
    writer.write(json.dumps(manifest, separators=(",", ":")).encode())
    digest = writer.commit(None)
    resolved = resolve(manifest, digest, config, config_digest)
    tags = entry.get("RepoTags") or []
    resolved.names = [t for t in tags if isinstance(t, str)]
    return resolved
