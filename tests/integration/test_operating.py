"""Operating the daemon: it refuses to start without root; its log is structured (JSON lines
with time, level, logger, the request's id and the sandbox's and exec's ids); it answers with
X-Request-ID; it tells systemd READY=1 and STOPPING=1; and with cgroup_parent = "delegated"
its sandboxes' cgroups live under its own.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from unittest import mock

import httpx
import pytest
from websockets.sync.client import unix_connect

from api.sd_notify import Notifier
from daemon.config import ConfigError, load_config
from daemon.linux.cgroups import detect_layout, remove_tree
from tests.conftest import (
    ROOT,
    SLOTS_PER_DAEMON,
    UID_BASE,
    Daemon,
    Daemons,
    find_leaks,
    free_subnet,
    wait_for,
)

TOKEN = "t0ken-that-must-never-be-logged"
JSON_ARGS = ("--log-format", "json", "--token", TOKEN)
UNIFIED = Path("/sys/fs/cgroup/unified")
MiB = 1 << 20


@pytest.fixture(scope="module")
def jsond(daemons: Daemons) -> Daemon:
    daemon = daemons.new(*JSON_ARGS)
    daemon.client.headers["Authorization"] = f"Bearer {TOKEN}"
    return daemon


@pytest.fixture(autouse=True)
def nothing_carries_over(request: pytest.FixtureRequest) -> Iterator[None]:
    yield
    if "jsond" in request.fixturenames:
        daemon: Daemon = request.getfixturevalue("jsond")
        if daemon.proc is None:
            daemon.start(*JSON_ARGS)
        daemon.destroy_all()


def records(daemon: Daemon, since: int = 0) -> list[dict[str, Any]]:
    """The daemon's log lines from byte `since` on, each parsed as JSON (all must parse)."""
    text = daemon.log.read_bytes()[since:].decode()
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def one(found: list[Any], what: str) -> Any:
    assert len(found) == 1, f"{what}: {found}"
    return found[0]


# -- refusing to start ------------------------------------------------------------------------

# /root, where this Python lives, is closed to other users: the modules are read while root,
# then the process drops to nobody and runs the command.
_AS_NOBODY = """
import os, sys
import api.cli, api.serve, api.sockets, daemon.logs
os.setgroups([])
os.setresgid(65534, 65534, 65534)
os.setresuid(65534, 65534, 65534)
raise SystemExit(api.cli.main())
"""


