"""The native PID 1 in a real sandbox: it is the static binary, not a fork of Python, and its
sandbox, its main command ended, is gone with every process in it."""

from __future__ import annotations

import os
from pathlib import Path

from daemon.sandbox import native
from tests.conftest import Daemon, cgroup_dirs, wait_for


def pid1_of(daemon: Daemon, sandbox_id: str) -> int:
    """The host pid of the sandbox's PID 1: the one process of its cgroup's init leaf."""
    for tree in cgroup_dirs(daemon.cgroup_name):
        procs = tree / sandbox_id / "init" / "cgroup.procs"
        if procs.exists():
            pids = procs.read_text().split()
            assert len(pids) == 1, pids
            return int(pids[0])
    raise AssertionError(f"no init leaf for {sandbox_id}")


def test_pid1_is_the_native_binary(daemon: Daemon) -> None:
    box = daemon.create()
    pid = pid1_of(daemon, box["id"])
    assert os.readlink(f"/proc/{pid}/exe") == str(native.BINARY)
    assert Path(f"/proc/{pid}/comm").read_text() == "sandboxd-sup\n"
    nspid = next(
        line
        for line in Path(f"/proc/{pid}/status").read_text().splitlines()
        if line.startswith("NSpid:")
    )
    assert nspid.split()[-1] == "1"  # PID 1 inside
    daemon.client.delete(f"/sandboxes/{box['id']}").raise_for_status()


def test_a_main_command_that_ends_ends_the_sandbox(daemon: Daemon) -> None:
    box = daemon.create(cmd=["sh", "-c", "sleep 100 & sleep 100 & echo bye; exit 3"])
    done = daemon.await_state(f"/sandboxes/{box['id']}", "exited")
    assert done["exit"]["exit_code"] == 3, done
    assert wait_for(
        lambda: not any((t / box["id"]).exists() for t in cgroup_dirs(daemon.cgroup_name))
    )
    daemon.client.delete(f"/sandboxes/{box['id']}")
