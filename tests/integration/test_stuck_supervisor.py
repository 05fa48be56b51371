"""A stopped supervisor (SIGSTOP on a sandbox's PID 1) never hangs the API: what the daemon
awaits from it has a deadline (a 504 past it), what it sends it is bounded, and DELETE and the
ttl still end the sandbox. After SIGCONT the sandbox works again.

A hang shows as httpx's timeout (ANSWER_BOUND) failing the test, never as a timed assertion.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest

from daemon.linux.cgroups import find_cgroup2
from tests.conftest import Daemon, Daemons, wait_for

SUPERVISOR_TIMEOUT = 1  # --supervisor-timeout of this module's daemon
ANSWER_BOUND = 20.0  # seconds: an answer slower than this is a hang
UNRESPONSIVE = "https://sandboxd.dev/problems/supervisor-unresponsive"
MAX_BODY = 8 << 20


@pytest.fixture(scope="module")
def quick(daemons: Daemons) -> Daemon:
    # glibc's malloc returns every block of 1 MiB or more to the kernel once freed, so the
    # daemon's RSS tracks what it holds rather than the peak of its requests' copies.
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MALLOC_MMAP_THRESHOLD_", str(1 << 20))
        return daemons.new(
            "--supervisor-timeout", str(SUPERVISOR_TIMEOUT), "--max-body", str(MAX_BODY)
        )


@pytest.fixture
def box(quick: Daemon) -> Iterator[dict[str, Any]]:
    """A sandbox of its own for each test, deleted after it (if the test did not)."""
    sandbox = quick.create()
    yield sandbox
    quick.client.delete(f"/sandboxes/{sandbox['id']}", timeout=ANSWER_BOUND)


@contextlib.contextmanager
def stopped(sandbox: dict[str, Any]) -> Iterator[int]:
    """The sandbox's supervisor stopped (SIGSTOP) inside the block, continued after it,
    whatever happened: through a pidfd, so a pid reused meanwhile is never signalled."""
    pidfd = os.pidfd_open(sandbox["pid"])
    try:
        signal.pidfd_send_signal(pidfd, signal.SIGSTOP)
        assert wait_for(lambda: process_state(sandbox["pid"]) == "T"), "it did not stop"
        yield pidfd
    finally:
        with contextlib.suppress(ProcessLookupError):
            signal.pidfd_send_signal(pidfd, signal.SIGCONT)
        os.close(pidfd)


def process_state(pid: int) -> str | None:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return None


def dead(pid: int) -> bool:
    """Gone, or a zombie its parent (the zygote) has yet to reap."""
    return process_state(pid) in (None, "Z")


def post_exec(daemon: Daemon, box: dict[str, Any], **body: Any) -> httpx.Response:
    body.setdefault("cmd", ["sleep", "60"])
    return daemon.client.post(f"/sandboxes/{box['id']}/exec", json=body, timeout=ANSWER_BOUND)


def assert_unresponsive(response: httpx.Response) -> None:
    assert response.status_code == 504, response.text
    assert response.headers["content-type"].startswith("application/problem+json")
    problem = response.json()
    assert problem["type"] == UNRESPONSIVE and problem["status"] == 504
    assert "supervisor" in problem["detail"]


def execs(daemon: Daemon, box: dict[str, Any]) -> list[dict[str, Any]]:
    items: list[dict[str, Any]] = daemon.client.get(f"/sandboxes/{box['id']}/execs").json()["items"]
    return items


def assert_abandoned(record: dict[str, Any]) -> None:
    """How an exec its supervisor did not answer for is recorded."""
    assert record["state"] == "exited", record
    assert (record["exit_code"], record["signal"]) == (255, None), record
    assert record["stderr"].startswith("sandboxd: the supervisor did not"), record
    assert record["finished_at"] is not None


def sleeps(daemon: Daemon, box: dict[str, Any]) -> list[str]:
    ps = daemon.exec(box["id"], ["ps", "-e", "-o", "comm="])["stdout"]
    return [line for line in ps.split() if line == "sleep"]


def works(daemon: Daemon, box: dict[str, Any]) -> None:
    """A later exec runs, and nothing of the abandoned ones is left running."""
    result = daemon.exec(box["id"], ["echo", "back"])
    assert (result["exit_code"], result["stdout"]) == (0, "back\n"), result
    assert wait_for(lambda: not sleeps(daemon, box)), sleeps(daemon, box)


@pytest.mark.parametrize(
    "body",
    [{"wait": True}, {"wait": False}, {"timeout_seconds": 30}, {"wait": False, "tty": True}],
    ids=["wait", "no-wait", "timeout-seconds", "tty"],
)
def test_an_exec_answers_504_while_the_supervisor_is_stopped(
    quick: Daemon, box: dict[str, Any], body: dict[str, Any]
) -> None:
    with stopped(box):
        assert_unresponsive(post_exec(quick, box, **body))
        (record,) = execs(quick, box)
        assert_abandoned(record)
        assert f"within {SUPERVISOR_TIMEOUT} s" in record["stderr"]
        assert quick.client.get(f"/sandboxes/{box['id']}").json()["state"] == "running"
    works(quick, box)
    # The supervisor ran the exec once it read again, and killed it: its record stays.
    assert wait_for(lambda: len(os.listdir(mailbox(quick, box))) == 0)
    assert_abandoned(quick.client.get(f"/sandboxes/{box['id']}/execs/{record['id']}").json())


def mailbox(daemon: Daemon, box: dict[str, Any]) -> Path:
    """Execs the supervisor has and the daemon has not stored yet (main would be one)."""
    return daemon.run_dir / "sandboxes" / box["id"] / "execs"


def test_following_output_ends_while_the_supervisor_is_stopped(
    quick: Daemon, box: dict[str, Any]
) -> None:
    """No live output without the supervisor: the stream gives what the files hold, and ends
    without an exit line (the exec still runs)."""
    started = quick.sh(box["id"], "echo hi; exec sleep 60", wait=False)
    url = f"/sandboxes/{box['id']}/execs/{started['id']}"
    assert wait_for(lambda: (mailbox(quick, box) / started["id"] / "stdout").read_text())
    with stopped(box):
        response = quick.client.get(f"{url}/output?follow=true", timeout=ANSWER_BOUND)
        assert response.status_code == 200
        lines = [json.loads(line) for line in response.text.splitlines()]
        assert lines == [{"stream": "stdout", "data": "hi\n"}]
        assert quick.client.get(url).json()["state"] == "running"
    signalled = quick.client.post(f"{url}/signal", json={"signal": "SIGTERM"})
    assert signalled.status_code == 202
    assert quick.await_state(url, "exited")["signal"] == "SIGTERM"


def test_an_exec_that_runs_long_is_no_supervisor_timeout(
    quick: Daemon, box: dict[str, Any]
) -> None:
    seconds = SUPERVISOR_TIMEOUT * 2.5
    result = post_exec(quick, box, cmd=["sleep", str(seconds)])
    assert result.status_code == 200 and result.json()["exit_code"] == 0, result.text
    deadline = post_exec(quick, box, cmd=["sleep", str(seconds)], timeout_seconds=seconds * 4)
    assert deadline.status_code == 200 and deadline.json()["exit_code"] == 0, deadline.text


def test_a_waited_exec_past_its_deadline_answers_504_and_is_killed(
    quick: Daemon, box: dict[str, Any]
) -> None:
    """Stopped after the exec started: its end is owed once its deadline passed."""
    answer: list[httpx.Response] = []
    waiter = threading.Thread(
        target=lambda: answer.append(post_exec(quick, box, cmd=["sleep", "60"], timeout_seconds=2))
    )
    waiter.start()
    try:
        assert wait_for(lambda: [e for e in execs(quick, box) if e["state"] == "running"])
        (running,) = execs(quick, box)
        cgroup2 = find_cgroup2()
        assert cgroup2 is not None
        leaf = cgroup2 / quick.cgroup_name / box["id"] / running["id"]
        assert wait_for(lambda: procs(leaf))
        with stopped(box):
            waiter.join(ANSWER_BOUND)
            assert not waiter.is_alive()
            assert_unresponsive(answer[0])
            assert_abandoned(execs(quick, box)[0])
            # The stopped supervisor could not enforce the deadline: the daemon did.
            assert wait_for(lambda: procs(leaf) == []), procs(leaf)
    finally:
        waiter.join(ANSWER_BOUND)
    works(quick, box)


def procs(cgroup: Path) -> list[str]:
    """The processes in a cgroup (none if it is not there, or not yet)."""
    try:
        return (cgroup / "cgroup.procs").read_text().split()
    except FileNotFoundError:
        return []


def test_delete_works_while_the_supervisor_is_stopped(quick: Daemon, box: dict[str, Any]) -> None:
    """With a waited-for exec hanging on it, and one waiting for its start."""
    answers: list[httpx.Response] = []
    bodies = [{"cmd": ["sleep", "60"]}, {"cmd": ["true"]}]
    waiters = [
        threading.Thread(target=lambda body=body: answers.append(post_exec(quick, box, **body)))
        for body in bodies
    ]
    waiters[0].start()
    assert wait_for(lambda: execs(quick, box))
    with stopped(box):
        waiters[1].start()
        assert wait_for(lambda: len(execs(quick, box)) == 2)
        deleted = quick.client.delete(f"/sandboxes/{box['id']}", timeout=ANSWER_BOUND)
        assert deleted.status_code == 204, deleted.text
        for waiter in waiters:
            waiter.join(ANSWER_BOUND)
            assert not waiter.is_alive()
    assert all(a.status_code in (200, 404, 409, 504) for a in answers), [a.text for a in answers]
    assert quick.client.get(f"/sandboxes/{box['id']}").status_code == 404
    assert wait_for(lambda: dead(box["pid"]))
    assert wait_for(lambda: not quick.leaks()), quick.leaks()


def test_the_ttl_ends_a_sandbox_whose_supervisor_is_stopped(quick: Daemon) -> None:
    sandbox = quick.create(ttl_seconds=2)
    with stopped(sandbox):
        gone = wait_for(
            lambda: quick.client.get(f"/sandboxes/{sandbox['id']}").status_code == 404, 30
        )
        assert gone, quick.client.get(f"/sandboxes/{sandbox['id']}").text
    assert wait_for(lambda: dead(sandbox["pid"]))
    assert wait_for(lambda: not quick.leaks()), quick.leaks()


def rss(pid: int) -> int:
    """Resident memory of a process, in bytes."""
    status = Path(f"/proc/{pid}/status").read_text()
    return int(status.split("VmRSS:")[1].split()[0]) * 1024


def test_a_stdin_flood_into_a_stopped_supervisor_is_bounded(
    quick: Daemon, box: dict[str, Any]
) -> None:
    """Execs of 4 MiB stdin each, 8 at a time, at a supervisor that reads none of it: the
    daemon holds a few MiB for it and refuses the rest. Its memory is measured past the first
    16, which size its heap for requests this large: then 192 MiB more are sent."""
    assert quick.proc is not None
    data = "x" * (4 << 20)

    def flood(count: int) -> None:
        with ThreadPoolExecutor(8) as pool:
            body = {"cmd": ["cat"], "stdin": data, "wait": False}
            for answer in pool.map(lambda _: post_exec(quick, box, **body), range(count)):
                assert_unresponsive(answer)

    with stopped(box):
        flood(16)
        before = rss(quick.proc.pid)
        flood(48)
        grown = rss(quick.proc.pid) - before
        assert grown < 64 << 20, f"the daemon grew by {grown >> 20} MiB"
        records = execs(quick, box)
        assert len(records) == 64
        for record in records:
            assert_abandoned(record)
        unread = [r for r in records if "did not read what was sent" in r["stderr"]]
        assert len(unread) >= 56, [r["stderr"] for r in records]
    works(quick, box)
