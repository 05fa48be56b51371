"""Exec output: bounded, never blocking the process, streamed live as NDJSON, followed later."""

from __future__ import annotations

import base64
import json
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import Daemon

MIB = 1 << 20
NDJSON = {"Accept": "application/x-ndjson"}


@pytest.fixture(scope="module")
def box(daemon: Daemon) -> dict[str, Any]:
    return daemon.create(name="output")


def rss(pid: int, field: str) -> int:
    """A memory figure of /proc/PID/status, in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise AssertionError(field)


def test_output_past_the_limit_is_truncated_not_blocking(
    daemon: Daemon, box: dict[str, Any]
) -> None:
    script = "head -c 3000000 /dev/zero | tr '\\0' x; echo done >&2; exit 0"
    result = daemon.sh(box["id"], script)
    assert result["exit_code"] == 0 and result["signal"] is None
    assert result["stdout_truncated"] is True and len(result["stdout"]) == MIB
    assert set(result["stdout"]) == {"x"}
    assert (result["stderr"], result["stderr_truncated"]) == ("done\n", False)


def test_a_gibibyte_of_output_leaves_the_daemon_small(daemon: Daemon, box: dict[str, Any]) -> None:
    assert daemon.proc is not None
    before = rss(daemon.proc.pid, "VmRSS")
    result = daemon.sh(box["id"], "head -c 1073741824 /dev/zero; echo end >&2")
    assert result["exit_code"] == 0 and result["stdout_truncated"] is True
    assert result["stderr"] == "end\n"
    grown = rss(daemon.proc.pid, "VmHWM") - before
    assert grown < 64 * MIB, f"the daemon grew by {grown / MIB:.1f} MiB"


def test_ndjson_streams_output_as_it_comes(daemon: Daemon, box: dict[str, Any]) -> None:
    body = {"cmd": ["sh", "-c", "echo first; sleep 1; echo second >&2; exit 3"]}
    arrivals: list[tuple[float, dict[str, Any]]] = []
    began = time.monotonic()
    with daemon.client.stream(
        "POST", f"/sandboxes/{box['id']}/exec", json=body, headers=NDJSON
    ) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("application/x-ndjson")
        for line in response.iter_lines():
            arrivals.append((time.monotonic() - began, json.loads(line)))
    events = [event for _, event in arrivals]
    assert events[0] == {"stream": "stdout", "data": "first\n"}
    assert {"stream": "stderr", "data": "second\n"} in events
    assert events[-1]["exit"]["exit_code"] == 3 and events[-1]["exit"]["stdout"] == "first\n"
    first_at, exit_at = arrivals[0][0], arrivals[-1][0]
    assert exit_at - first_at > 0.7, arrivals  # the first line came well before the end


def test_follow_a_background_exec_from_its_start(daemon: Daemon, box: dict[str, Any]) -> None:
    script = "for i in 1 2 3; do echo line $i; sleep 0.3; done; echo bad >&2; exit 1"
    started = daemon.sh(box["id"], script, wait=False)
    time.sleep(0.4)  # some output has been written before anyone follows
    url = f"/sandboxes/{box['id']}/execs/{started['id']}/output"

    so_far = [json.loads(line) for line in daemon.client.get(url).text.splitlines()]
    assert so_far and all("exit" not in e for e in so_far)
    assert "".join(e["data"] for e in so_far).startswith("line 1\n")

    with daemon.client.stream("GET", url, params={"follow": "true"}) as response:
        events = [json.loads(line) for line in response.iter_lines()]
    stdout = "".join(e["data"] for e in events if e.get("stream") == "stdout")
    assert stdout == "line 1\nline 2\nline 3\n"
    assert {"stream": "stderr", "data": "bad\n"} in events
    assert events[-1]["exit"]["exit_code"] == 1

    after = [json.loads(line) for line in daemon.client.get(url).text.splitlines()]
    assert after[-1]["exit"]["id"] == started["id"]
    assert "".join(e.get("data", "") for e in after if e.get("stream") == "stdout") == stdout


def test_output_of_an_unknown_exec_is_404(daemon: Daemon, box: dict[str, Any]) -> None:
    response = daemon.client.get(f"/sandboxes/{box['id']}/execs/ex_nope/output")
    assert response.status_code == 404
    assert response.headers["content-type"].startswith("application/problem+json")


def test_streamed_output_beyond_the_limit_is_live_but_the_record_bounded(
    daemon: Daemon, box: dict[str, Any]
) -> None:
    body = {"cmd": ["sh", "-c", "head -c 3000000 /dev/zero | tr '\\0' y"]}
    received = 0
    with daemon.client.stream(
        "POST", f"/sandboxes/{box['id']}/exec", json=body, headers=NDJSON
    ) as response:
        for line in response.iter_lines():
            event = json.loads(line)
            received += len(event.get("data", ""))
            final = event
    assert final["exit"]["stdout_truncated"] is True and len(final["exit"]["stdout"]) == MIB
    assert MIB <= received <= 3_000_000


def joined(events: list[dict[str, Any]], stream: str, encoding: str) -> bytes:
    """The bytes of one stream as the lines carried them, in their order."""
    pieces = [e["data"] for e in events if e.get("stream") == stream]
    if encoding == "base64":
        return b"".join(base64.b64decode(p) for p in pieces)
    return "".join(pieces).encode()


@pytest.mark.parametrize("encoding", ["utf-8", "base64"])
def test_a_streamed_exec_that_ends_at_once_loses_no_output(
    daemon: Daemon, box: dict[str, Any], encoding: str
) -> None:
    # Its subscription is answered just before it ends, and its end may be handled before
    # the follower reads the bytes up to the subscription's offsets: they must still come.
    # Eight at a time, so that the daemon's loop has other work between the two.
    body = {"cmd": ["sh", "-c", "echo out; echo err >&2"], "encoding": encoding}

    def streamed(_: int) -> list[dict[str, Any]]:
        with daemon.client.stream(
            "POST", f"/sandboxes/{box['id']}/exec", json=body, headers=NDJSON
        ) as response:
            assert response.status_code == 200
            return [json.loads(line) for line in response.iter_lines()]

    with ThreadPoolExecutor(8) as pool:
        runs = list(pool.map(streamed, range(100)))
    for events in runs:
        assert "exit" in events[-1], events
        assert events[-1]["exit"]["encoding"] == encoding
        assert joined(events, "stdout", encoding) == b"out\n", events
        assert joined(events, "stderr", encoding) == b"err\n", events
