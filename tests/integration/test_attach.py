"""GET …/execs/{id}/attach: an interactive exec over a WebSocket, with and without a TTY."""

from __future__ import annotations

import base64
import json
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
from websockets.sync.client import ClientConnection, unix_connect

from tests.conftest import Daemon


@pytest.fixture(scope="module")
def box(daemon: Daemon) -> dict[str, Any]:
    return daemon.create(name="attach")


def attach(daemon: Daemon, box: dict[str, Any], exec_id: str) -> ClientConnection:
    uri = f"ws://localhost/sandboxes/{box['id']}/execs/{exec_id}/attach"
    return unix_connect(str(daemon.socket), uri, open_timeout=10)


def read_until(ws: ClientConnection, wanted: str, timeout: float = 10) -> str:
    """Output until `wanted` appears in it (TTY output comes in arbitrary pieces)."""
    seen = ""
    deadline = time.monotonic() + timeout
    while wanted not in seen:
        event = json.loads(ws.recv(timeout=max(0.01, deadline - time.monotonic())))
        assert "exit" not in event, (seen, event)
        seen += event.get("data", "")
    return seen


def test_a_terminal_over_a_websocket(daemon: Daemon, box: dict[str, Any]) -> None:
    started = daemon.exec(
        box["id"], ["sh"], tty=True, wait=False, tty_size={"rows": 24, "cols": 80}
    )
    with attach(daemon, box, started["id"]) as ws:
        ws.send(json.dumps({"stdin": "echo $((6*7))\n"}))
        assert "42" in read_until(ws, "42\r\n")
        ws.send(json.dumps({"stdin": "stty size\n"}))
        assert "24 80" in read_until(ws, "24 80")
        ws.send(json.dumps({"resize": {"rows": 50, "cols": 132}}))
        ws.send(b"stty size; tty\n")  # binary messages are stdin as they are
        output = read_until(ws, "/dev/pts/")
        assert "50 132" in output
        ws.send(json.dumps({"stdin": "exit 3\n"}))
        events = [json.loads(message) for message in ws]
    assert events[-1]["exit"]["exit_code"] == 3
    record = daemon.client.get(f"/sandboxes/{box['id']}/execs/{started['id']}").json()
    assert record["state"] == "exited" and "42" in record["stdout"] and record["stderr"] == ""


def test_interactive_stdin_without_a_terminal(daemon: Daemon, box: dict[str, Any]) -> None:
    script = 'while read line; do echo "got $line"; done; echo done >&2'
    started = daemon.exec(box["id"], ["sh", "-c", script], interactive=True, wait=False)
    with attach(daemon, box, started["id"]) as ws:
        ws.send(json.dumps({"stdin": "hello\n"}))
        assert read_until(ws, "got hello\n") == "got hello\n"
        ws.send(json.dumps({"eof": True}))
        events = [json.loads(message) for message in ws]
    assert {"stream": "stderr", "data": "done\n"} in events
    assert events[-1]["exit"]["exit_code"] == 0


def test_attach_to_a_finished_exec_replays_it(daemon: Daemon, box: dict[str, Any]) -> None:
    done = daemon.sh(box["id"], "echo once")
    with attach(daemon, box, done["id"]) as ws:
        events = [json.loads(message) for message in ws]
    assert events == [{"stream": "stdout", "data": "once\n"}, {"exit": done}]


def test_attach_to_an_unknown_exec(daemon: Daemon, box: dict[str, Any]) -> None:
    with attach(daemon, box, "ex_nope") as ws:
        error = json.loads(ws.recv(timeout=5))
    assert error["error"]["status"] == 404


@pytest.mark.parametrize("encoding", ["utf-8", "base64"])
def test_attached_output_of_an_exec_ending_at_once_is_all_there(
    daemon: Daemon, box: dict[str, Any], encoding: str
) -> None:
    # Attached as it ends: it may end between the SUBSCRIBED and the follower reading the
    # bytes before the subscription's offsets, which must still come.
    def attached(_: int) -> list[dict[str, Any]]:
        started = daemon.sh(box["id"], "echo out; echo err >&2", wait=False, encoding=encoding)
        with attach(daemon, box, started["id"]) as ws:
            return [json.loads(message) for message in ws]

    with ThreadPoolExecutor(8) as pool:
        runs = list(pool.map(attached, range(100)))
    for events in runs:
        assert events[-1]["exit"]["exit_code"] == 0, events
        for stream, wanted in (("stdout", b"out\n"), ("stderr", b"err\n")):
            pieces = [e["data"] for e in events if e.get("stream") == stream]
            if encoding == "base64":
                assert b"".join(base64.b64decode(p) for p in pieces) == wanted, events
            else:
                assert "".join(pieces).encode() == wanted, events
