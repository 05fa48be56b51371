"""`sandboxd import`, `images`, `run --image` with the image's own command, `inspect` and `rmi`,
against a real daemon; once the daemon has the image routes."""

from __future__ import annotations

import json
import secrets
from pathlib import Path

import pytest

from tests.cli.helpers import Tmux, command_line, needs_route, ok, one_line_error, sandboxd
from tests.conftest import Daemon

images_build = pytest.importorskip("tests.images_build", reason="no image builder yet")

pytestmark = [needs_route("/images/import"), pytest.mark.usefixtures("nothing_carries_over")]


@pytest.fixture
def image_tar(tmp_path: Path) -> Path:
    image = images_build.build_image(f"sandboxd-climb-{secrets.token_hex(4)}")
    image.config["config"]["Entrypoint"] = ["sh", "-c"]
    image.config["config"]["Cmd"] = ["cat /app/hello.txt; exit 7"]
    path = tmp_path / "oci.tar"
    images_build.oci_layout_tar(path, {"linux/amd64": image})
    return path


def test_import_list_run_its_command_and_remove(daemon: Daemon, image_tar: Path) -> None:
    said = ok(sandboxd(daemon, "import", str(image_tar), "cli/app:1"))
    assert said.startswith("cli/app:1: sha256:")
    [listed] = json.loads(ok(sandboxd(daemon, "images", "--format", "json")))
    [name] = listed["names"]
    assert name.endswith("cli/app:1")  # as the daemon normalises it (docker.io/…)
    assert "cli/app:1" in ok(sandboxd(daemon, "images"))

    # No CMD: the image's entrypoint and cmd, as `docker run IMAGE`.
    ran = sandboxd(daemon, "run", "--name", "from-image", "--image", "cli/app:1")
    assert ran.returncode == 7, ran.stderr
    [sandbox] = json.loads(ok(sandboxd(daemon, "inspect", "from-image")))
    assert sandbox["cmd"] == ["sh", "-c", "cat /app/hello.txt; exit 7"]
    assert sandbox["image"]["reference"].endswith("cli/app:1")
    ok(sandboxd(daemon, "rm", "from-image"))
    running = ok(sandboxd(daemon, "run", "-d", "--image", "cli/app:1", "sleep", "600")).strip()
    one_line_error(sandboxd(daemon, "rmi", "cli/app:1"))  # 409 while a sandbox uses it
    ok(sandboxd(daemon, "rm", "-f", running))
    [image] = json.loads(ok(sandboxd(daemon, "inspect", "cli/app:1")))  # not a sandbox: an image
    assert image["id"] == listed["id"]
    ok(sandboxd(daemon, "rmi", "cli/app:1"))
    assert json.loads(ok(sandboxd(daemon, "images", "--format", "json"))) == []


@needs_route("/images/pull")
def test_pull_draws_a_bar_per_layer(daemon: Daemon, image_tar: Path, tmp_path: Path) -> None:
    registries = pytest.importorskip("tests.registry", reason="no test registry yet")
    (tmp_path / "registry").mkdir()
    registry = registries.Registry(tmp_path / "registry")
    tmux = Tmux(tmp_path)
    try:
        registry.push(image_tar, "cli/pulled:1")
        reference = f"{registry.host}/cli/pulled:1"
        tmux.start(command_line(daemon, "pull", reference))
        assert tmux.dead_status(timeout=120) == 0, tmux.screen()
        screen = tmux.screen()
    finally:
        tmux.kill()
        registry.stop()
    manifest = json.loads(images_build.build_image("x").manifest()[0])  # the same layer count
    bars = [line for line in screen.splitlines() if "━" in line]
    assert len(bars) == len(manifest["layers"]), screen
    assert f"{reference}: sha256:" in screen
    [listed] = json.loads(ok(sandboxd(daemon, "images", "--format", "json")))
    assert listed["names"] == [reference]
