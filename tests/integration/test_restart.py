"""The daemon stopped and started again: sandboxes survive, exits that happened meanwhile are
stored, and a supervisor killed from the host is noticed and cleaned up.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest

from tests.conftest import Daemon, Daemons, wait_for

pytestmark = pytest.mark.usefixtures("nothing_carries_over")


@pytest.mark.parametrize("how", [signal.SIGTERM, signal.SIGKILL], ids=["SIGTERM", "SIGKILL"])
def test_sandboxes_survive_a_daemon_restart(daemon: Daemon, how: int) -> None:
    box = daemon.create()
    before = daemon.sh(box["id"], "echo before")
    background = daemon.sh(box["id"], "sleep 1; echo finished while down; exit 3", wait=False)
    assert daemon.stop(how) in (0, -how)

    time.sleep(1.5)  # the exec ends while no daemon runs
    daemon.start()
    record = daemon.client.get(f"/sandboxes/{box['id']}").json()
    assert record["state"] == "running" and record["pid"] == box["pid"]
    finished = daemon.client.get(f"/sandboxes/{box['id']}/execs/{background['id']}").json()
    assert finished["state"] == "exited" and finished["exit_code"] == 3
    assert finished["stdout"] == "finished while down\n"
    assert daemon.client.get(f"/sandboxes/{box['id']}/execs/{before['id']}").json() == before
    assert daemon.sh(box["id"], "echo after")["stdout"] == "after\n"
    daemon.client.delete(f"/sandboxes/{box['id']}")


def test_an_exec_running_across_the_restart_is_followed(daemon: Daemon) -> None:
    box = daemon.create()
    # It ends when told to, not after a time: a slow restart must not outrun it.
    waiting = "until [ -e /tmp/go ]; do sleep 0.05; done; echo done"
    background = daemon.sh(box["id"], waiting, wait=False)
    daemon.stop(signal.SIGKILL)
    daemon.start()
    url = f"/sandboxes/{box['id']}/execs/{background['id']}"
    assert daemon.client.get(url).json()["state"] == "running"
    daemon.sh(box["id"], "touch /tmp/go")
    record = daemon.await_state(url, "exited")
    assert record and record["stdout"] == "done\n" and record["exit_code"] == 0
    daemon.client.delete(f"/sandboxes/{box['id']}")


def test_main_cmd_that_ended_while_down_is_stored(daemon: Daemon) -> None:
    box = daemon.create(cmd=["sh", "-c", "sleep 1; exit 5"])
    daemon.stop(signal.SIGKILL)
    time.sleep(1.5)
    daemon.start()
    record = daemon.client.get(f"/sandboxes/{box['id']}").json()
    assert record["state"] == "exited" and record["exit"]["exit_code"] == 5
    assert not (daemon.run_dir / "sandboxes" / box["id"]).exists()


def test_supervisor_killed_from_the_host(daemon: Daemon) -> None:
    box = daemon.create()
    daemon.sh(box["id"], "sleep 300 & (setsid sleep 300 &)")
    running = daemon.exec(box["id"], ["sleep", "300"], wait=False)
    os.kill(box["pid"], signal.SIGKILL)

    record = daemon.await_state(f"/sandboxes/{box['id']}", "failed", timeout=5)
    assert record and record["exit"]["reason"] == "supervisor_lost"
    exec_record = daemon.client.get(f"/sandboxes/{box['id']}/execs/{running['id']}").json()
    assert exec_record["state"] == "exited" and exec_record["signal"] == "SIGKILL"
    assert not daemon.leaks()


def test_supervisor_killed_while_the_daemon_is_down(daemons: Daemons, daemon: Daemon) -> None:
    box = daemon.create()
    daemon.stop()
    os.kill(box["pid"], signal.SIGKILL)
    wait_for(lambda: not Path(f"/proc/{box['pid']}").exists())
    daemon.start()
    record = daemon.client.get(f"/sandboxes/{box['id']}").json()
    assert record["state"] == "failed" and record["exit"]["reason"] == "supervisor_lost"
    assert not daemon.leaks()
