"""The image store's pure parts and the layer unpacker, on real files: references, platform
picking, whiteouts, containment of members that climb out, digests checked."""

from __future__ import annotations

import hashlib
import os
import stat
from pathlib import Path

import pytest

from daemon.images.manifests import ManifestError, pick_platform
from daemon.images.reference import ReferenceError, parse
from daemon.images.service import image_file
from daemon.images.store import DigestMismatch, ImageFiles
from daemon.images.unpack import LayerError, unpack_layer
from tests.images_build import LayerTar


@pytest.mark.parametrize(
    ("value", "registry", "repository", "tag", "digest"),
    [
        ("busybox", "docker.io", "library/busybox", None, None),
        ("busybox:1.36", "docker.io", "library/busybox", "1.36", None),
        ("team/app:1", "docker.io", "team/app", "1", None),
        ("127.0.0.1:5000/team/app", "127.0.0.1:5000", "team/app", None, None),
        ("localhost/app:x", "localhost", "app", "x", None),
        (f"ghcr.io/o/r@sha256:{'a' * 64}", "ghcr.io", "o/r", None, f"sha256:{'a' * 64}"),
    ],
)
def test_references_read_as_docker_reads_them(
    value: str, registry: str, repository: str, tag: str | None, digest: str | None
) -> None:
    ref = parse(value)
    assert (ref.registry, ref.repository, ref.tag, ref.digest) == (
        registry,
        repository,
        tag,
        digest,
    )


@pytest.mark.parametrize("value", ["Busybox", "a//b", "a:b:c", "x@sha256:12", "a/b:-x"])
def test_bad_references_are_refused(value: str) -> None:
    with pytest.raises(ReferenceError):
        parse(value)


def test_the_platform_is_picked_from_an_index() -> None:
    index = {
        "manifests": [
            {"digest": "sha256:1", "platform": {"os": "linux", "architecture": "arm64"}},
            {"digest": "sha256:2", "platform": {"os": "linux", "architecture": "amd64"}},
            {
                "digest": "sha256:3",
                "platform": {"os": "linux", "architecture": "arm", "variant": "v7"},
            },
        ]
    }
    assert pick_platform(index, "linux/amd64")["digest"] == "sha256:2"
    assert pick_platform(index, "linux/arm/v7")["digest"] == "sha256:3"
    with pytest.raises(ManifestError, match="linux/arm64"):
        pick_platform(index, "windows/amd64")


def unpack(tmp_path: Path, layer: LayerTar) -> Path:
    data = layer.bytes()
    blob = tmp_path / "layer.tar"
    blob.write_bytes(data)
    target = tmp_path / "root" / "layer"
    target.mkdir(parents=True)
    assert unpack_layer(str(blob), str(target)) == "sha256:" + hashlib.sha256(data).hexdigest()
    return target


def test_members_that_climb_out_land_inside(tmp_path: Path) -> None:
    layer = LayerTar()
    layer.file("../../../escaped", b"x")
    layer.symlink("up", "/")
    layer.symlink("dots", "../../..")
    layer.file("up/via-absolute", b"a")
    layer.file("dots/via-dots", b"d")
    layer.hardlink("linked", "../../../escaped")
    root = unpack(tmp_path, layer)
    assert sorted(os.listdir(tmp_path / "root")) == ["layer"]
    assert sorted(os.listdir(tmp_path)) == ["layer.tar", "root"]
    for name in ("escaped", "via-absolute", "via-dots", "linked"):
        assert (root / name).is_file() and not (root / name).is_symlink(), name
    assert (root / "escaped").stat().st_nlink == 2


def test_whiteouts_become_overlayfs_whiteouts_and_devices_are_skipped(tmp_path: Path) -> None:
    layer = LayerTar()
    layer.dir("opt")
    layer.file("opt/.wh.gone", b"")
    layer.dir("opt/dir")
    layer.file("opt/dir/.wh..wh..opq", b"")
    layer.device("opt/null")
    layer.file("opt/owned", b"o", mode=0o4750, uid=1000)
    root = unpack(tmp_path, layer)
    gone = os.stat(root / "opt" / "gone", follow_symlinks=False)
    assert stat.S_ISCHR(gone.st_mode) and gone.st_rdev == 0
    assert os.getxattr(root / "opt" / "dir", "trusted.overlay.opaque") == b"y"
    assert not (root / "opt" / "null").exists()
    owned = (root / "opt" / "owned").stat()
    assert (owned.st_uid, owned.st_gid, stat.S_IMODE(owned.st_mode)) == (1000, 1000, 0o4750)


