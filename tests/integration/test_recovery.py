"""A lost, emptied, damaged or foreign database never destroys live sandboxes: `serve` refuses,
and `sandboxd recover` adopts them again or removes them on purpose.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from daemon.linux.syscalls import process_start_time
from tests.conftest import ROOT, Daemon, Daemons, wait_for


@pytest.fixture
def daemon(daemons: Daemons) -> Iterator[Daemon]:
    """The module's first daemon, running, with none of its sandboxes left when a test ends."""
    first = daemons.started[0] if daemons.started else daemons.new()
    if first.proc is None:
        first.start()
    yield first
    if first.proc is None:  # a test that failed half-way: whatever is on disk goes
        if refused(first) is None:  # it starts: its database is sound
            first.stop()
        else:
            recover(first, "--remove")
        first.start()
    first.destroy_all()
    assert not first.leaks()


def database(daemon: Daemon) -> Path:
    return daemon.state_dir / "sandboxd.db"


def refused(daemon: Daemon) -> str | None:
    """Start the daemon; None if it serves, else what it said when it refused (and exited)."""
    logged = daemon.log.stat().st_size if daemon.log.exists() else 0
    try:
        daemon.start()
    except RuntimeError:
        daemon.proc = None  # it exited
        with open(daemon.log, "rb") as log:
            log.seek(logged)
            return log.read().decode(errors="replace")
    return None


def recover(daemon: Daemon, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "api", "recover", *args, "--config", str(daemon.config),
         "--state-dir", str(daemon.state_dir), "--run-dir", str(daemon.run_dir)],
        capture_output=True, text=True, timeout=120, cwd=ROOT,
    )  # fmt: skip


def alive(sandbox: dict[str, object]) -> bool:
    """Its supervisor runs, seen from the host: its pid, with the start time it had."""
    pid = sandbox["pid"]
    assert isinstance(pid, int)
    return process_start_time(pid) == sandbox["_start"]


def gone(sandbox: dict[str, object]) -> bool:
    return bool(wait_for(lambda: not alive(sandbox)))


def two_sandboxes(daemon: Daemon) -> list[dict[str, object]]:
    """One bridged (an address, a link on the bridge), one whose main cmd runs."""
    boxes = [
        daemon.create(name="plain", network={"mode": "bridge"}),
        daemon.create(name="sleeper", cmd=["sleep", "3600"]),
    ]
    for box in boxes:
        box["_start"] = process_start_time(int(box["pid"]))  # type: ignore[arg-type]
    return boxes


def test_an_emptied_database_is_refused_then_adopted(daemon: Daemon) -> None:
    boxes = two_sandboxes(daemon)
    before = daemon.sh("plain", "echo hello > /root/kept")
    assert before["exit_code"] == 0
    # Runs across the recovery: its end, reported to a daemon with no record of it, is dropped.
    across = daemon.sh("sleeper", "sleep 2; echo late; touch /tmp/ended", wait=False)
    listed_before = daemon.client.get("/sandboxes").json()["items"]
    daemon.stop(signal.SIGKILL)
    os.truncate(database(daemon), 0)

    said = refused(daemon)
    assert said is not None and "Traceback" not in said
    assert "refusing to start" in said and "sandboxd recover --adopt" in said
    assert all(box["id"] in said for box in boxes)
    assert all(alive(box) for box in boxes)  # the refusal killed nothing
    said_again = refused(daemon)  # and a second start is refused just the same
    assert said_again is not None and "refusing to start" in said_again

    result = recover(daemon, "--adopt")
    assert result.returncode == 0, result.stderr
    assert all(f"adopted {box['id']}" in result.stdout for box in boxes)
    assert "history of execs" in result.stdout
    assert list(daemon.state_dir.glob("sandboxd.db.damaged-*"))  # kept aside, not deleted

    daemon.start()
    listed = daemon.client.get("/sandboxes").json()["items"]
    assert [(s["id"], s["name"], s["state"]) for s in listed] == [
        (box["id"], box["name"], "running") for box in boxes
    ]
    assert listed == listed_before  # the same records: pid, cmd, address, times
    assert daemon.sh("plain", "cat /root/kept")["stdout"] == "hello\n"  # its layer survived
    assert daemon.client.get(f"/sandboxes/plain/execs/{before['id']}").status_code == 404
    daemon.sh("sleeper", "while [ ! -e /tmp/ended ]; do sleep 0.1; done", timeout_seconds=30)
    assert daemon.client.get(f"/sandboxes/sleeper/execs/{across['id']}").status_code == 404
    assert daemon.sh("sleeper", "echo still")["stdout"] == "still\n"
    for box in boxes:
        assert daemon.client.delete(f"/sandboxes/{box['id']}").status_code == 204
        assert gone(box)
    assert not daemon.leaks()


def test_a_deleted_database_is_refused(daemon: Daemon) -> None:
    boxes = two_sandboxes(daemon)
    daemon.stop(signal.SIGKILL)
    for suffix in ("", "-wal", "-shm"):
        Path(f"{database(daemon)}{suffix}").unlink(missing_ok=True)

    said = refused(daemon)
    assert said is not None and "is missing" in said
    assert all(alive(box) for box in boxes)
    result = recover(daemon, "--remove")
    assert result.returncode == 0, result.stderr
    assert all(f"removed {box['id']}" in result.stdout for box in boxes)
    assert all(gone(box) for box in boxes)

    daemon.start()
    assert daemon.client.get("/sandboxes").json()["items"] == []
    assert not daemon.leaks()


