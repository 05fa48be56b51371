"""OCI and Docker image manifests read into one shape: which config, which layers.

Runs in: the daemon; pure functions over JSON, shared by the importer and the registry client.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from daemon.images.store import hex_of

OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
INDEXES = (OCI_INDEX, DOCKER_LIST)
MANIFESTS = (OCI_MANIFEST, DOCKER_MANIFEST)
OCI_LAYER = "application/vnd.oci.image.layer.v1.tar"
# Layers sandboxd can unpack: plain tar and gzip (zstd is refused by name, not misread).
LAYER_TYPES = (
    OCI_LAYER,
    OCI_LAYER + "+gzip",
    "application/vnd.docker.image.rootfs.diff.tar",
    "application/vnd.docker.image.rootfs.diff.tar.gzip",
)


class ManifestError(Exception):
    """A manifest, index or config that is not what an image needs."""


@dataclass
class LayerRef:
    digest: str  # of the blob as stored (compressed or not)
    diff_id: str  # of the uncompressed tar, from the config
    size: int
    media_type: str

    def as_dict(self) -> dict[str, Any]:
        return {
            "digest": self.digest,
            "diff_id": self.diff_id,
            "size": self.size,
            "media_type": self.media_type,
        }


@dataclass
class Resolved:
    """One image's manifest read with its config: what the store records of it."""

    digest: str  # of the manifest
    config_digest: str
    layers: list[LayerRef]
    config: dict[str, Any]  # env, cmd, entrypoint, working_dir, user
    names: list[str] = field(default_factory=list)


def load(data: bytes, what: str) -> dict[str, Any]:
    try:
        value = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ManifestError(f"{what} is not JSON: {exc}") from exc
    if not isinstance(value, dict):
        raise ManifestError(f"{what} is not a JSON object")
    return value


def is_index(manifest: dict[str, Any], media_type: str | None = None) -> bool:
    kind = media_type or manifest.get("mediaType")
    return kind in INDEXES or (kind is None and "manifests" in manifest)


def pick_platform(index: dict[str, Any], platform: str) -> dict[str, Any]:
    """The descriptor in `index` for `platform` (os/arch[/variant]); an index with a single
    manifest that names no platform is that manifest (an OCI layout's usual index.json)."""
    wanted = platform.split("/")
    entries = [m for m in index.get("manifests", []) if isinstance(m, dict)]
    for entry in entries:
        plat = entry.get("platform")
        if not isinstance(plat, dict):
            continue
        have = [plat.get("os"), plat.get("architecture")]
        if len(wanted) == 3:
            have.append(plat.get("variant"))
        if have == wanted:
            return entry
    unnamed = [e for e in entries if "platform" not in e]
    if len(unnamed) == 1 and len(entries) == 1:
        return unnamed[0]
    offered = sorted(
        "/".join(str(v) for v in (p.get("os"), p.get("architecture"), p.get("variant")) if v)
        for e in entries
        if isinstance(p := e.get("platform"), dict)
    )
    raise ManifestError(f"no manifest for {platform} (the index has: {', '.join(offered)})")


MAX_JSON = 4 << 20  # a manifest, index or config larger than this is refused unread


def descriptor(value: Any, what: str, limit: int | None = None) -> tuple[str, int, str]:
    """(digest, size, media type) of a descriptor, checked; its size at most `limit`."""
    if not isinstance(value, dict):
        raise ManifestError(f"{what} is not a descriptor")
    digest, size = value.get("digest"), value.get("size")
    try:
        hex_of(str(digest))
    except ValueError as exc:
        raise ManifestError(f"{what}: {exc}") from exc
    if not isinstance(size, int) or size < 0:
        raise ManifestError(f"{what} has no size")
    if limit is not None and size > limit:
        raise ManifestError(f"{what} is {size} bytes: more than {limit} is no manifest or config")
    return str(digest), size, str(value.get("mediaType", ""))


def resolve(
    manifest: dict[str, Any], manifest_digest: str, config_data: bytes, config_digest: str
) -> Resolved:
    """The image of `manifest` (not an index) with its config (already fetched and checked)."""
    config = load(config_data, "the image config")
    diff_ids = config.get("rootfs", {}).get("diff_ids", [])
    layers_field = manifest.get("layers")
    if not isinstance(layers_field, list) or not isinstance(diff_ids, list):
        raise ManifestError("the manifest or config lists no layers")
    if len(diff_ids) != len(layers_field):
        raise ManifestError(
            f"the manifest has {len(layers_field)} layers, its config {len(diff_ids)} diff ids"
        )
    layers = []
    for index, (entry, diff_id) in enumerate(zip(layers_field, diff_ids, strict=True)):
        digest, size, media_type = descriptor(entry, f"layer {index}")
        if media_type and media_type not in LAYER_TYPES:
            raise ManifestError(f"layer {index} is {media_type}: sandboxd reads tar and tar+gzip")
        try:
            hex_of(str(diff_id))
        except ValueError as exc:
            raise ManifestError(f"diff id {index}: {exc}") from exc
        layers.append(LayerRef(digest, str(diff_id), size, media_type or OCI_LAYER))
    return Resolved(
        digest=manifest_digest,
        config_digest=config_digest,
        layers=layers,
        config=container_config(config),
    )


def container_config(config: dict[str, Any]) -> dict[str, Any]:
    """The part of an image config a sandbox takes: env as a dict, cmd, entrypoint,
    working_dir, user."""
    inner = config.get("config") or {}
    env: dict[str, str] = {}
    for item in inner.get("Env") or []:
        if isinstance(item, str) and "=" in item:
            key, _, value = item.partition("=")
            if key and "\x00" not in item:
                env[key] = value

    def argv(value: Any) -> list[str] | None:
        if isinstance(value, list) and all(isinstance(v, str) for v in value):
            return list(value)
        return None

    return {
        "env": env,
        "cmd": argv(inner.get("Cmd")),
        "entrypoint": argv(inner.get("Entrypoint")),
        "working_dir": str(inner.get("WorkingDir") or ""),
        "user": str(inner.get("User") or ""),
    }
