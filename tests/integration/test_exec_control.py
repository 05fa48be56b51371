"""Controlling execs: background execs, signals, deadlines enforced by the supervisor, stdin,
and how long finished execs are kept.
"""

from __future__ import annotations

import json
import socket
import time
from typing import Any

import pytest

from tests.conftest import Daemon, Daemons, wait_for


@pytest.fixture(scope="module")
def box(daemon: Daemon) -> dict[str, Any]:
    return daemon.create(name="control")


def exec_url(box: dict[str, Any], exec_id: str) -> str:
    return f"/sandboxes/{box['id']}/execs/{exec_id}"


def sleeps(daemon: Daemon, box: dict[str, Any]) -> list[str]:
    ps = daemon.exec(box["id"], ["ps", "-e", "-o", "comm="])["stdout"]
    return [line for line in ps.split() if line == "sleep"]


def test_background_sleep_signalled_with_sigterm(daemon: Daemon, box: dict[str, Any]) -> None:
    started = daemon.exec(box["id"], ["sleep", "60"], wait=False)
    assert started["state"] == "running" and started["pid"] > 1
    url = exec_url(box, started["id"])
    assert daemon.client.get(url).json()["state"] == "running"
    answer = daemon.client.post(f"{url}/signal", json={"signal": "SIGTERM"})
    assert answer.status_code == 202
    record = daemon.await_state(url, "exited")
    assert (record["signal"], record["exit_code"], record["timed_out"]) == ("SIGTERM", None, False)
    again = daemon.client.post(f"{url}/signal", json={"signal": "SIGTERM"})
    assert again.status_code == 409
    assert again.headers["content-type"].startswith("application/problem+json")


def test_deadline_kills_the_whole_tree(daemon: Daemon, box: dict[str, Any]) -> None:
    script = "sleep 30 & setsid sleep 30 & (sleep 30 &); sleep 30"
    began = time.monotonic()
    result = daemon.sh(box["id"], script, timeout_seconds=0.5)
    took = time.monotonic() - began
    assert took < 5, took
    assert result["timed_out"] is True
    assert (result["signal"], result["exit_code"]) == ("SIGKILL", None)
    assert sleeps(daemon, box) == []


def test_deadline_holds_when_the_client_goes_away(daemon: Daemon, box: dict[str, Any]) -> None:
    body = json.dumps({"cmd": ["sh", "-c", "setsid sleep 30 & sleep 30"], "timeout_seconds": 2})
    request = (
        f"POST /sandboxes/{box['id']}/exec HTTP/1.1\r\nHost: localhost\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n{body}"
    )
    cmd = ["sh", "-c", "setsid sleep 30 & sleep 30"]

    def started() -> dict[str, Any] | None:
        items = daemon.client.get(f"/sandboxes/{box['id']}/execs").json()["items"]
        return next((e for e in items if e["cmd"] == cmd and e["pid"]), None)

    with socket.socket(socket.AF_UNIX) as client:
        client.connect(str(daemon.socket))
        client.sendall(request.encode())
        last = wait_for(started)  # it runs; then the client hangs up without an answer
    assert last is not None
    record = daemon.await_state(exec_url(box, last["id"]), "exited")
    assert record["timed_out"] is True and record["signal"] == "SIGKILL"
    assert sleeps(daemon, box) == []


def test_an_exec_that_ends_in_time_is_not_timed_out(daemon: Daemon, box: dict[str, Any]) -> None:
    result = daemon.sh(box["id"], "sleep 0.1; echo ok", timeout_seconds=5)
    assert (result["exit_code"], result["timed_out"], result["stdout"]) == (0, False, "ok\n")


def test_background_children_outlive_the_exec_unless_killed(
    daemon: Daemon, box: dict[str, Any]
) -> None:
    result = daemon.sh(box["id"], "setsid sleep 2 > /dev/null 2>&1 & echo started")
    assert result["exit_code"] == 0 and result["stdout"] == "started\n"
    assert sleeps(daemon, box) == ["sleep"]
    assert wait_for(lambda: sleeps(daemon, box) == [], timeout=5)


def test_stdin_is_written_then_closed(daemon: Daemon, box: dict[str, Any]) -> None:
    big = "line\n" * 100_000  # 500 kB: more than a pipe holds, written as the process reads
    result = daemon.exec(box["id"], ["wc", "-l"], stdin=big)
    assert result["stdout"].strip() == "100000"


def test_finished_execs_are_forgotten_after_the_retention(daemons: Daemons) -> None:
    short = daemons.new("--exec-retention", "1")
    box = short.create()
    done = short.exec(box["id"], ["true"])
    running = short.exec(box["id"], ["sleep", "30"], wait=False)
    url = f"/sandboxes/{box['id']}/execs"
    assert short.client.get(f"{url}/{done['id']}").status_code == 200
    assert wait_for(lambda: short.client.get(f"{url}/{done['id']}").status_code == 404, 5)
    assert short.client.get(f"{url}/{running['id']}").json()["state"] == "running"