def test_a_blob_not_its_digest_is_not_kept(tmp_path: Path) -> None:
    files = ImageFiles(tmp_path / "images")
    files.setup()
    writer = files.writer()
    writer.write(b"content")
    with pytest.raises(DigestMismatch):
        writer.commit("sha256:" + "0" * 64)
    assert list(files.blobs.iterdir()) == [] and list(files.tmp.iterdir()) == []
    writer = files.writer()
    writer.write(b"not a tar at all, not even close" * 40)
    digest = writer.commit(None)
    with pytest.raises(LayerError):
        files.unpack(digest, "sha256:" + "1" * 64)
    assert list(files.layers.iterdir()) == [] and list(files.tmp.iterdir()) == []


def test_plain_http_only_for_loopback_and_insecure_registries() -> None:
    from daemon.images.registry import _plain_http

    for host in ("127.0.0.1:5000", "localhost", "localhost:80", "[::1]:5000", "127.1.2.3"):
        assert _plain_http(host, set()), host
    for host in ("registry.lan:5000", "10.0.0.1:5000", "docker.io", "localhost.example"):
        assert not _plain_http(host, set()), host
    assert _plain_http("registry.lan:5000", {"registry.lan:5000"})


def _layers(tmp_path: Path, *tars: LayerTar) -> list[str]:
    """The unpacked layers of `tars` (bottom first), top first as the overlay takes them."""
    paths = []
    for index, layer in enumerate(tars):
        (tmp_path / str(index)).mkdir(parents=True)
        paths.append(str(unpack(tmp_path / str(index), layer)))
    return paths[::-1]


def test_an_image_file_is_read_as_the_overlay_shows_it_never_outside(tmp_path: Path) -> None:
    host = tmp_path / "host"
    host.mkdir()
    (host / "passwd").write_text("hostonly:x:4242:4242::/:/bin/sh\n")
    base = LayerTar()
    base.dir("etc")
    base.file("etc/passwd", b"base\n")
    base.file("etc/group", b"base group\n")
    base.dir("elsewhere")
    base.file("elsewhere/passwd", b"in the image\n")
    assert image_file(_layers(tmp_path / "a", base), "etc", "passwd") == b"base\n"
    # A link out of the layer is followed inside it: the host's file is never read
    linked = LayerTar()
    linked.symlink("etc", str(host))
    assert image_file(_layers(tmp_path / "b", base, linked), "etc", "passwd") is None
    linked = LayerTar()
    linked.symlink("etc", "../../../elsewhere")
    linked.dir("elsewhere")
    linked.file("elsewhere/passwd", b"top's own\n")
    assert image_file(_layers(tmp_path / "c", base, linked), "etc", "passwd") == b"top's own\n"
    # An upper etc without the file: the lower's; a whiteout, or an opaque etc, hides it
    upper = LayerTar()
    upper.dir("etc")
    upper.file("etc/.wh.passwd", b"")
    layers = _layers(tmp_path / "d", base, upper)
    assert image_file(layers, "etc", "passwd") is None
    assert image_file(layers, "etc", "group") == b"base group\n"
    opaque = LayerTar()
    opaque.dir("etc")
    opaque.file("etc/.wh..wh..opq", b"")
    assert image_file(_layers(tmp_path / "e", base, opaque), "etc", "group") is None
    gone = LayerTar()
    gone.file(".wh.etc", b"")
    assert image_file(_layers(tmp_path / "f", base, gone), "etc", "group") is None


def test_an_image_file_that_is_no_regular_file_or_too_large_is_not_read(tmp_path: Path) -> None:
    layer = LayerTar()
    layer.dir("etc")
    layer.symlink("etc/passwd", "/proc/self/environ")
    layer.file("etc/group", b"x" * ((1 << 20) + 1))
    layers = _layers(tmp_path, layer)
    assert image_file(layers, "etc", "passwd") is None
    assert image_file(layers, "etc", "group") is None
    os.mkfifo(Path(layers[0]) / "etc" / "fifo")
    assert image_file(layers, "etc", "fifo") is None  # and the open did not hang
