"""GET /sandboxes/{ref}/logs: the main command's output, kept by the daemon with a bound per
stream; read while it runs, after it ends and after a daemon restart; filtered and followed."""

from __future__ import annotations

import base64
import json
import threading
from datetime import datetime
from typing import Any

import pytest

from tests.conftest import Daemon, wait_for

MIB = 1 << 20
# Runs until /tmp/stop exists inside, then says so and ends.
UNTIL_STOPPED = "while [ ! -e /tmp/stop ]; do sleep 0.05; done; echo last"


def lines(daemon: Daemon, ref: str, **query: Any) -> list[dict[str, Any]]:
    response = daemon.client.get(f"/sandboxes/{ref}/logs", params=query)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("application/x-ndjson")
    return [json.loads(line) for line in response.text.splitlines()]


def text(found: list[dict[str, Any]], stream: str | None = None) -> str:
    return "".join(line["data"] for line in found if stream in (None, line["stream"]))


def stop(daemon: Daemon, box: dict[str, Any]) -> dict[str, Any]:
    daemon.sh(box["id"], "touch /tmp/stop")
    return daemon.await_state(f"/sandboxes/{box['id']}", "exited")


def test_logs_while_running_after_exit_and_by_stream(daemon: Daemon) -> None:
    script = f"echo one; echo oops >&2; printf 'bin\\377\\n'; {UNTIL_STOPPED}"
    box = daemon.create(cmd=["sh", "-c", script])
    assert wait_for(lambda: "oops" in text(lines(daemon, box["id"])))
    running = lines(daemon, box["id"])
    assert text(running, "stdout") == "one\nbin\ufffd\n" and text(running, "stderr") == "oops\n"
    assert all(datetime.fromisoformat(line["time"]).tzinfo for line in running)
    assert [line["data"] for line in running if line["stream"] == "stdout"] == [
        "one\n",
        "bin\ufffd\n",
    ]
    stop(daemon, box)
    ended = lines(daemon, box["id"])
    assert text(ended, "stdout") == "one\nbin\ufffd\nlast\n"
    assert lines(daemon, box["id"], stream="stderr") == [
        x for x in ended if x["stream"] == "stderr"
    ]
    raw = lines(daemon, box["id"], stream="stdout", encoding="base64")
    assert b"".join(base64.b64decode(x["data"]) for x in raw) == b"one\nbin\xff\nlast\n"
    daemon.client.delete(f"/sandboxes/{box['id']}")
    assert daemon.client.get(f"/sandboxes/{box['id']}/logs").status_code == 404


def test_tail_and_since(daemon: Daemon) -> None:
    box = daemon.create(cmd=["sh", "-c", f"echo a; echo b; echo c >&2; {UNTIL_STOPPED}"])
    assert wait_for(lambda: len(lines(daemon, box["id"])) == 3)
    first = lines(daemon, box["id"])
    daemon.sh(box["id"], "touch /tmp/stop")
    daemon.await_state(f"/sandboxes/{box['id']}", "exited")
    everything = lines(daemon, box["id"])
    assert [x["data"] for x in everything][-1] == "last\n" and len(everything) == 4
    assert lines(daemon, box["id"], tail=1) == everything[-1:]
    assert lines(daemon, box["id"], tail=2) == everything[-2:]
    assert lines(daemon, box["id"], tail=0) == []
    assert lines(daemon, box["id"], tail=5) == everything == lines(daemon, box["id"], tail=10**30)
    assert (
        lines(daemon, box["id"], tail=1, stream="stderr")
        == [first[-1]]
        == [x for x in everything if x["stream"] == "stderr"]
    )
    # Since the last line's time: it and nothing before it (the first lines were read earlier).
    since = everything[-1]["time"]
    assert lines(daemon, box["id"], since=since) == everything[-1:]
    assert lines(daemon, box["id"], since="2000-01-01T00:00:00Z") == everything
    assert lines(daemon, box["id"], since="2000-01-01T01:00:00.5+01:00") == everything
    assert lines(daemon, box["id"], since="2999-01-01T00:00:00Z") == []
    daemon.client.delete(f"/sandboxes/{box['id']}")


def test_follow_stays_open_until_the_command_ends(daemon: Daemon) -> None:
    box = daemon.create(cmd=["sh", "-c", f"echo started; {UNTIL_STOPPED}"])
    got: list[dict[str, Any]] = []
    with daemon.client.stream("GET", f"/sandboxes/{box['id']}/logs?follow=true") as response:
        assert response.status_code == 200
        stream = response.iter_lines()
        got.append(json.loads(next(stream)))
        assert got[0]["data"] == "started\n"
        # Told to end from another thread while this one waits on the open response.
        threading.Thread(target=daemon.sh, args=(box["id"], "touch /tmp/stop")).start()
        got.extend(json.loads(line) for line in stream if line)  # ends as the command does
    assert [x["data"] for x in got] == ["started\n", "last\n"]
    daemon.await_state(f"/sandboxes/{box['id']}", "exited")
    # Of an ended command, follow gives what there is and ends.
    assert lines(daemon, box["id"], follow="true") == got
    daemon.client.delete(f"/sandboxes/{box['id']}")


