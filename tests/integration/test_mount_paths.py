"""Mount targets are paths, not strings: every spelling of /proc, /sys, /dev or / is refused
with 422 and leaves no record, and so is a target whose symlinks lead there inside the root.

Runs a real daemon; the module's leak check then finds no mount of these sources anywhere.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import Daemon


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    path = tmp_path_factory.mktemp("mount-source")
    (path / "marker").write_text("from the host\n")
    os.chmod(path, 0o755)
    yield path


@pytest.fixture(scope="module")
def rootfs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny root (the supervisor needs nothing of it) whose symlinks lead to the kernel trees
    and to the root itself, absolutely and through '..'."""
    path = tmp_path_factory.mktemp("rootfs")
    os.chmod(path, 0o755)
    (path / "etc").mkdir()
    (path / "usr" / "lib").mkdir(parents=True)
    for name, target in {
        "to-proc": "/proc",
        "up-to-sys": "../../../sys",
        "to-dev": "/dev",
        "to-root": "/",
        "up-to-root": "usr/../..",
        "lib": "usr/lib",
    }.items():
        (path / name).symlink_to(target)
    (path / "etc" / "mtab").symlink_to("../proc/self/mounts")
    return path


def records(daemon: Daemon) -> set[str]:
    answer = daemon.client.get("/sandboxes")
    assert answer.status_code == 200
    return {item["id"] for item in answer.json()["items"]}


def mounted_anywhere(marker: str) -> list[int]:
    """Processes whose mount namespace holds a mount of `marker`."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if marker in Path(f"/proc/{pid}/mountinfo").read_text():
                found.append(int(pid))
        except OSError:
            continue  # it ended meanwhile
    return found


def assert_refused(daemon: Daemon, body: dict[str, Any], source: Path) -> dict[str, Any]:
    before = records(daemon)
    answer = daemon.client.post("/sandboxes", json=body)
    assert answer.status_code == 422, answer.text
    assert answer.headers["content-type"] == "application/problem+json"
    assert records(daemon) == before  # no record, not even a failed one
    assert mounted_anywhere(str(source)) == []
    return dict(answer.json())


@pytest.mark.parametrize(
    "target",
    [
        "/./proc/sys",
        "/./dev/shm",
        "/./sys/kernel",
        "/./proc",
        "//proc",
        "/proc/",
        "/dev/../dev/shm",
        "/tmp/../proc",
        "/",
        "//",
        "/.",
        "/./",
        "/proc/sys/../../tmp",
        "/sys",
        "/dev",
        "/tmp/\n",
    ],
)
def test_a_spelling_of_a_kernel_tree_or_the_root_is_422(
    daemon: Daemon, source: Path, target: str
) -> None:
    body = {"mounts": [{"source": str(source), "target": target}]}
    problem = assert_refused(daemon, body, source)
    assert problem["errors"][0]["loc"][:3] == ["body", "mounts", 0]


@pytest.mark.parametrize(
    "target",
    ["/to-proc/sys", "/to-proc", "/up-to-sys/kernel", "/to-dev/shm", "/to-root", "/up-to-root",
     "/etc/mtab"],
)  # fmt: skip
def test_a_target_whose_symlinks_lead_to_a_kernel_tree_is_422(
    daemon: Daemon, source: Path, rootfs: Path, target: str
) -> None:
    body = {"rootfs": str(rootfs), "mounts": [{"source": str(source), "target": target}]}
    problem = assert_refused(daemon, body, source)
    assert target in problem["detail"]


@pytest.mark.parametrize("root", ["/proc", "/sys", "/dev", "/proc/self"])
def test_a_kernel_tree_as_the_rootfs_is_422(daemon: Daemon, source: Path, root: str) -> None:
    """The overlay cannot use them (nor idmap them): the request's fault, not a setup failure."""
    body = {"rootfs": root, "mounts": [{"source": str(source), "target": "/opt/x"}]}
    problem = assert_refused(daemon, body, source)
    assert root in problem["detail"]


def test_a_symlink_inside_the_root_is_followed_inside_it(
    daemon: Daemon, source: Path, tmp_path: Path
) -> None:
    """/lib → usr/lib in the default base: the bind lands on /usr/lib/… of the sandbox, and
    nothing is made on the host's own /usr/lib."""
    body = {"mounts": [{"source": str(source), "target": "/lib/sandboxd-test-bind/"}]}
    box = daemon.create(**body)
    try:
        assert box["mounts"][0]["target"] == "/lib/sandboxd-test-bind"  # stored normalised
        result = daemon.exec(box["id"], ["cat", "/usr/lib/sandboxd-test-bind/marker"])
        assert result["stdout"] == "from the host\n"
        assert not Path("/usr/lib/sandboxd-test-bind").exists()
    finally:
        assert daemon.client.delete(f"/sandboxes/{box['id']}").status_code == 204


def test_paths_are_stored_normalised(daemon: Daemon, source: Path) -> None:
    spelled = "//" + str(source).lstrip("/").replace("/", "/./") + "/"
    body = {"mounts": [{"source": spelled, "target": "//opt/./data/"}], "cmd": ["sleep", "60"]}
    box = daemon.create(**body)
    try:
        assert box["mounts"][0] == {"source": str(source), "target": "/opt/data", "read_only": True}
        stored = daemon.client.get(f"/sandboxes/{box['id']}").json()
        assert stored["mounts"] == box["mounts"]
        run = daemon.exec(box["id"], ["cat", "marker"], cwd="//opt/./data/")
        assert run["stdout"] == "from the host\n"
    finally:
        assert daemon.client.delete(f"/sandboxes/{box['id']}").status_code == 204


def test_two_spellings_of_one_target_are_422(daemon: Daemon, source: Path) -> None:
    mounts = [{"source": str(source), "target": t} for t in ("/opt/data", "/opt//data/.")]
    assert_refused(daemon, {"mounts": mounts}, source)