def test_migrate_refuses_an_untrusted_database_as_serve_does(daemon: Daemon) -> None:
    """`sandboxd migrate` on an emptied database with live sandboxes on disk would make a new
    database that the next start trusts: it refuses, and changes nothing."""
    boxes = two_sandboxes(daemon)
    daemon.stop(signal.SIGKILL)
    os.truncate(database(daemon), 0)
    migrated = subprocess.run(
        [sys.executable, "-m", "api", "migrate", "--config", str(daemon.config),
         "--state-dir", str(daemon.state_dir)],
        capture_output=True, text=True, timeout=120, cwd=ROOT,
    )  # fmt: skip
    assert migrated.returncode == 1, migrated.stderr
    assert "refusing to migrate" in migrated.stderr and "recover --adopt" in migrated.stderr
    assert "Traceback" not in migrated.stderr
    assert database(daemon).stat().st_size == 0  # not migrated over them
    assert all(alive(box) for box in boxes)
    said = refused(daemon)
    assert said is not None and "refusing to start" in said
    result = recover(daemon, "--remove")
    assert result.returncode == 0, result.stderr
    assert all(gone(box) for box in boxes)
    daemon.start()
    assert not daemon.leaks()


def test_a_damaged_database_is_refused_in_one_line(daemon: Daemon) -> None:
    boxes = two_sandboxes(daemon)
    daemon.stop()
    database(daemon).write_bytes(b"not a database, " * 512)

    said = refused(daemon)
    assert said is not None and "Traceback" not in said
    error = [line for line in said.splitlines() if "refusing to start" in line]
    assert len(error) == 1 and "file is not a database" in error[0]
    assert "error" in error[0].lower().split("refusing")[0]  # a log line at level error
    assert all(alive(box) for box in boxes)

    result = recover(daemon, "--adopt")
    assert result.returncode == 0, result.stderr
    kept = daemon.state_dir.glob("sandboxd.db.damaged-*")
    assert len([p for p in kept if p.read_bytes().startswith(b"not a database, ")]) == 1
    daemon.start()
    assert {s["id"] for s in daemon.client.get("/sandboxes").json()["items"]} == {
        box["id"] for box in boxes
    }
    assert daemon.sh("sleeper", "echo back")["stdout"] == "back\n"


def test_a_foreign_database_is_refused(daemons: Daemons, daemon: Daemon) -> None:
    other = daemons.started[1] if len(daemons.started) > 1 else daemons.new()
    if other.proc is None:
        other.start()
    other.create(name="elsewhere")
    other.destroy_all()
    other.stop()  # its database checkpointed, whole in one file
    boxes = two_sandboxes(daemon)
    daemon.stop()
    shutil.copy(database(other), database(daemon))

    said = refused(daemon)
    assert said is not None and "this state directory's is" in said
    assert all(alive(box) for box in boxes)
    result = recover(daemon, "--adopt")
    assert result.returncode == 0, result.stderr
    daemon.start()
    assert [s["id"] for s in daemon.client.get("/sandboxes").json()["items"]] == [
        box["id"] for box in boxes
    ]


def test_a_dead_sandbox_is_removed_by_adopt(daemon: Daemon) -> None:
    gone, kept = two_sandboxes(daemon)
    daemon.stop(signal.SIGKILL)
    os.truncate(database(daemon), 0)
    os.kill(int(gone["pid"]), signal.SIGKILL)  # type: ignore[call-overload]

    result = recover(daemon, "--adopt")
    assert result.returncode == 0, result.stderr
    assert f"removed {gone['id']}: its supervisor" in result.stdout
    assert f"adopted {kept['id']}" in result.stdout
    daemon.start()
    assert [s["id"] for s in daemon.client.get("/sandboxes").json()["items"]] == [kept["id"]]


def test_recover_refuses_a_sound_database_and_a_running_daemon(daemon: Daemon) -> None:
    box = daemon.create()
    running = recover(daemon, "--remove")
    assert running.returncode != 0 and "another sandboxd process" in running.stderr
    daemon.stop()
    sound = recover(daemon, "--remove")
    assert sound.returncode == 1 and "nothing to recover" in sound.stderr
    daemon.start()
    assert daemon.client.get(f"/sandboxes/{box['id']}").json()["state"] == "running"


def test_with_no_sandbox_on_disk_a_new_database_is_made(daemon: Daemon) -> None:
    daemon.stop()
    database(daemon).write_bytes(b"garbage " * 1024)
    daemon.start()  # no refusal: there is nothing to lose
    assert daemon.client.get("/sandboxes").json()["items"] == []
    assert daemon.create()["state"] == "running"
    assert list(daemon.state_dir.glob("sandboxd.db.damaged-*"))


def test_a_pooled_sandbox_is_adopted_back_into_the_pool(daemon: Daemon) -> None:
    def ready() -> int:
        return int(daemon.client.get("/info").json()["pool"]["ready"])

    daemon.stop()
    daemon.start("--pool-size", "1")
    asked = daemon.create(name="asked")
    assert wait_for(lambda: ready() == 1, timeout=30)
    daemon.stop(signal.SIGKILL)  # the pooled sandbox survives it, as an asked-for one does
    os.truncate(database(daemon), 0)
    assert refused(daemon) is not None

    result = recover(daemon, "--adopt")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    adopted = [line.split()[1].rstrip(":") for line in lines if line.startswith("adopted")]
    assert len(adopted) == 2 and asked["id"] in adopted
    pooled = next(sandbox_id for sandbox_id in adopted if sandbox_id != asked["id"])

    daemon.start("--pool-size", "1")
    assert [s["id"] for s in daemon.client.get("/sandboxes").json()["items"]] == [asked["id"]]
    assert ready() == 1
    taken = daemon.create(name="taken")
    assert taken["id"] == pooled  # served from the pool: the adopted sandbox
    assert daemon.sh("taken", "hostname")["stdout"] == "taken\n"
    daemon.destroy_all()
    daemon.stop()  # the pool's refill goes with it
    daemon.start()
