"""The supervisor and what it hands a process: untouchable from inside, clean process state,
and steady under load and under a daemon killed at the worst moment.
"""

from __future__ import annotations

import contextlib
import json
import signal
import threading
import time
from typing import Any

import httpx
import pytest

from tests.conftest import Daemon


@pytest.fixture(scope="module")
def box(daemon: Daemon) -> dict[str, Any]:
    return daemon.create(name="supervised")


def run(daemon: Daemon, box: dict[str, Any], script: str, **body: Any) -> dict[str, Any]:
    return daemon.sh(box["id"], script, **body)


def test_nothing_inside_can_touch_the_supervisor(daemon: Daemon, box: dict[str, Any]) -> None:
    for script in (
        "kill -KILL 1",
        "kill -TERM 1",
        "readlink /proc/1/exe",
        "ls /proc/1/fd",
        "cat /proc/1/environ",
        "ls /proc/1/root/",
        "cat /proc/1/mem",
    ):
        result = run(daemon, box, script)
        assert result["exit_code"] != 0, (script, result)
    assert daemon.client.get(f"/sandboxes/{box['id']}").json()["state"] == "running"


def test_a_process_gets_a_clean_state(daemon: Daemon, box: dict[str, Any]) -> None:
    status = run(daemon, box, "cat /proc/self/status")["stdout"]
    fields = dict(line.split(":", 1) for line in status.splitlines())
    assert int(fields["SigBlk"], 16) == 0 and int(fields["SigIgn"], 16) == 0
    assert run(daemon, box, "ls /proc/self/fd")["stdout"].split() == ["0", "1", "2", "3"]
    assert run(daemon, box, "id -G")["stdout"].split() == ["0"]
    assert run(daemon, box, 'echo "$HOME"')["stdout"] == "/root\n"
    assert run(daemon, box, 'echo "$HOME"', user="33")["stdout"] == "/var/www\n"
    session = run(daemon, box, "ps -o sid= -o pid= -p $$")["stdout"].split()
    assert session[0] == session[1]  # a session of its own (setsid)


def test_root_inside_cannot_mount_or_rename_the_host(daemon: Daemon, box: dict[str, Any]) -> None:
    assert run(daemon, box, "mount -t tmpfs none /mnt")["exit_code"] != 0
    assert run(daemon, box, "umount /proc")["exit_code"] != 0
    assert run(daemon, box, "hostname other")["exit_code"] != 0
    assert run(daemon, box, "hostname")["stdout"] == "supervised\n"
    # ICMP echo sockets (what `ping` uses unprivileged) are open to its ids.
    icmp = "import socket; socket.socket(socket.AF_INET, socket.SOCK_DGRAM, socket.IPPROTO_ICMP)"
    assert run(daemon, box, f'python3 -c "{icmp}"')["exit_code"] == 0


def test_a_flood_of_execs(daemon: Daemon, box: dict[str, Any]) -> None:
    codes = [daemon.exec(box["id"], ["true"])["exit_code"] for _ in range(300)]
    assert codes == [0] * 300
    assert daemon.client.get(f"/sandboxes/{box['id']}").json()["state"] == "running"


def test_main_cmds_that_end_at_once(daemon: Daemon) -> None:
    boxes = [daemon.create(cmd=["true"]) for _ in range(20)]

    for sandbox in boxes:
        record = daemon.await_state(f"/sandboxes/{sandbox['id']}", "exited")
        assert record and record["exit"]["exit_code"] == 0, record
        daemon.client.delete(f"/sandboxes/{sandbox['id']}")


def test_strings_that_are_not_unicode_are_refused(daemon: Daemon, box: dict[str, Any]) -> None:
    headers = {"content-type": "application/json"}
    bodies = [
        ("/sandboxes", '{"labels": {"a": "\\ud800"}}'),
        ("/sandboxes", '{"env": {"X": "\\ud800"}}'),
        (f"/sandboxes/{box['id']}/exec", '{"cmd": ["echo", "\\udc80"]}'),
        (f"/sandboxes/{box['id']}/exec", '{"cmd": ["cat"], "stdin": "\\ud800"}'),
    ]
    before = daemon.client.get(f"/sandboxes/{box['id']}/execs").json()["items"]
    for url, body in bodies:
        response = daemon.client.post(url, content=body.encode(), headers=headers)
        assert response.status_code == 422, (body, response.text)
    assert daemon.client.get(f"/sandboxes/{box['id']}/execs").json()["items"] == before
    assert daemon.client.get("/sandboxes").status_code == 200


def test_a_daemon_killed_while_creating_leaves_nothing(daemon: Daemon) -> None:
    """SIGKILL the daemon at a few moments of a create: whatever it had begun is undone at
    the next start, by the sandbox's cgroup, whether or not the supervisor's pid was stored."""
    for delay in (0.0, 0.005, 0.01, 0.02, 0.04):
        thread = threading.Thread(target=_create_ignoring_the_answer, args=(daemon,))
        thread.start()
        time.sleep(delay)
        daemon.stop(signal.SIGKILL)
        thread.join()
        daemon.start()
        for record in daemon.client.get("/sandboxes").json()["items"]:
            assert record["state"] in ("running", "failed"), json.dumps(record)
            daemon.client.delete(f"/sandboxes/{record['id']}")
        assert daemon.client.get("/sandboxes").json()["items"] == []
        assert not daemon.leaks(), delay


def _create_ignoring_the_answer(daemon: Daemon) -> None:
    with contextlib.suppress(httpx.TransportError):
        daemon.client.post("/sandboxes", json={})
