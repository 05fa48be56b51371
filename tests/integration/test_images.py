"""Images: import (OCI layout, docker archive), pull from a real registry, the store on disk,
and sandboxes made from images (their files, owners, env, cwd and user)."""

from __future__ import annotations

import base64
import json
import secrets
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import Daemon, Daemons
from tests.images_build import (
    BuiltImage,
    LayerTar,
    build_image,
    docker_archive_tar,
    oci_layout_tar,
)
from tests.registry import TOKEN, BearerProxy, Registry

pytestmark = pytest.mark.usefixtures("nothing_carries_over")


@pytest.fixture(scope="module")
def climb() -> str:
    return f"sandboxd-climb-{secrets.token_hex(4)}"


@pytest.fixture(scope="module")
def image(climb: str) -> BuiltImage:
    return build_image(climb)


@pytest.fixture(scope="module")
def oci_tar(image: BuiltImage, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("images") / "oci.tar"
    oci_layout_tar(path, {"linux/amd64": image})
    return path


def import_tar(daemon: Daemon, path: Path, reference: str | None, **params: str) -> Any:
    if reference is not None:
        params["reference"] = reference
    with path.open("rb") as body:
        return daemon.client.post(
            "/images/import",
            params=params,
            content=body,
            headers={"Content-Type": "application/x-tar"},
        )


@pytest.fixture
def imported(daemon: Daemon, oci_tar: Path) -> Iterator[dict[str, Any]]:
    response = import_tar(daemon, oci_tar, "test/app:1")
    assert response.status_code == 201, response.text
    yield response.json()
    daemon.destroy_all()
    daemon.client.delete(f"/images/{response.json()['id']}")


def test_import_an_oci_layout_and_run_a_sandbox_from_it(
    daemon: Daemon, imported: dict[str, Any], oci_tar: Path
) -> None:
    assert oci_tar.stat().st_size > 1 << 20  # past the default max_body, which binds no import
    assert imported["names"] == ["docker.io/test/app:1"]
    assert imported["layers"] == 2 and imported["id"].startswith("sha256:")
    assert imported["config"]["working_dir"] == "/app"
    assert imported["config"]["env"]["GREETING"] == "hello"
    for ref in ("test/app:1", imported["id"], imported["digest"], imported["id"][7:19]):
        assert daemon.client.get(f"/images/{ref}").json()["id"] == imported["id"]
    box = daemon.create(image="test/app:1", env={"EXTRA": "1"})
    assert box["image"] == {"id": imported["id"], "reference": "test/app:1"}
    out = daemon.exec(box["id"], ["cat", "/app/hello.txt", "/app/second.txt"])
    assert out["stdout"] == "hello from the image\nfrom layer two\n", out


def test_the_image_as_the_sandbox_sees_it(
    daemon: Daemon, imported: dict[str, Any], climb: str
) -> None:
    box = daemon.create(image="test/app:1")
    script = (
        "stat -c '%u %g %a' /home/app/owned.txt /usr/bin/suidfile; ls /opt; ls /opt/dir; "
        f"test -e /data/nulldev || echo no-device; cat /{climb} /etc/{climb}; "
        "stat -c %h /app/hello.txt"
    )
    out = daemon.sh(box["id"], script, user="0", cwd="/")
    assert out["exit_code"] == 0, out
    assert out["stdout"].splitlines() == [
        "1000 1000 600",  # the image's owners, inside
        "0 0 4755",
        "dir",  # gone.txt whited out by the second layer
        "c.txt",  # the opaque dir hides a.txt and b.txt below it
        "no-device",
        "climbed",  # `../../NAME` landed at the image's root
        "through a link",  # so did `up/etc/NAME`, with up -> /
        "2",  # the hard link
    ]
    for outside in (Path("/") / climb, Path("/etc") / climb, daemon.state_dir / climb):
        assert not outside.exists()
    assert not (daemon.state_dir / "images" / climb).exists()


def test_the_images_env_cwd_and_user_are_the_defaults(
    daemon: Daemon, imported: dict[str, Any]
) -> None:
    box = daemon.create(image="test/app:1", env={"EXTRA": "1", "GREETING": "hi"})
    assert box["env"] == {"PATH": "/bin:/usr/bin", "GREETING": "hi", "ARCH": "amd64", "EXTRA": "1"}
    out = daemon.sh(box["id"], "pwd; id -u; id -g; echo $GREETING $EXTRA; touch mine")
    # `app` from the image's /etc/passwd; /app is root's: the touch fails as 1000
    assert out["stdout"].splitlines()[:4] == ["/app", "1000", "1000", "hi 1"], out
    assert out["exit_code"] != 0
    out = daemon.sh(
        box["id"], "pwd; id -u; touch /home/app/new; stat -c %u /home/app/new", cwd="/", user="0"
    )
    assert out["stdout"].splitlines() == ["/", "0", "0"], out


def test_an_images_etc_linked_to_a_host_directory_is_not_read(
    daemon: Daemon, climb: str, tmp_path: Path
) -> None:
    host = tmp_path / "host-etc"
    host.mkdir()
    (host / "passwd").write_text("hostonly:x:4242:4242::/:/bin/sh\n")
    image = build_image(climb, user="hostonly")
    linked = LayerTar()
    linked.symlink("etc", str(host))
    image.layers.append(linked.bytes())
    path = tmp_path / "linked.tar"
    oci_layout_tar(path, {"linux/amd64": image})
    response = import_tar(daemon, path, "test/linked:1")
    assert response.status_code == 201, response.text
    box = daemon.create(image="test/linked:1")
    out = daemon.sh(box["id"], "id -u; id -g", cwd="/")
    assert "4242" not in out["stdout"], out  # the host's passwd named nobody of the image


def test_the_store_is_root_only_with_raw_owners(daemon: Daemon, imported: dict[str, Any]) -> None:
    images = daemon.state_dir / "images"
    assert images.stat().st_mode & 0o777 == 0o700
    layers = sorted((images / "layers").iterdir())
    assert len(layers) == 2
    owned = [p / "home/app/owned.txt" for p in layers if (p / "home/app/owned.txt").exists()]
    assert len(owned) == 1 and owned[0].stat().st_uid == 1000  # as in the image
    suid = next(p / "usr/bin/suidfile" for p in layers if (p / "usr/bin/suidfile").exists())
    assert suid.stat().st_mode & 0o7777 == 0o4755 and suid.stat().st_uid == 0


def test_rootfs_with_image_and_unknown_images_are_422(
    daemon: Daemon, imported: dict[str, Any], tmp_path: Path
) -> None:
    both = daemon.client.post("/sandboxes", json={"image": "test/app:1", "rootfs": str(tmp_path)})
    assert both.status_code == 422
    missing = daemon.client.post("/sandboxes", json={"image": "test/nothing:2"})
    assert missing.status_code == 422 and "test/nothing:2" in missing.json()["detail"]
    assert daemon.client.get("/sandboxes").json()["items"] == []


def test_delete_is_409_while_a_sandbox_uses_the_image(daemon: Daemon, oci_tar: Path) -> None:
    image = import_tar(daemon, oci_tar, "test/del:1").json()
    box = daemon.create(image="test/del:1")
    busy = daemon.client.delete("/images/test/del:1")
    assert busy.status_code == 409 and box["id"] in busy.json()["detail"]
    assert daemon.exec(box["id"], ["cat", "/app/hello.txt"])["exit_code"] == 0
    assert daemon.client.delete(f"/sandboxes/{box['id']}").status_code == 204
    assert daemon.client.delete("/images/test/del:1").status_code == 204
    assert daemon.client.get(f"/images/{image['id']}").status_code == 404
    assert daemon.client.delete(f"/images/{image['id']}").status_code == 404
    images = daemon.state_dir / "images"
    assert (
        list((images / "layers").iterdir()) == []
        and list((images / "blobs/sha256").iterdir()) == []
    )


def test_a_docker_archive_shares_the_layers_unpacked_once(
    daemon: Daemon, imported: dict[str, Any], image: BuiltImage, tmp_path: Path
) -> None:
    layers = daemon.state_dir / "images" / "layers"
    before = {p.name: p.stat().st_ino for p in layers.iterdir()}
    path = tmp_path / "docker.tar"
    docker_archive_tar(path, image, "test/docker:7")
    response = import_tar(daemon, path, None)
    assert response.status_code == 201, response.text
    docker = response.json()
    # The same config: the same image, under both names (layer 1 came uncompressed this time)
    assert docker["id"] == imported["id"]
    assert set(docker["names"]) == {"docker.io/test/app:1", "docker.io/test/docker:7"}
    assert {p.name: p.stat().st_ino for p in layers.iterdir()} == before  # not unpacked again
    box = daemon.create(image="test/docker:7")
    assert daemon.exec(box["id"], ["cat", "/app/second.txt"])["stdout"] == "from layer two\n"
    other = build_image("other", user="0")  # another config, the same layers
    path = tmp_path / "other.tar"
    oci_layout_tar(path, {"linux/amd64": other})
    second = import_tar(daemon, path, "test/other:1").json()
    assert second["id"] != imported["id"] and len(list(layers.iterdir())) == 3  # its own base
    assert daemon.client.delete("/images/test/other:1").status_code == 204
    assert {p.name for p in layers.iterdir()} == set(before)


def test_a_blob_that_is_not_its_digest_is_refused_with_nothing_kept(
    daemon: Daemon, image: BuiltImage, tmp_path: Path
) -> None:
    path = tmp_path / "bad.tar"
    oci_layout_tar(path, {"linux/amd64": image})
    data = bytearray(path.read_bytes())
    marker = data.find(b"from layer two")
    data[marker] ^= 0x20  # a byte of the second (uncompressed) layer, not its size
    path.write_bytes(bytes(data))
    response = import_tar(daemon, path, "test/bad:1")
    assert response.status_code == 422 and "digest" in response.json()["detail"], response.text
    images = daemon.state_dir / "images"
    for sub in ("layers", "blobs/sha256", "tmp"):
        assert list((images / sub).iterdir()) == [], sub
    assert daemon.client.get("/images").json()["items"] == []


def test_not_a_tar_is_422(daemon: Daemon) -> None:
    response = daemon.client.post("/images/import", params={"reference": "x:1"}, content=b"no")
    assert response.status_code == 422
    assert list((daemon.state_dir / "images" / "tmp").iterdir()) == []


# -- pulls from a real registry -----------------------------------------------------------------


@pytest.fixture(scope="module")
def registry(
    tmp_path_factory: pytest.TempPathFactory, oci_tar: Path, climb: str
) -> Iterator[Registry]:
    root = tmp_path_factory.mktemp("registry")
    server = Registry(root)
    try:
        server.push(oci_tar, "test/app:1")
        multi = root / "multi.tar"
        oci_layout_tar(
            multi,
            {
                "linux/amd64": build_image(climb),
                "linux/arm64": build_image(climb, arch="arm64"),
            },
        )
        server.push(multi, "test/multi:1", all_platforms=True)
        yield server
    finally:
        server.stop()


@pytest.fixture
def proxy(registry: Registry) -> Iterator[BearerProxy]:
    server = BearerProxy(registry.host)
    yield server
    server.stop()


@pytest.fixture(autouse=True)
def no_images_left(daemon: Daemon) -> Iterator[None]:
    yield
    daemon.destroy_all()
    for image in daemon.client.get("/images").json()["items"]:
        daemon.client.delete(f"/images/{image['id']}")


def pull(daemon: Daemon, reference: str, **body: Any) -> Any:
    return daemon.client.post("/images/pull", json={"reference": reference, **body})


def test_pull_by_tag_and_by_digest(daemon: Daemon, registry: Registry) -> None:
    reference = f"{registry.host}/test/app:1"
    response = pull(daemon, reference)
    assert response.status_code == 200, response.text
    image = response.json()
    assert image["names"] == [reference] and image["layers"] == 2
    box = daemon.create(image=reference)
    assert daemon.exec(box["id"], ["cat", "/app/second.txt"])["stdout"] == "from layer two\n"
    daemon.destroy_all()
    assert daemon.client.delete(f"/images/{reference}").status_code == 204
    by_digest = f"{registry.host}/test/app@{image['digest']}"
    again = pull(daemon, by_digest)
    assert again.status_code == 200, again.text
    assert again.json()["id"] == image["id"] and again.json()["names"] == []
    assert daemon.client.get(f"/images/{by_digest}").json()["id"] == image["id"]
    wrong = f"{registry.host}/test/app@sha256:{'0' * 64}"
    assert pull(daemon, wrong).status_code == 502


def test_an_index_is_resolved_by_platform(daemon: Daemon, registry: Registry) -> None:
    reference = f"{registry.host}/test/multi:1"
    amd64 = pull(daemon, reference).json()
    assert amd64["config"]["env"]["ARCH"] == "amd64"
    arm64 = pull(daemon, reference, platform="linux/arm64").json()
    assert arm64["config"]["env"]["ARCH"] == "arm64" and arm64["id"] != amd64["id"]
    # The tag moved to the image last pulled under it
    assert daemon.client.get(f"/images/{reference}").json()["id"] == arm64["id"]
    missing = pull(daemon, reference, platform="linux/s390x")
    assert missing.status_code == 502 and "linux/arm64" in missing.json()["detail"]


def test_pull_progress_as_ndjson(daemon: Daemon, registry: Registry) -> None:
    reference = f"{registry.host}/test/app:1"
    headers = {"Accept": "application/x-ndjson"}
    with daemon.client.stream(
        "POST", "/images/pull", json={"reference": reference}, headers=headers
    ) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("application/x-ndjson")
        lines = [json.loads(line) for line in response.iter_lines() if line]
    assert lines[0]["status"] == "resolving"
    assert lines[-1]["image"]["names"] == [reference]
    done = [line for line in lines if line.get("status") == "done"]
    assert len(done) == 2  # a line for each layer at its end
    assert all(line["current"] == line["total"] for line in done)


def test_an_anonymous_bearer_token_is_fetched_and_used(daemon: Daemon, proxy: BearerProxy) -> None:
    response = pull(daemon, f"{proxy.host}/test/app:1")
    assert response.status_code == 200, response.text
    assert proxy.token_requests[0]["service"] == "test-registry"
    assert proxy.token_requests[0]["scope"] == "repository:test/app:pull"
    assert proxy.token_requests[0]["authorization"] is None


@pytest.fixture(scope="module")
def token_bomb() -> bytes:
    """A 500 KiB gzip of a 512 MiB token answer: the right token, then spaces (valid JSON)."""
    gzip = zlib.compressobj(9, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
    parts = [gzip.compress(f'{{"token": "{TOKEN}"'.encode())]
    spaces = b" " * (1 << 20)
    parts += [gzip.compress(spaces) for _ in range(512)]
    parts += [gzip.compress(b"}"), gzip.flush()]
    return b"".join(parts)


def _kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise AssertionError(field)


@pytest.mark.parametrize("redirected", [False, True], ids=["answer", "redirect"])
def test_a_huge_token_answer_is_refused_without_the_daemon_growing(
    daemon: Daemon, proxy: BearerProxy, token_bomb: bytes, redirected: bool
) -> None:
    assert daemon.proc is not None
    pid = daemon.proc.pid
    proxy.token_bomb, proxy.token_redirect = token_bomb, redirected
    Path(f"/proc/{pid}/clear_refs").write_text("5")  # VmHWM back to the RSS of now
    before = _kib(pid, "VmHWM")
    response = pull(daemon, f"{proxy.host}/test/app:1")
    grown = _kib(pid, "VmHWM") - before
    assert grown < 64 << 10, f"the daemon grew by {grown >> 10} MiB"
    assert response.status_code == 502, response.text
    assert "token service" in response.json()["detail"]
    assert daemon.client.get("/images").json()["items"] == []


def test_basic_credentials_from_registry_auth(
    daemons: Daemons, daemon: Daemon, registry: Registry, tmp_path: Path
) -> None:
    proxy = BearerProxy(registry.host, credentials=("ci", "s3cret"))
    try:
        refused = pull(daemon, f"{proxy.host}/test/app:1")
        assert refused.status_code == 502
        auth = tmp_path / "config.json"
        encoded = base64.b64encode(b"ci:s3cret").decode()
        auth.write_text(json.dumps({"auths": {proxy.host: {"auth": encoded}}}))
        other = daemons.new("--registry-auth", str(auth))
        try:
            response = pull(other, f"{proxy.host}/test/app:1")
            assert response.status_code == 200, response.text
            assert proxy.token_requests[-1]["authorization"].startswith("Basic ")
        finally:
            for image in other.client.get("/images").json()["items"]:
                other.client.delete(f"/images/{image['id']}")
    finally:
        proxy.stop()


def test_a_dropped_connection_is_taken_up_where_it_stopped(
    daemon: Daemon, proxy: BearerProxy
) -> None:
    proxy.drop_blobs = True
    response = pull(daemon, f"{proxy.host}/test/app:1")
    assert response.status_code == 200, response.text
    assert len(proxy.dropped) == 3 and len(proxy.ranges) == 3
    box = daemon.create(image=f"{proxy.host}/test/app:1")
    assert daemon.exec(box["id"], ["cat", "/app/hello.txt"])["exit_code"] == 0


def test_a_corrupt_blob_from_a_registry_is_refused_with_nothing_kept(
    daemon: Daemon, proxy: BearerProxy
) -> None:
    proxy.corrupt_blobs = True
    response = pull(daemon, f"{proxy.host}/test/app:1")
    assert response.status_code == 502 and "digest" in response.json()["detail"], response.text
    images = daemon.state_dir / "images"
    for sub in ("layers", "blobs/sha256", "tmp"):
        assert list((images / sub).iterdir()) == [], sub
    assert daemon.client.get("/images").json()["items"] == []


def test_a_restart_keeps_the_images_and_their_sandboxes(
    daemon: Daemon, imported: dict[str, Any]
) -> None:
    box = daemon.create(image="test/app:1")
    daemon.stop()
    daemon.start()
    assert daemon.client.get("/images/test/app:1").json()["id"] == imported["id"]
    out = daemon.sh(box["id"], "pwd; cat /app/hello.txt")
    assert out["stdout"] == "/app\nhello from the image\n", out
    assert len(list((daemon.state_dir / "images" / "layers").iterdir())) == 2


def _last_seq(daemon: Daemon) -> int:
    kept = daemon.client.get("/events", params={"follow": "false"}).json()["items"]
    return int(kept[-1]["seq"]) if kept else 0


def _image_events(daemon: Daemon, image_id: str, since: int) -> list[str]:
    params = {"follow": "false", "type": "image", "since": str(since)}
    events = daemon.client.get("/events", params=params).json()
    return [e["type"] for e in events["items"] if e["image_id"] == image_id]


def test_imports_pulls_and_removals_are_events(
    daemon: Daemon, oci_tar: Path, registry: Registry
) -> None:
    since = _last_seq(daemon)
    imported = import_tar(daemon, oci_tar, "test/told:1").json()
    assert daemon.client.delete("/images/test/told:1").status_code == 204
    assert _image_events(daemon, imported["id"], since) == ["image.imported", "image.removed"]
    since = _last_seq(daemon)
    pulled = pull(daemon, f"{registry.host}/test/app:1").json()
    assert _image_events(daemon, pulled["id"], since) == ["image.pulled"]
    assert daemon.client.delete(f"/images/{pulled['id']}").status_code == 204
