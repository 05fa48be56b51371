"""GET /events against the real daemon: every lifecycle path emits its event, seqs only grow
(across restarts, past deleted rows), a stream resumes with no gap and no duplicate, filters,
follow=false, and a reader too slow to keep up is dropped while the daemon goes on."""

from __future__ import annotations

import json
import os
import signal
import socket
import sqlite3
import threading
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from tests.conftest import Daemon, Daemons, wait_for

pytestmark = pytest.mark.usefixtures("nothing_carries_over")

MiB = 1 << 20
TOUCH_400_MIB = ["python3", "-c", "data = b'x' * (400 << 20)"]  # writes every page


class Follower:
    """A client following GET /events in a thread of its own; the events it got, parsed."""

    def __init__(self, daemon: Daemon, params: str = "", headers: dict[str, str] | None = None):
        self.events: list[dict[str, Any]] = []
        self.ids: list[int] = []
        self.ended = threading.Event()
        self.ready = threading.Event()
        self._client = httpx.Client(
            transport=httpx.HTTPTransport(uds=str(daemon.socket)),
            base_url="http://localhost",
            timeout=httpx.Timeout(60, read=None),
        )
        self._thread = threading.Thread(target=self._run, args=(params, headers or {}), daemon=True)
        self._thread.start()
        assert self.ready.wait(10), "the stream never started"

    def _run(self, params: str, headers: dict[str, str]) -> None:
        try:
            with self._client.stream("GET", f"/events{params}", headers=headers) as response:
                assert response.status_code == 200
                assert response.headers["content-type"].startswith("text/event-stream")
                self.ready.set()
                fields: dict[str, str] = {}
                for line in response.iter_lines():
                    if line == "":
                        if "data" in fields:
                            data = json.loads(fields["data"])
                            assert fields["event"] == data["type"]
                            assert int(fields["id"]) == data["seq"]
                            self.ids.append(data["seq"])
                            self.events.append(data)
                        fields = {}
                    elif not line.startswith(":"):
                        key, _, value = line.partition(":")
                        fields[key] = value.removeprefix(" ")
        except (httpx.HTTPError, OSError):
            pass
        finally:
            self.ready.set()
            self.ended.set()

    def of(self, sandbox_id: str) -> list[str]:
        return [e["type"] for e in self.events if e["sandbox_id"] == sandbox_id]

    def wait_for(self, sandbox_id: str, kind: str, timeout: float = 15) -> dict[str, Any]:
        found = wait_for(
            lambda: next(
                (e for e in self.events if e["sandbox_id"] == sandbox_id and e["type"] == kind),
                None,
            ),
            timeout,
        )
        assert found, f"no {kind} for {sandbox_id}: {self.of(sandbox_id)}"
        return found  # type: ignore[no-any-return]

    def close(self) -> None:
        self._client.close()
        self._thread.join(10)


@pytest.fixture
def follower(daemon: Daemon) -> Iterator[Follower]:
    live = Follower(daemon)
    yield live
    live.close()


def kept(daemon: Daemon, query: str = "") -> list[dict[str, Any]]:
    response = daemon.client.get(f"/events?follow=false{query}")
    assert response.status_code == 200, response.text
    return response.json()["items"]  # type: ignore[no-any-return]


def last_seq(daemon: Daemon) -> int:
    items = kept(daemon)
    return items[-1]["seq"] if items else 0


# -- every lifecycle path -----------------------------------------------------------------------


