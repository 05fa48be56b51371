"""POST /sandboxes and GET /sandboxes[/{ref}]: records, names, the main cmd, bad input."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

from tests.conftest import Daemon, wait_for


def state_of(daemon: Daemon, ref: str) -> dict[str, Any]:
    return daemon.client.get(f"/sandboxes/{ref}").json()  # type: ignore[no-any-return]


def test_create_with_defaults(daemon: Daemon) -> None:
    box = daemon.create()
    assert box["state"] == "running" and box["pid"] > 1
    assert box["name"] is None and box["hostname"] == box["id"]
    assert box["network"] == {"mode": "none", "ip": None, "ports": []}
    assert box["exit"] is None and box["started_at"] and box["created_at"].endswith("Z")
    assert state_of(daemon, box["id"]) == box


def test_name_hostname_and_labels(daemon: Daemon) -> None:
    box = daemon.create(name="web_1.a", labels={"team": "ci"})
    assert box["hostname"] == "web-1.a"
    assert state_of(daemon, "web_1.a")["id"] == box["id"]
    other = daemon.create(hostname="custom", labels={"team": "web"})
    assert daemon.exec(other["id"], ["hostname"])["stdout"] == "custom\n"
    listed = daemon.client.get("/sandboxes", params={"label": "team=ci"}).json()["items"]
    assert [b["id"] for b in listed] == [box["id"]]
    running = daemon.client.get("/sandboxes", params={"state": "running"}).json()["items"]
    assert {box["id"], other["id"]} <= {b["id"] for b in running}
    everything = daemon.client.get("/sandboxes").json()["items"]
    assert [b["created_at"] for b in everything] == sorted(b["created_at"] for b in everything)


def test_a_name_in_use_is_409(daemon: Daemon) -> None:
    daemon.create(name="taken")
    before = daemon.client.get("/sandboxes").json()["items"]
    response = daemon.client.post("/sandboxes", json={"name": "taken"})
    assert response.status_code == 409
    assert response.headers["content-type"].startswith("application/problem+json")
    assert daemon.client.get("/sandboxes").json()["items"] == before


def test_main_cmd_exit_code_ends_the_sandbox(daemon: Daemon) -> None:
    box = daemon.create(cmd=["sh", "-c", "sleep 0.2; exit 7"])
    record = daemon.await_state(f"/sandboxes/{box['id']}", "exited")
    assert record["exit"] == {"exit_code": 7, "signal": None, "reason": "exited", "message": None}
    assert record["pid"] is None and record["finished_at"]


def test_main_cmd_killed_by_a_signal_reports_it(daemon: Daemon) -> None:
    box = daemon.create(cmd=["sh", "-c", "sleep 0.2; kill -TERM $$"])
    record = daemon.await_state(f"/sandboxes/{box['id']}", "exited")
    assert record["exit"]["signal"] == "SIGTERM" and record["exit"]["exit_code"] is None
    assert record["exit"]["reason"] == "signaled"


def test_main_cmd_takes_every_process_with_it(daemon: Daemon) -> None:
    box = daemon.create(cmd=["sh", "-c", "sleep 300 & sleep 0.3"])
    supervisor = box["pid"]
    assert wait_for(lambda: state_of(daemon, box["id"])["state"] == "exited")
    assert not _alive(supervisor)


def test_bad_bodies_are_4xx_and_store_nothing(daemon: Daemon) -> None:
    before = daemon.client.get("/sandboxes").json()["items"]
    bodies: list[Any] = [
        {"name": "-bad"},
        {"name": "x" * 64},
        {"hostname": "not a host"},
        {"namespaces": ["net", "user"]},
        {"namespaces": ["pid", "mnt", "bogus"]},
        {"network": {"mode": "host"}},
        {"namespaces": ["pid", "mnt"], "network": {"mode": "none"}},
        {"rootfs": "relative/path"},
        {"rootfs": "/no/such/dir"},
        {"mounts": [{"source": "/no/such/path", "target": "/x"}]},
        {"mounts": [{"source": "/etc", "target": "relative"}]},
        {"cmd": []},
        {"env": {"A=B": "c"}},
        {"ttl_seconds": 0},
        {"ttl_seconds": 1e300},
        {"nmae": "typo"},
        [],
    ]
    for body in bodies:
        response = daemon.client.post("/sandboxes", json=body)
        assert response.status_code == 422, (body, response.text)
        assert response.json()["status"] == 422
    response = daemon.client.post(
        "/sandboxes", content=b"{not json", headers={"content-type": "application/json"}
    )
    assert response.status_code == 400
    response = daemon.client.post(
        "/sandboxes",
        content=b'{"ttl_seconds": Infinity}',
        headers={"content-type": "application/json"},
    )
    assert response.status_code in (400, 422)
    assert daemon.client.get("/sandboxes").json()["items"] == before


def test_unknown_sandbox_is_404(daemon: Daemon) -> None:
    response = daemon.client.get("/sandboxes/sb_nope")
    assert response.status_code == 404
    assert response.json()["title"]


def test_info_and_healthz(daemon: Daemon) -> None:
    assert daemon.client.get("/healthz").json() == {"status": "ok"}
    info = daemon.client.get("/info").json()
    assert info["kernel"] and info["version"] and info["cgroup"] in ("v1", "v2", None)
    assert info["sandboxes"]["running"] <= info["sandboxes"]["total"]


def test_own_rootfs(daemon: Daemon, tmp_path: Path) -> None:
    rootfs = make_rootfs(tmp_path / "rootfs", ["/bin/sh", "/bin/cat"])
    (rootfs / "etc" / "motd").write_text("my own root\n")
    box = daemon.create(rootfs=str(rootfs))
    assert box["rootfs"] == str(rootfs)
    result = daemon.exec(box["id"], ["/bin/sh", "-c", "cat /etc/motd; echo $$ > /new"])
    assert (result["exit_code"], result["stdout"]) == (0, "my own root\n"), result
    assert daemon.exec(box["id"], ["/usr/bin/env"])["exit_code"] == 127
    assert not (rootfs / "new").exists()


def make_rootfs(root: Path, binaries: list[str]) -> Path:
    """A tiny root: the binaries and the shared libraries ldd says they need."""
    for name in ("bin", "etc", "proc", "dev", "sys", "tmp"):
        (root / name).mkdir(parents=True)
    needed = set(binaries)
    for binary in binaries:
        ldd = subprocess.run(["ldd", binary], capture_output=True, text=True).stdout
        needed.update(re.findall(r"(/\S+) \(0x", ldd))
    for path in needed:
        target = root / path.lstrip("/")
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(os.path.realpath(path), target)
    return root


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False
