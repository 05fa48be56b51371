"""`sandboxd serve` as an operator starts it: socket and directory modes, the token, the
body limit, the sandbox limit, and a TCP listener.
"""

from __future__ import annotations

import os
import socket
import stat
import subprocess
import sys

import httpx
import pytest

from tests.conftest import ROOT, Daemon, Daemons

TOKEN = "s3cret-token"


@pytest.fixture(scope="module")
def guarded(daemons: Daemons) -> Daemon:
    port = free_port()
    daemon = daemons.new(
        "--token", TOKEN, "--max-sandboxes", "2", "--max-body", "2000",
        "--listen", f"tcp://127.0.0.1:{port}",
    )  # fmt: skip
    daemon.client.headers["Authorization"] = f"Bearer {TOKEN}"
    daemon.port = port  # type: ignore[attr-defined]
    return daemon


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_socket_and_directories_are_private(guarded: Daemon) -> None:
    assert stat.S_IMODE(guarded.socket.stat().st_mode) == 0o660
    assert stat.S_ISSOCK(guarded.socket.stat().st_mode)
    for path in (guarded.state_dir, guarded.run_dir):
        assert stat.S_IMODE(path.stat().st_mode) == 0o700, path
    assert stat.S_IMODE((guarded.state_dir / "sandboxd.db").stat().st_mode) == 0o600


def test_token_is_required_but_for_healthz(guarded: Daemon) -> None:
    transport = httpx.HTTPTransport(uds=str(guarded.socket))
    with httpx.Client(transport=transport, base_url="http://localhost") as anonymous:
        assert anonymous.get("/healthz").status_code == 200
        missing = anonymous.get("/sandboxes")
        assert missing.status_code == 401
        assert missing.headers["content-type"].startswith("application/problem+json")
        wrong = anonymous.get("/info", headers={"Authorization": "Bearer nope"})
        assert wrong.status_code == 401
        assert anonymous.post("/sandboxes", json={}).status_code == 401
    assert guarded.client.get("/sandboxes").json()["items"] == []


def test_tcp_listener_with_the_token(guarded: Daemon) -> None:
    url = f"http://127.0.0.1:{guarded.port}"  # type: ignore[attr-defined]
    assert httpx.get(f"{url}/sandboxes").status_code == 401
    answer = httpx.get(f"{url}/sandboxes", headers={"Authorization": f"Bearer {TOKEN}"})
    assert answer.status_code == 200


def test_body_over_the_limit_is_413(guarded: Daemon) -> None:
    response = guarded.client.post("/sandboxes", json={"labels": {"x": "y" * 5000}})
    assert response.status_code == 413
    assert guarded.client.get("/sandboxes").json()["items"] == []


def test_sandbox_limit_is_503(guarded: Daemon) -> None:
    first, second = guarded.create(), guarded.create()
    over = guarded.client.post("/sandboxes", json={})
    assert over.status_code == 503
    assert over.headers["content-type"].startswith("application/problem+json")
    assert len(guarded.client.get("/sandboxes").json()["items"]) == 2
    guarded.client.delete(f"/sandboxes/{first['id']}")
    third = guarded.create()
    for box in (second, third):
        guarded.client.delete(f"/sandboxes/{box['id']}")


def test_tcp_without_a_token_is_refused(tmp_path: object) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "api", "serve", "--listen", f"tcp://127.0.0.1:{free_port()}",
         "--state-dir", f"{tmp_path}/s", "--run-dir", f"{tmp_path}/r"],
        capture_output=True, text=True, timeout=30, env={"PATH": os.environ["PATH"]}, cwd=ROOT,
    )  # fmt: skip
    assert result.returncode == 2
    assert "token" in result.stderr.lower()


def test_a_deep_run_dir_serves(daemons: Daemons) -> None:
    """A socket path holds 108 bytes: the supervisors' sockets are reached through /proc
    magic links, so the run directory may lie as deep as an operator likes."""
    deep = daemons.root / ("d" * 100) / "run"
    long_daemon = daemons.new("--run-dir", str(deep))
    box = long_daemon.create()
    assert long_daemon.exec(box["id"], ["echo", "deep"])["stdout"] == "deep\n"
    assert (deep / "sandboxes" / box["id"] / "supervisor.sock").is_socket()
    long_daemon.client.delete(f"/sandboxes/{box['id']}")
