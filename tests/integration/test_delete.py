"""DELETE /sandboxes/{ref}: every process, mount, layer and runtime file of it is gone."""

from __future__ import annotations

import os
from pathlib import Path

from tests.conftest import Daemon


def test_delete_leaves_nothing(daemon: Daemon) -> None:
    box = daemon.create(name="doomed")
    daemon.sh(box["id"], "echo data > /root/file; (setsid sleep 300 &); sleep 300 &", wait=True)
    started = daemon.exec(box["id"], ["sleep", "300"], wait=False)
    layers = daemon.state_dir / "sandboxes" / box["id"]
    runtime = daemon.run_dir / "sandboxes" / box["id"]
    assert layers.is_dir() and runtime.is_dir()
    children = _descendants(box["pid"])
    assert len(children) >= 3
    assert any(str(daemon.root) in m for m in _mountinfo(box["pid"]))

    assert daemon.client.delete("/sandboxes/doomed").status_code == 204

    # Answered: nothing of it runs, and the API has forgotten it.
    assert not _alive(box["pid"]) and not any(_alive(pid) for pid in children)
    assert daemon.client.get(f"/sandboxes/{box['id']}").status_code == 404
    assert daemon.client.get(f"/sandboxes/{box['id']}/execs/{started['id']}").status_code == 404
    assert daemon.client.delete("/sandboxes/doomed").status_code == 404
    # Its files go in the background (tests/integration/test_removal.py).
    daemon.settled()
    assert not layers.exists() and not runtime.exists()
    assert not daemon.leaks()


def test_the_leak_check_sees_a_live_sandbox(daemon: Daemon) -> None:
    box = daemon.create()
    leaks = daemon.leaks()
    assert any(str(box["pid"]) in leak for leak in leaks), leaks
    assert any(box["id"] in leak for leak in leaks), leaks
    daemon.client.delete(f"/sandboxes/{box['id']}")
    assert not daemon.leaks()


def test_delete_an_exited_sandbox(daemon: Daemon) -> None:
    box = daemon.create(cmd=["true"])
    assert daemon.client.delete(f"/sandboxes/{box['id']}").status_code == 204
    assert daemon.client.get(f"/sandboxes/{box['id']}").status_code == 404
    assert not daemon.leaks()


def _descendants(pid: int) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(entry))
    return found


def _mountinfo(pid: int) -> list[str]:
    return Path(f"/proc/{pid}/mountinfo").read_text().splitlines()


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False
