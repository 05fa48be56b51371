"""A teardown cut short is finished by the next start: the daemon is killed (SIGKILL) and its
database and the host are left as a daemon that died at one step or another of the teardown
(daemon/lifecycle/teardown.py) would leave them; the next daemon leaves nothing behind.
"""

from __future__ import annotations

import os
import signal
import sqlite3
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import SYS_NET, Daemon, host_ifname, wait_for

pytestmark = pytest.mark.usefixtures("nothing_carries_over")


def stopped_with(daemon: Daemon, sandbox_id: str, sql: str, *params: Any) -> None:
    """Kill the daemon as a crash would, then write its database as it had left it."""
    daemon.stop(signal.SIGKILL)
    with sqlite3.connect(daemon.state_dir / "sandboxd.db") as db:
        db.execute(sql, (*params, sandbox_id))


def row(daemon: Daemon, sandbox_id: str) -> tuple[Any, ...] | None:
    with sqlite3.connect(daemon.state_dir / "sandboxd.db") as db:
        found = db.execute(
            "SELECT state, uid_slot, ip, pid FROM sandboxes WHERE id = ?", (sandbox_id,)
        ).fetchone()
    return None if found is None else tuple(found)


def gone(pid: int) -> bool:
    return wait_for(lambda: not Path(f"/proc/{pid}").exists())  # type: ignore[no-any-return]


def bridged(daemon: Daemon) -> dict[str, Any]:
    box = daemon.create(network={"mode": "bridge"})
    assert (SYS_NET / host_ifname(box["id"])).exists()
    return box


def test_a_delete_cut_short_after_the_kill_is_finished_at_start(daemon: Daemon) -> None:
    box = bridged(daemon)
    # Steps 1 (marked destroying) and 2 (killed) done, and part of 6 (its run directory gone).
    stopped_with(daemon, box["id"], "UPDATE sandboxes SET state = ? WHERE id = ?", "destroying")
    os.kill(box["pid"], signal.SIGKILL)
    assert gone(box["pid"])
    run_dir = daemon.run_dir / "sandboxes" / box["id"]
    for path in sorted(run_dir.rglob("*"), reverse=True):
        path.rmdir() if path.is_dir() else path.unlink()
    daemon.start()
    assert daemon.client.get(f"/sandboxes/{box['id']}").status_code == 404
    assert row(daemon, box["id"]) is None
    assert not daemon.leaks()


def test_an_expiry_cut_short_before_the_kill_is_finished_at_start(daemon: Daemon) -> None:
    box = bridged(daemon)
    # Step 1 only: the record says expiring, the sandbox still runs.
    stopped_with(
        daemon,
        box["id"],
        "UPDATE sandboxes SET state = 'expiring', exit_reason = 'ttl_expired', "
        "exit_signal = 'SIGKILL', finished_at = created_at, expires_at = created_at "
        "WHERE id = ?",
    )
    assert Path(f"/proc/{box['pid']}").exists()
    daemon.start()
    assert gone(box["pid"])
    assert daemon.client.get(f"/sandboxes/{box['id']}").status_code == 404
    assert not daemon.leaks()


def test_an_end_cut_short_before_its_leases_were_let_go_is_finished_at_start(
    daemon: Daemon,
) -> None:
    box = bridged(daemon)
    slot = row(daemon, box["id"])
    assert slot is not None and slot[1] is not None and slot[2] == box["network"]["ip"]
    # Steps 1 to 5: killed, unplugged, ended as exited; its files and leases still there.
    stopped_with(
        daemon,
        box["id"],
        "UPDATE sandboxes SET state = 'exited', exit_reason = 'signaled', "
        "exit_signal = 'SIGKILL', finished_at = created_at WHERE id = ?",
    )
    os.kill(box["pid"], signal.SIGKILL)
    assert gone(box["pid"])
    daemon.start()
    record = daemon.client.get(f"/sandboxes/{box['id']}").json()
    assert record["state"] == "exited" and record["network"]["ip"] is None
    assert row(daemon, box["id"]) == ("exited", None, None, None)
    assert not daemon.leaks()
    # Its address and uid range are free again: the next sandbox gets them.
    again = bridged(daemon)
    assert again["network"]["ip"] == box["network"]["ip"]
    assert row(daemon, again["id"])[1] == slot[1]  # type: ignore[index]
    daemon.client.delete(f"/sandboxes/{again['id']}")