@pytest.mark.parametrize("fmt", ["text", "json"])
def test_serve_as_a_user_is_refused_in_one_line(tmp_path: Path, fmt: str) -> None:
    os.chmod(tmp_path, 0o777)
    chosen = ["--log-format", fmt] if fmt == "json" else []  # text: the default
    result = subprocess.run(
        [sys.executable, "-c", _AS_NOBODY, "serve", *chosen,
         "--state-dir", str(tmp_path / "state"), "--run-dir", str(tmp_path / "run")],
        capture_output=True, text=True, timeout=60, cwd=ROOT,
    )  # fmt: skip
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert "needs root" in lines[0]
    if fmt == "json":
        assert json.loads(lines[0])["level"] == "error"
    else:  # the time, RFC 3339 in UTC, and the level
        assert re.match(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z \[error", lines[0])
    assert not (tmp_path / "state").exists() and not (tmp_path / "run").exists()


def test_a_refused_start_is_one_log_line(jsond: Daemon, tmp_path: Path) -> None:
    # A bridge and subnet of its own: the network check passes, and the socket is refused.
    config = tmp_path / "config.toml"
    config.write_text(
        f'bridge_name = "sbt{uuid.uuid4().hex[:8]}"\nbridge_subnet = "{free_subnet()}"\n'
    )

    def serve(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "api", "serve", "--log-format", "json", "--config",
             str(config), "--state-dir", str(tmp_path / "s"),
             "--run-dir", str(tmp_path / "r"), *args],
            capture_output=True, text=True, timeout=60, cwd=ROOT,
        )  # fmt: skip

    # A setting that cannot be used.
    bad = serve("--max-body", "lots")
    assert bad.returncode == 2
    line = json.loads(one(bad.stderr.splitlines(), bad.stderr))
    assert line["level"] == "error" and "--max-body" in line["event"]
    # The running daemon's socket: in use.
    taken = serve("--listen", f"unix://{jsond.socket}")
    assert taken.returncode == 1
    lines = [json.loads(text) for text in taken.stderr.splitlines()]  # the claim's info first
    line = one([line for line in lines if line["level"] != "info"], taken.stderr)
    assert line["level"] == "error" and "refusing to start" in line["event"]
    assert jsond.client.get("/healthz").status_code == 200


# -- the log ----------------------------------------------------------------------------------


def test_log_settings_come_from_flag_environment_or_file(tmp_path: Path) -> None:
    file = tmp_path / "config.toml"
    file.write_text('log_level = "warning"\nlog_format = "json"\ncgroup_parent = "delegated"\n')
    config = load_config({"config": str(file)}, {})
    assert (config.log_level, config.log_format, config.cgroup_parent) == (
        "warning",
        "json",
        "delegated",
    )
    config = load_config(
        {"config": str(file), "log_level": "debug"}, {"SANDBOXD_LOG_FORMAT": "text"}
    )
    assert (config.log_level, config.log_format) == ("debug", "text")
    with pytest.raises(ConfigError, match="SANDBOXD_LOG_FORMAT: expected one of text, json"):
        load_config({"config": str(file)}, {"SANDBOXD_LOG_FORMAT": "yaml"})
    file.write_text('cgroup_parent = "systemd"\n')
    with pytest.raises(ConfigError, match=r"cgroup_parent in .*: expected one of root, delegated"):
        load_config({"config": str(file)}, {})


def test_every_line_is_json_with_time_level_logger_and_event(jsond: Daemon) -> None:
    jsond.client.get("/info")
    found = records(jsond)
    assert len(found) > 3
    for record in found:
        assert record["level"] in ("debug", "info", "warning", "error"), record
        assert isinstance(record["logger"], str) and isinstance(record["event"], str), record
        assert record["time"].endswith("Z"), record  # RFC 3339, UTC
        assert datetime.fromisoformat(record["time"]).tzinfo == UTC
    # uvicorn's own lines go through the same formatter.
    assert any(r["logger"].startswith("uvicorn") for r in found)


def test_the_request_id_is_echoed_or_made(jsond: Daemon) -> None:
    given = f"client-{uuid.uuid4()}"
    assert jsond.client.get("/info", headers={"X-Request-ID": given}).headers["x-request-id"] == (
        given
    )
    made = jsond.client.get("/info").headers["x-request-id"]
    assert re.fullmatch(r"[0-9a-f]{32}", made)
    for unusable in ("x" * 129, "two words", ""):
        answer = jsond.client.get("/info", headers={"X-Request-ID": unusable})
        assert re.fullmatch(r"[0-9a-f]{32}", answer.headers["x-request-id"]), unusable
    # On problems too: a 404, and a 401 (answered before the app sees the request).
    missing = jsond.client.get("/sandboxes/nonesuch", headers={"X-Request-ID": "r-404"})
    assert missing.status_code == 404 and missing.headers["x-request-id"] == "r-404"
    transport = httpx.HTTPTransport(uds=str(jsond.socket))
    with httpx.Client(transport=transport, base_url="http://localhost") as anonymous:
        refused = anonymous.get("/sandboxes", headers={"X-Request-ID": "r-401"})
    assert refused.status_code == 401 and refused.headers["x-request-id"] == "r-401"
    access = [r for r in records(jsond) if r.get("request_id") == "r-401"]
    assert one(access, "401 access line")["status"] == 401


def test_a_websocket_gets_a_request_id_and_an_access_line(jsond: Daemon) -> None:
    done = jsond.sh(jsond.create()["id"], "echo once")
    path = f"/sandboxes/{done['sandbox_id']}/execs/{done['id']}/attach"
    # A browser cannot set headers on a WebSocket: the token comes in the query.
    uri = f"ws://localhost{path}?token={TOKEN}"
    with unix_connect(str(jsond.socket), uri, additional_headers={"X-Request-ID": "r-ws"}) as ws:
        assert ws.response is not None
        assert ws.response.headers["X-Request-ID"] == "r-ws"
        assert [json.loads(message) for message in ws][-1] == {"exit": done}
    mine = [r for r in records(jsond) if r.get("request_id") == "r-ws"]
    assert mine and not [r for r in mine if "WebSocket" in r["event"]]  # uvicorn's, with query
    line = one([r for r in mine if r["logger"] == "api.access"], "ws access line")
    assert (line["method"], line["path"], line["status"]) == ("GET", path, 101)
    assert TOKEN not in jsond.log_text()


def test_a_requests_lines_carry_its_id_and_the_sandbox_and_exec_ids(jsond: Daemon) -> None:
    ids = {step: f"{step}-{uuid.uuid4()}" for step in ("create", "exec", "delete")}
    created = jsond.client.post("/sandboxes", json={}, headers={"X-Request-ID": ids["create"]})
    box = created.json()
    ran = jsond.client.post(
        f"/sandboxes/{box['id']}/exec",
        json={"cmd": ["sh", "-c", "exit 3"]},
        headers={"X-Request-ID": ids["exec"]},
    ).json()
    jsond.client.delete(f"/sandboxes/{box['id']}", headers={"X-Request-ID": ids["delete"]})
    found = records(jsond)

    def of(request_id: str) -> list[dict[str, Any]]:
        return [r for r in found if r.get("request_id") == request_id]

    made = one([r for r in of(ids["create"]) if "created" in r["event"]], "created")
    assert made["sandbox_id"] == box["id"] and made["level"] == "info"
    access = one([r for r in of(ids["create"]) if r["logger"] == "api.access"], "access")
    assert (access["method"], access["path"], access["status"]) == ("POST", "/sandboxes", 201)
    assert access["duration_ms"] > 0
    started = one([r for r in of(ids["exec"]) if "started" in r["event"]], "exec started")
    assert (started["sandbox_id"], started["exec_id"]) == (box["id"], ran["id"])
    # The end is reported over the sandbox's link, not by the request: the ids, not the
    # request id of whichever request happened to create the sandbox.
    ended = one([r for r in found if r.get("exec_id") == ran["id"] and "ended" in r["event"]], "")
    assert (ended["sandbox_id"], ended["exit_code"]) == (box["id"], 3)
    assert ended.get("request_id") != ids["create"]
    gone = one([r for r in of(ids["delete"]) if "destroyed" in r["event"]], "destroyed")
    assert gone["sandbox_id"] == box["id"]


def test_the_token_and_query_strings_are_never_logged(jsond: Daemon) -> None:
    listed = jsond.client.get("/sandboxes", params={"label": "secret=q-s3cr3t-value"})
    assert listed.status_code == 200
    transport = httpx.HTTPTransport(uds=str(jsond.socket))
    with httpx.Client(transport=transport, base_url="http://localhost") as wrong:
        wrong.get("/info", headers={"Authorization": "Bearer wr0ng-t0ken-guess"})
    text = jsond.log_text()
    for secret in (TOKEN, "wr0ng-t0ken-guess", "q-s3cr3t-value", "Bearer"):
        assert secret not in text
    paths = {r["path"] for r in records(jsond) if r["logger"] == "api.access"}
    assert "/sandboxes" in paths and not any("?" in p for p in paths)


def test_ttl_expiry_and_a_lost_supervisor_are_logged(jsond: Daemon) -> None:
    creating = f"create-{uuid.uuid4()}"
    brief = jsond.client.post(
        "/sandboxes", json={"ttl_seconds": 1}, headers={"X-Request-ID": creating}
    ).json()
    assert wait_for(lambda: jsond.client.get(f"/sandboxes/{brief['id']}").status_code == 404)
    expiry = [
        r for r in records(jsond) if r.get("sandbox_id") == brief["id"] and "ttl" in r["event"]
    ]
    line = one(expiry, "ttl line")
    assert line["level"] == "info" and line.get("request_id") is None

    lost = jsond.create()
    os.kill(lost["pid"], signal.SIGKILL)
    jsond.await_state(f"/sandboxes/{lost['id']}", "failed")
    mine = [r for r in records(jsond) if r.get("sandbox_id") == lost["id"]]
    line = one([r for r in mine if "supervisor was lost" in r["event"]], "lost line")
    assert line["level"] == "error" and line["exit_reason"] == "supervisor_lost"


@pytest.mark.skipif(detect_layout() is None, reason="no memory controller on this host")
def test_oom_kills_are_warnings(jsond: Daemon) -> None:
    touch = ["python3", "-c", "data = b'x' * (400 << 20)"]
    box = jsond.create(limits={"memory_bytes": 64 * MiB})
    killed = jsond.exec(box["id"], touch)
    assert killed["oom_killed"] is True
    main = jsond.create(cmd=touch, limits={"memory_bytes": 64 * MiB})
    jsond.await_state(f"/sandboxes/{main['id']}", "exited")
    found = records(jsond)
    line = one([r for r in found if r.get("exec_id") == killed["id"] and "OOM" in r["event"]], "")
    assert line["level"] == "warning" and line["sandbox_id"] == box["id"]
    line = one([r for r in found if r.get("sandbox_id") == main["id"] and "OOM" in r["event"]], "")
    assert line["level"] == "warning" and line["exit_reason"] == "oom"


def test_adoption_at_start_is_logged(jsond: Daemon) -> None:
    box = jsond.create()
    jsond.stop()
    since = jsond.log.stat().st_size
    jsond.start(*JSON_ARGS)
    found = records(jsond, since)
    mine = [r for r in found if r.get("sandbox_id") == box["id"]]
    adopted = one([r for r in mine if r["event"].startswith("adopted")], "adopted")
    assert adopted["level"] == "info"
    summary = one([r for r in found if r["event"].startswith("adoption done")], "summary")
    assert summary["adopted"] == 1 and summary["ended"] == 0
    assert "sandbox_id" not in summary


# -- a 500 ------------------------------------------------------------------------------------

# The real server (api.serve.run, uvicorn) with the JSON log, around a service whose /info
# fails: no route of the real daemon fails on purpose.
_BROKEN = """
import sys
from pathlib import Path
from api.app import create_app
from api.serve import run
from api.sockets import bind_listeners
from daemon import logs
from tests.api.fakes import FakeService

class Broken(FakeService):
    async def info(self):
        raise RuntimeError("the disk is on fire")

logs.configure("info", "json")
path = Path(sys.argv[1])
listeners = bind_listeners([f"unix://{path}"], run_dir=path.parent)
raise SystemExit(run(create_app(Broken(), token=None, max_body=1024), listeners))
"""


def test_a_500_is_one_error_line_with_its_traceback_and_request_id(tmp_path: Path) -> None:
    path = tmp_path / "sandboxd.sock"
    with open(tmp_path / "log", "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-c", _BROKEN, str(path)],
            cwd=ROOT,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        client = httpx.Client(transport=httpx.HTTPTransport(uds=str(path)), base_url="http://d")

        def ready() -> bool:
            try:
                return client.get("/healthz").status_code == 200
            except httpx.TransportError:
                return proc.poll() is not None

        assert wait_for(ready, timeout=30) and proc.poll() is None
        answer = client.get("/info", headers={"X-Request-ID": "r-500"})
        assert answer.status_code == 500
        assert answer.headers["x-request-id"] == "r-500"
        assert "fire" not in answer.text  # the client learns only that it happened
        client.close()
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
    found = [json.loads(line) for line in (tmp_path / "log").read_text().splitlines()]
    tracebacks = [r for r in found if "exception" in r]
    line = one(tracebacks, "one traceback, not the server's second one")
    assert line["level"] == "error" and line["request_id"] == "r-500"
    assert "Traceback" in line["exception"] and "the disk is on fire" in line["exception"]
    access = one([r for r in found if r["logger"] == "api.access" and r["path"] == "/info"], "")
    assert (access["status"], access["request_id"]) == (500, "r-500")


# -- systemd ----------------------------------------------------------------------------------


def test_ready_and_stopping_reach_the_notify_socket(
    daemons: Daemons, monkeypatch: pytest.MonkeyPatch
) -> None:
    name = f"sandboxd-test-notify-{uuid.uuid4().hex}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as listener:
        listener.bind(b"\0" + name.encode())  # the abstract namespace, written '@name'
        listener.settimeout(30)
        monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
        daemon = daemons.new()
        monkeypatch.delenv("NOTIFY_SOCKET")
        ready = listener.recv(4096).decode().splitlines()
        assert "READY=1" in ready
        # Serving by then, and no child of the daemon can speak for it.
        assert daemon.client.get("/healthz").status_code == 200
        assert daemon.proc is not None
        children = [p for p in _pids() if _parent(p) == daemon.proc.pid]
        assert children  # the zygotes
        for child in children:
            assert b"NOTIFY_SOCKET" not in Path(f"/proc/{child}/environ").read_bytes()
        assert daemon.stop() == 0
        assert "STOPPING=1" in listener.recv(4096).decode().splitlines()


def test_the_notifier_speaks_to_a_path_and_ignores_what_it_cannot_use(tmp_path: Path) -> None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as listener:
        listener.bind(str(tmp_path / "notify"))
        Notifier(str(tmp_path / "notify")).notify("READY=1", "STATUS=serving")
        assert listener.recv(4096) == b"READY=1\nSTATUS=serving"
    Notifier(None).notify("READY=1")  # not under systemd: nothing
    Notifier(str(tmp_path / "gone")).notify("READY=1")  # nobody listens: logged, not raised
    Notifier("vsock:2:1234").notify("READY=1")


# -- cgroups ----------------------------------------------------------------------------------


def test_delegated_sandboxes_live_under_the_daemons_own_cgroup(daemons: Daemons) -> None:
    """As under systemd with Delegate=yes: the daemon starts in a cgroup of its own (here one
    this test makes), moves into OWN/daemon, and puts its sandboxes under OWN/sandboxes."""
    if not (UNIFIED / "cgroup.procs").exists():
        pytest.skip("no cgroup2 hierarchy at /sys/fs/cgroup/unified")
    own = UNIFIED / f"{daemons.root.name}-own"
    own.mkdir()
    root = daemons.root / "delegated"
    root.mkdir()
    region = daemons.regions[-1]  # Daemons.new takes them from the first
    daemon = Daemon(
        root,
        UID_BASE + region * SLOTS_PER_DAEMON * 65536,
        f"{daemons.root.name}-delegated",
        f"sbt{uuid.uuid4().hex[:8]}",
        free_subnet(),
    )

    popen = subprocess.Popen

    def start_in(cgroup: Path) -> None:
        def born_there() -> None:  # in the child, before exec
            (cgroup / "cgroup.procs").write_text("0")

        with mock.patch.object(
            subprocess, "Popen", lambda *a, **k: popen(*a, preexec_fn=born_there, **k)
        ):
            daemon.start("--cgroup-parent", "delegated")

    try:
        start_in(own)
        assert daemon.proc is not None
        assert _cgroup(daemon.proc.pid) == own / "daemon"
        box = daemon.create()
        sandbox_cgroup = own / "sandboxes" / box["id"]
        assert sandbox_cgroup.is_dir()
        # From the host: the supervisor and an exec's processes are under the daemon's cgroup.
        assert _cgroup(box["pid"]) == sandbox_cgroup / "init"
        daemon.exec(box["id"], ["sleep", "300"], wait=False)
        execs = wait_for(lambda: [p for p in _pids() if _parent(p) == box["pid"]])
        assert execs
        for pid in execs:
            assert _cgroup(pid).parent == sandbox_cgroup
        # Nothing of it at the top of the hierarchy, where cgroup_parent = root puts it.
        assert not (UNIFIED / daemon.cgroup_name).exists()
        # Restarted as systemd's DelegateSubgroup=daemon does it, born in OWN/daemon: the same
        # tree, and the sandbox adopted in it.
        daemon.stop()
        start_in(own / "daemon")
        assert _cgroup(daemon.proc.pid) == own / "daemon"
        assert daemon.client.get(f"/sandboxes/{box['id']}").json()["state"] == "running"
        assert sorted(p.name for p in own.iterdir() if p.is_dir()) == ["daemon", "sandboxes"]
        assert _cgroup(box["pid"]) == sandbox_cgroup / "init"
        daemon.client.delete(f"/sandboxes/{box['id']}")
        daemon.settled()  # its removal comes after the answer
        assert not sandbox_cgroup.exists()
    finally:
        try:
            if daemon.proc is not None and daemon.proc.poll() is None:
                daemon.destroy_all()
                daemon.stop()
            daemon.client.close()
            daemon.cleanup()
        finally:  # the test's cgroup goes, whatever happened
            leaf = own / "daemon" / "cgroup.procs"  # absent if the daemon never started
            wait_for(lambda: not leaf.exists() or not leaf.read_text().strip())
            remove_tree(own)
    assert not find_leaks(root, daemon.uid_base, bridge=daemon.bridge, sandbox_ids=daemon.created)


def _cgroup(pid: int) -> Path:
    for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines():
        if line.startswith("0::"):
            return UNIFIED / line.removeprefix("0::/")
    raise AssertionError(f"process {pid} has no cgroup2 cgroup")


def _pids() -> list[int]:
    return [int(p) for p in os.listdir("/proc") if p.isdigit()]


def _parent(pid: int) -> int | None:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return None
