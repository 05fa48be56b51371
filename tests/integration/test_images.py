"""Images: import (OCI layout, docker archive), pull from a real registry, the store on disk,
and sandboxes made from images (their files, owners, env, cwd and user)."""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import Daemon
from tests.images_build import BuiltImage, build_image, oci_layout_tar

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
    daemon: Daemon, imported: dict[str, Any], image: BuiltImage
) -> None:
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