def test_a_sandbox_and_its_execs_tell_each_step(daemon: Daemon, follower: Follower) -> None:
    box = daemon.create(name="evented", labels={"team": "ci"})
    ok = daemon.exec(box["id"], ["true"])
    bad = daemon.sh(box["id"], "kill -TERM $$")
    assert daemon.client.delete(f"/sandboxes/{box['id']}").status_code == 204
    follower.wait_for(box["id"], "sandbox.destroyed")
    assert follower.of(box["id"]) == [
        "sandbox.created",
        "exec.started",
        "exec.exited",
        "exec.started",
        "exec.exited",
        "sandbox.destroyed",
    ]
    created = follower.wait_for(box["id"], "sandbox.created")
    assert (created["name"], created["labels"], created["state"]) == (
        "evented",
        {"team": "ci"},
        "running",
    )
    ended = [e for e in follower.events if e["type"] == "exec.exited"]
    assert [(e["exec_id"], e["exit_code"], e["signal"]) for e in ended] == [
        (ok["id"], 0, None),
        (bad["id"], None, "SIGTERM"),
    ]
    assert ended[0]["name"] == "evented" and ended[0]["labels"] == {"team": "ci"}
    assert ended[0]["duration_seconds"] >= 0
    # Each seq once, growing.
    assert follower.ids == sorted(set(follower.ids))


def test_a_main_cmd_that_ends_says_exited_with_its_exit(daemon: Daemon, follower: Follower) -> None:
    box = daemon.create(cmd=["sh", "-c", "exit 5"])
    exited = follower.wait_for(box["id"], "sandbox.exited")
    assert exited["exit"] == {"exit_code": 5, "signal": None, "reason": "exited", "message": None}
    assert exited["state"] == "exited"
    daemon.client.delete(f"/sandboxes/{box['id']}")


def test_a_lost_supervisor_says_failed(daemon: Daemon, follower: Follower) -> None:
    box = daemon.create()
    os.kill(box["pid"], signal.SIGKILL)
    failed = follower.wait_for(box["id"], "sandbox.failed")
    assert failed["exit"]["reason"] == "supervisor_lost"
    daemon.client.delete(f"/sandboxes/{box['id']}")


def test_a_ttl_that_runs_out_says_expired_then_destroyed(
    daemon: Daemon, follower: Follower
) -> None:
    box = daemon.create(ttl_seconds=1)
    follower.wait_for(box["id"], "sandbox.destroyed")
    assert follower.of(box["id"]) == ["sandbox.created", "sandbox.expired", "sandbox.destroyed"]
    expired = follower.wait_for(box["id"], "sandbox.expired")
    assert expired["exit"]["reason"] == "ttl_expired"


def test_oom_kills_in_an_exec_and_in_the_main_cmd_say_oom(
    daemon: Daemon, follower: Follower
) -> None:
    box = daemon.create(limits={"memory_bytes": 64 * MiB})
    killed = daemon.exec(box["id"], TOUCH_400_MIB)
    assert killed["oom_killed"] is True
    oom = follower.wait_for(box["id"], "sandbox.oom")
    assert (oom["exec_id"], oom["victim"]) == (killed["id"], "exec")
    exited = follower.wait_for(box["id"], "exec.exited")
    assert exited["oom_killed"] is True and exited["seq"] > oom["seq"]
    # A process in an exec's tree that the OOM killer ends while the exec lives on.
    survivor = daemon.sh(box["id"], f'python3 -c "{TOUCH_400_MIB[2]}"; echo $?')
    assert survivor["exit_code"] == 0 and survivor["stdout"] == "137\n", survivor
    wait_for(lambda: follower.of(box["id"]).count("sandbox.oom") == 2)
    second = [e for e in follower.events if e["type"] == "sandbox.oom"][-1]
    assert second["exec_id"] == survivor["id"]
    # The main cmd.
    main = daemon.create(cmd=TOUCH_400_MIB, limits={"memory_bytes": 64 * MiB})
    oom = follower.wait_for(main["id"], "sandbox.oom")
    assert (oom["exec_id"], oom["victim"]) == (None, "main")
    assert follower.wait_for(main["id"], "sandbox.exited")["exit"]["reason"] == "oom"
    # Nothing else said oom: a plain SIGKILL is not one.
    daemon.sh(box["id"], "kill -KILL $$")
    assert follower.of(box["id"]).count("sandbox.oom") == 2
    for sandbox in (box, main):
        daemon.client.delete(f"/sandboxes/{sandbox['id']}")


