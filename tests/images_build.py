"""Test images built without a network: layers tarred here from the host's static busybox and
files written here, packed as an OCI image layout tar or a `docker save` tar.

The test image, two layers:
  1. /bin/busybox (static) and its applets as links; /etc/passwd naming `app` (1000:1000);
     /home/app owned by 1000; /app/hello.txt; /usr/bin/suidfile (mode 4755, owner root);
     /opt/gone.txt, /opt/dir/{a,b}.txt; a device node /data/nulldev; a member climbing out
     (`../../<climb>`); a symlink `up -> /` and a member through it (`up/etc/<climb>`)
  2. a whiteout of /opt/gone.txt, /opt/dir made opaque with c.txt in it, /app/second.txt
Config: env PATH and GREETING, working dir /app, user `app`. The bench adds a third layer of
random files to make a large image (`filler_mb`).
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

BUSYBOX = Path("/bin/busybox")
APPLETS = ("sh", "ls", "cat", "id", "stat", "env", "pwd", "echo", "true", "test", "sleep", "find")
MTIME = 1_700_000_000
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER = "application/vnd.oci.image.layer.v1.tar"


def digest_of(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


class LayerTar:
    """One layer's tar, member by member, every owner and mode as given."""

    def __init__(self) -> None:
        self.buffer = io.BytesIO()
        # Closed by bytes(), once every member is in.
        self.tar = tarfile.open(fileobj=self.buffer, mode="w", format=tarfile.PAX_FORMAT)  # noqa: SIM115

    def _info(self, name: str, kind: bytes, mode: int, uid: int) -> tarfile.TarInfo:
        info = tarfile.TarInfo(name)
        info.type, info.mode, info.uid, info.gid, info.mtime = kind, mode, uid, uid, MTIME
        return info

    def dir(self, name: str, mode: int = 0o755, uid: int = 0) -> None:
        self.tar.addfile(self._info(name, tarfile.DIRTYPE, mode, uid))

    def file(self, name: str, data: bytes, mode: int = 0o644, uid: int = 0) -> None:
        info = self._info(name, tarfile.REGTYPE, mode, uid)
        info.size = len(data)
        self.tar.addfile(info, io.BytesIO(data))

    def symlink(self, name: str, target: str) -> None:
        info = self._info(name, tarfile.SYMTYPE, 0o777, 0)
        info.linkname = target
        self.tar.addfile(info)

    def hardlink(self, name: str, target: str) -> None:
        info = self._info(name, tarfile.LNKTYPE, 0o644, 0)
        info.linkname = target
        self.tar.addfile(info)

    def device(self, name: str) -> None:
        info = self._info(name, tarfile.CHRTYPE, 0o666, 0)
        info.devmajor, info.devminor = 1, 3  # /dev/null's numbers
        self.tar.addfile(info)

    def bytes(self) -> bytes:
        self.tar.close()
        return self.buffer.getvalue()


@dataclass
class BuiltImage:
    layers: list[bytes]  # uncompressed tars, bottom first
    config: dict[str, Any]
    climb: str  # the name the climbing members use
    gzip_layers: bool = True
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def diff_ids(self) -> list[str]:
        return [digest_of(layer) for layer in self.layers]

    def blobs(self) -> tuple[list[bytes], bytes]:
        """The layer blobs as stored (gzipped, but the last) and the config's bytes."""
        blobs = [
            gzip.compress(layer, mtime=0) if self.gzip_layers and i == 0 else layer
            for i, layer in enumerate(self.layers)
        ]
        config = dict(self.config)
        config["rootfs"] = {"type": "layers", "diff_ids": self.diff_ids}
        return blobs, json.dumps(config, sort_keys=True).encode()

    def manifest(self) -> tuple[bytes, list[tuple[str, bytes]]]:
        """The OCI manifest's bytes, and every blob it names (config first) by digest."""
        layers, config = self.blobs()
        manifest = {
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": {"mediaType": OCI_CONFIG, "digest": digest_of(config), "size": len(config)},
            "layers": [
                {
                    "mediaType": OCI_LAYER + ("+gzip" if blob[:2] == b"\x1f\x8b" else ""),
                    "digest": digest_of(blob),
                    "size": len(blob),
                }
                for blob in layers
            ],
        }
        blobs = [(digest_of(config), config), *((digest_of(b), b) for b in layers)]
        return json.dumps(manifest, sort_keys=True).encode(), blobs