def test_logs_survive_a_daemon_restart(daemon: Daemon) -> None:
    running = daemon.create(cmd=["sh", "-c", f"echo before; {UNTIL_STOPPED}"])
    ended = daemon.create(cmd=["sh", "-c", "echo done; exit 3"])
    assert wait_for(lambda: lines(daemon, running["id"]) != [])
    daemon.await_state(f"/sandboxes/{ended['id']}", "exited")
    daemon.stop()
    daemon.start()
    assert text(lines(daemon, running["id"])) == "before\n"
    assert text(lines(daemon, ended["id"])) == "done\n"
    stop(daemon, running)  # the adopted supervisor still writes the log
    assert text(lines(daemon, running["id"])) == "before\nlast\n"
    for box in (running, ended):
        daemon.client.delete(f"/sandboxes/{box['id']}")


def test_a_big_output_keeps_only_the_last_log_limit_bytes(daemon: Daemon) -> None:
    count = 800_000  # about 5.5 MB of "1\n2\n...": past the default log_limit of 1 MiB
    box = daemon.create(cmd=["sh", "-c", f"seq 1 {count}; seq 1 10 >&2"])
    daemon.await_state(f"/sandboxes/{box['id']}", "exited", timeout=60)
    written = "".join(f"{i}\n" for i in range(1, count + 1)).encode()
    assert len(written) > 5 * MIB
    kept = lines(daemon, box["id"], stream="stdout", encoding="base64")
    data = b"".join(base64.b64decode(x["data"]) for x in kept)
    assert data == written[-MIB:]
    assert text(lines(daemon, box["id"], stream="stderr")) == "".join(
        f"{i}\n" for i in range(1, 11)
    )
    # On disk: two files a stream, each at most log_limit bytes of output and their headers.
    files = list((daemon.state_dir / "logs" / box["id"]).iterdir())
    assert sorted(p.name for p in files) == ["stderr", "stdout", "stdout.1"]
    assert sum(p.stat().st_size for p in files) < 2 * MIB + 64 * 1024
    daemon.client.delete(f"/sandboxes/{box['id']}")
    daemon.settled()  # its removal comes after the answer
    assert not (daemon.state_dir / "logs" / box["id"]).exists()


def test_a_sandbox_without_cmd_has_an_empty_log(daemon: Daemon) -> None:
    box = daemon.create()
    assert lines(daemon, box["id"]) == [] == lines(daemon, box["id"], follow="true")
    assert not (daemon.state_dir / "logs" / box["id"]).exists()
    daemon.client.delete(f"/sandboxes/{box['id']}")


def test_the_log_is_out_of_the_sandboxes_reach(daemon: Daemon) -> None:
    box = daemon.create(cmd=["sh", "-c", f"echo secret-marker; {UNTIL_STOPPED}"])
    assert wait_for(lambda: lines(daemon, box["id"]) != [])
    log_dir = daemon.state_dir / "logs" / box["id"]
    # Not at its host path inside, nor in any writable place of the sandbox.
    script = f"test -e {log_dir}/stdout; echo $?; grep -rl secret-marker /tmp /root /var /run /etc"
    found = daemon.sh(box["id"], script)
    assert found["stdout"] == "1\n"
    assert (log_dir.stat().st_mode & 0o777, log_dir.stat().st_uid) == (0o700, 0)
    stop(daemon, box)
    daemon.client.delete(f"/sandboxes/{box['id']}")


@pytest.mark.parametrize(
    "query",
    [
        "stream=stdin",
        "encoding=utf-16",
        "tail=-1",
        "tail=x",
        "since=yesterday",
        "since=1700000000",
        "since=2026-12-05T19:46:12",
        "since=2026-02-30T00:00:00Z",
        "follow=maybe",
    ],
)
def test_bad_queries_are_422(daemon: Daemon, query: str) -> None:
    box = daemon.create()
    response = daemon.client.get(f"/sandboxes/{box['id']}/logs?{query}")
    assert response.status_code == 422
    assert response.headers["content-type"].startswith("application/problem+json")
    daemon.client.delete(f"/sandboxes/{box['id']}")


def test_logs_of_an_unknown_sandbox_are_404(daemon: Daemon) -> None:
    response = daemon.client.get("/sandboxes/sb_0000000000000000/logs")
    assert response.status_code == 404