def test_an_oom_kill_is_told_once_also_when_the_main_cmd_ends_after_it(
    daemon: Daemon, follower: Follower
) -> None:
    # Where the count is the sandbox's (cgroup v1 memory), the main cmd's end must not tell
    # again what an exec told.
    waiting = ["sh", "-c", "while [ ! -e /tmp/done ]; do sleep 0.05; done"]
    box = daemon.create(cmd=waiting, limits={"memory_bytes": 64 * MiB})
    assert daemon.exec(box["id"], TOUCH_400_MIB)["oom_killed"] is True
    daemon.exec(box["id"], ["touch", "/tmp/done"])
    exited = follower.wait_for(box["id"], "sandbox.exited")
    assert exited["exit"]["reason"] == "exited"
    assert follower.of(box["id"]).count("sandbox.oom") == 1
    daemon.client.delete(f"/sandboxes/{box['id']}")


# -- seq, resume, filters, follow=false ---------------------------------------------------------


def test_seq_only_grows_across_restarts_even_past_deleted_rows(daemon: Daemon) -> None:
    box = daemon.create()
    daemon.client.delete(f"/sandboxes/{box['id']}")
    before = last_seq(daemon)
    assert before > 0
    # A stream open as the daemon stops ends; the daemon does not wait for its client.
    live = Follower(daemon)
    assert daemon.stop() == 0
    assert live.ended.wait(10)
    live.close()
    # The newest rows gone (as trimming would take them): a seq is still never used again.
    with sqlite3.connect(daemon.state_dir / "sandboxd.db") as db:
        db.execute("DELETE FROM events")
    daemon.start()
    again = daemon.create()
    daemon.client.delete(f"/sandboxes/{again['id']}")
    after = kept(daemon)
    assert [e["type"] for e in after] == ["sandbox.created", "sandbox.destroyed"]
    assert after[0]["seq"] == before + 1