def build_image(
    climb: str, arch: str = "amd64", user: str = "app", filler_mb: int = 0
) -> BuiltImage:
    """The test image; `filler_mb`: a third layer of that many MiB of random files."""
    base = LayerTar()
    for name in ("bin", "etc", "home", "app", "usr", "usr/bin", "opt", "opt/dir", "data", "tmp"):
        base.dir(name, 0o1777 if name == "tmp" else 0o755)
    base.file("bin/busybox", BUSYBOX.read_bytes(), 0o755)
    for applet in APPLETS:
        base.symlink(f"bin/{applet}", "busybox")
    base.file("etc/passwd", b"root:x:0:0:root:/root:/bin/sh\napp:x:1000:1000::/home/app:/bin/sh\n")
    base.file("etc/group", b"root:x:0:\napp:x:1000:\n")
    base.dir("home/app", 0o750, uid=1000)
    base.file("home/app/owned.txt", b"mine\n", 0o600, uid=1000)
    base.file("app/hello.txt", b"hello from the image\n")
    base.hardlink("app/hello-link.txt", "app/hello.txt")
    base.file("usr/bin/suidfile", b"#!/bin/sh\n", 0o4755)
    base.file("opt/gone.txt", b"removed by the second layer\n")
    base.file("opt/dir/a.txt", b"a\n")
    base.file("opt/dir/b.txt", b"b\n")
    base.device("data/nulldev")
    base.file(f"../../{climb}", b"climbed\n")
    base.symlink("up", "/")
    base.file(f"up/etc/{climb}", b"through a link\n")
    top = LayerTar()
    top.file("opt/.wh.gone.txt", b"")
    top.dir("opt/dir", 0o755)
    top.file("opt/dir/.wh..wh..opq", b"")
    top.file("opt/dir/c.txt", b"c\n")
    top.file("app/second.txt", b"from layer two\n")
    config = {
        "architecture": arch,
        "os": "linux",
        "config": {
            "Env": ["PATH=/bin:/usr/bin", "GREETING=hello", f"ARCH={arch}"],
            "WorkingDir": "/app",
            "User": user,
            "Cmd": ["sh"],
        },
    }
    layers = [base.bytes(), top.bytes()]
    if filler_mb:
        filler = LayerTar()
        filler.dir("filler")
        for index in range(0, filler_mb, 10):
            filler.file(f"filler/{index:05d}.bin", os.urandom(min(10, filler_mb - index) << 20))
        layers.append(filler.bytes())
    return BuiltImage(layers, config, climb)


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), MTIME, 0o644
    tar.addfile(info, io.BytesIO(data))


def oci_layout_tar(path: Path, images: dict[str, BuiltImage], tag: str = "1") -> str:
    """An OCI image layout tar of one image, or of an index of several by platform
    (`images` keyed by os/arch); the digest of the manifest (or index) index.json names."""
    blobs: dict[str, bytes] = {}
    entries = []
    for platform, image in images.items():
        manifest, image_blobs = image.manifest()
        blobs.update(image_blobs)
        blobs[digest_of(manifest)] = manifest
        os_name, arch = platform.split("/")
        entries.append(
            {
                "mediaType": OCI_MANIFEST,
                "digest": digest_of(manifest),
                "size": len(manifest),
                "platform": {"os": os_name, "architecture": arch},
            }
        )
    annotations = {"org.opencontainers.image.ref.name": tag}
    if len(entries) == 1:
        top = dict(entries[0])
        del top["platform"]
    else:
        index = json.dumps({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": entries})
        blobs[digest_of(index.encode())] = index.encode()
        top = {"mediaType": OCI_INDEX, "digest": digest_of(index.encode()), "size": len(index)}
    top["annotations"] = annotations
    with tarfile.open(path, "w") as tar:
        _add(tar, "oci-layout", b'{"imageLayoutVersion": "1.0.0"}')
        _add(tar, "index.json", json.dumps({"schemaVersion": 2, "manifests": [top]}).encode())
        for digest, data in blobs.items():
            _add(tar, f"blobs/sha256/{digest[7:]}", data)
    return str(top["digest"])


def docker_archive_tar(path: Path, image: BuiltImage, tag: str) -> None:
    """A `docker save` tar: manifest.json, the config as HEX.json, each layer as DIR/layer.tar."""
    _, config = image.blobs()
    config_name = digest_of(config)[7:] + ".json"
    layer_names = [f"{digest_of(layer)[7:]}/layer.tar" for layer in image.layers]
    manifest = [{"Config": config_name, "RepoTags": [tag], "Layers": layer_names}]
    with tarfile.open(path, "w") as tar:
        _add(tar, "manifest.json", json.dumps(manifest).encode())
        _add(tar, config_name, config)
        for name, layer in zip(layer_names, image.layers, strict=True):
            _add(tar, name, layer)
