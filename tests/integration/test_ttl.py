"""ttl_seconds: a sandbox is destroyed that long after creation, across a restart too."""

from __future__ import annotations

import signal
import time

from tests.conftest import Daemon, wait_for


def gone(daemon: Daemon, sandbox_id: str) -> bool:
    return daemon.client.get(f"/sandboxes/{sandbox_id}").status_code == 404


def test_ttl_destroys_the_sandbox(daemon: Daemon) -> None:
    box = daemon.create(ttl_seconds=1)
    assert box["expires_at"] is not None and box["expires_at"] > box["created_at"]
    assert not gone(daemon, box["id"])
    assert wait_for(lambda: gone(daemon, box["id"]), timeout=5)
    assert not daemon.leaks()


def test_ttl_that_passed_while_the_daemon_was_down(daemon: Daemon) -> None:
    box = daemon.create(ttl_seconds=1)
    daemon.stop(signal.SIGKILL)
    time.sleep(1.2)
    daemon.start()
    assert wait_for(lambda: gone(daemon, box["id"]), timeout=5)
    assert not daemon.leaks()