def test_follow_false_lists_what_is_kept_after_since(daemon: Daemon) -> None:
    box = daemon.create()
    daemon.exec(box["id"], ["true"])
    everything = kept(daemon)
    seqs = [e["seq"] for e in everything]
    assert seqs == sorted(set(seqs))
    middle = seqs[len(seqs) // 2]
    assert kept(daemon, f"&since={middle}") == [e for e in everything if e["seq"] > middle]
    assert kept(daemon, f"&since={seqs[-1]}") == []
    daemon.client.delete(f"/sandboxes/{box['id']}")


def test_resume_replays_then_goes_live_with_no_gap_and_no_duplicate(daemon: Daemon) -> None:
    box = daemon.create()
    for _ in range(5):
        daemon.exec(box["id"], ["true"])
    resume_from = last_seq(daemon) - 6
    # Events keep coming while the streams replay and switch over to live ones.
    stop = threading.Event()

    def busy() -> None:
        while not stop.is_set():
            daemon.exec(box["id"], ["true"])

    worker = threading.Thread(target=busy)
    worker.start()
    try:
        by_header = Follower(daemon, headers={"Last-Event-ID": str(resume_from)})
        by_query = Follower(daemon, params=f"?since={resume_from}")
        # The header wins over the query (a browser reconnects with the URL it had).
        both = Follower(daemon, params="?since=0", headers={"Last-Event-ID": str(resume_from)})
        wait_for(lambda: len(by_header.ids) > 20 and len(by_query.ids) > 20)
    finally:
        stop.set()
        worker.join()
    final = daemon.exec(box["id"], ["true"])
    for follower in (by_header, by_query, both):
        wait_for(lambda f=follower: any(e["exec_id"] == final["id"] for e in f.events))
        last = follower.ids[-1]
        assert follower.ids == list(range(resume_from + 1, last + 1))
        follower.close()
    daemon.client.delete(f"/sandboxes/{box['id']}")


def test_filters_by_type_prefix_sandbox_and_label(daemon: Daemon) -> None:
    start = last_seq(daemon)
    one = daemon.create(name="filtered-one", labels={"team": "a", "tier": "x"})
    two = daemon.create(name="filtered-two", labels={"team": "b"})
    daemon.exec(one["id"], ["true"])
    daemon.exec(two["id"], ["true"])
    since = f"&since={start}"
    types = [e["type"] for e in kept(daemon, since + "&type=exec")]
    assert types == ["exec.started", "exec.exited"] * 2
    types = [e["type"] for e in kept(daemon, since + "&type=exec.exited&type=sandbox.created")]
    assert types == ["sandbox.created", "sandbox.created", "exec.exited", "exec.exited"]
    for ref in ("filtered-one", one["id"]):
        assert {e["sandbox_id"] for e in kept(daemon, since + f"&sandbox={ref}")} == {one["id"]}
    assert {e["sandbox_id"] for e in kept(daemon, since + "&label=team=b")} == {two["id"]}
    assert kept(daemon, since + "&label=team=a&label=tier=x") == kept(
        daemon, since + f"&sandbox={one['id']}"
    )
    assert kept(daemon, since + "&label=team=a&label=team=b") == []
    # The same filters on the live stream.
    live = Follower(daemon, params="?type=exec.exited&label=team=b")
    daemon.exec(one["id"], ["true"])
    last = daemon.exec(two["id"], ["true"])
    wait_for(lambda: any(e["exec_id"] == last["id"] for e in live.events))
    assert [(e["type"], e["sandbox_id"]) for e in live.events] == [("exec.exited", two["id"])]
    live.close()
    # A deleted sandbox is still found by its name in what is kept.
    daemon.client.delete(f"/sandboxes/{one['id']}")
    gone = kept(daemon, since + "&sandbox=filtered-one")
    assert gone[-1]["type"] == "sandbox.destroyed"
    daemon.client.delete(f"/sandboxes/{two['id']}")


@pytest.mark.parametrize(
    ("query", "headers"),
    [
        ("?since=-1", {}),
        ("?since=x", {}),
        ("?label=nolabel", {}),
        ("", {"Last-Event-ID": "abc"}),
        ("?follow=maybe", {}),
    ],
)
def test_bad_queries_answer_422(daemon: Daemon, query: str, headers: dict[str, str]) -> None:
    response = daemon.client.get(f"/events{query}", headers=headers)
    assert response.status_code == 422, response.text
    assert response.headers["content-type"] == "application/problem+json"


# -- a slow reader --------------------------------------------------------------------------------


def test_a_reader_that_never_reads_is_dropped_and_the_others_go_on(daemons: Daemons) -> None:
    daemon = daemons.new("--event-queue", "8")
    # A client with a small receive buffer that asks for the stream and never reads it.
    slow = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    slow.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    slow.connect(str(daemon.socket))
    slow.sendall(b"GET /events HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
    reader = Follower(daemon)
    wait_for(lambda: b"sandboxd_event_followers 2.0" in daemon.client.get("/metrics").content)
    box = daemon.create()
    # Each exec.started carries its cmd: 32 KiB a line fills the socket's buffers fast.
    padding = "x" * (32 << 10)
    execs = [daemon.exec(box["id"], ["true", padding]) for _ in range(40)]
    last = execs[-1]["id"]
    wait_for(lambda: any(e["exec_id"] == last for e in reader.events if e["type"] == "exec.exited"))
    # The daemon dropped the slow one and nobody else.
    metrics = daemon.client.get("/metrics").text
    assert "sandboxd_event_followers_dropped_total 1.0" in metrics
    assert "sandboxd_event_followers 1.0" in metrics
    assert not reader.ended.is_set()
    assert len([e for e in reader.events if e["type"] == "exec.exited"]) == 40
    # What the slow one gets when it reads at last: a part of the events, then the end.
    slow.settimeout(30)
    received = b""
    while chunk := slow.recv(1 << 16):
        received += chunk
    slow.close()
    assert received.startswith(b"HTTP/1.1 200")
    assert b"event: exec.started" in received
    assert last.encode() not in received
    assert daemon.client.get("/healthz").status_code == 200
    reader.close()
    daemon.client.delete(f"/sandboxes/{box['id']}")
    daemon.stop()
