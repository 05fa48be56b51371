"""Exec output as bytes: `encoding: base64` both ways and in every stream message, and the raw
…/stdout and …/stderr endpoints, against a real daemon and sandbox."""

from __future__ import annotations

import base64
import json
from typing import Any

import pytest
from websockets.sync.client import unix_connect

from tests.conftest import Daemon, wait_for

ALL_BYTES = bytes(range(256))
NOT_UTF8 = b"\xff\xfe\xc3(\x80 half \xe2\x82"
NDJSON = {"Accept": "application/x-ndjson"}


@pytest.fixture(scope="module")
def box(daemon: Daemon) -> dict[str, Any]:
    return daemon.create(name="bytes")


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def test_binary_stdin_comes_back_exactly_in_base64(daemon: Daemon, box: dict[str, Any]) -> None:
    sent = ALL_BYTES * 3 + NOT_UTF8
    result = daemon.exec(
        box["id"], ["sh", "-c", "cat; cat >&2 <<'E'\nE\nprintf '\\377\\000' >&2"],
        stdin=b64(sent), encoding="base64",
    )  # fmt: skip
    assert result["encoding"] == "base64" and result["exit_code"] == 0
    assert base64.b64decode(result["stdout"], validate=True) == sent
    assert base64.b64decode(result["stderr"], validate=True) == b"\xff\x00"
    # As stored: the same from GET, and from the raw endpoints, whatever the encoding.
    path = f"/sandboxes/{box['id']}/execs/{result['id']}"
    assert daemon.client.get(path).json()["stdout"] == result["stdout"]
    raw = daemon.client.get(f"{path}/stdout")
    assert raw.status_code == 200
    assert raw.headers["content-type"] == "application/octet-stream"
    assert raw.content == sent
    assert daemon.client.get(f"{path}/stderr").content == b"\xff\x00"


def test_utf8_execs_replace_but_the_raw_bytes_are_exact(
    daemon: Daemon, box: dict[str, Any]
) -> None:
    result = daemon.sh(box["id"], "cat", stdin="ignored")  # text stdin: as before
    assert (result["stdout"], result["encoding"]) == ("ignored", "utf-8")
    made = daemon.exec(
        box["id"], ["sh", "-c", "cat > /tmp/all && cat /tmp/all"], stdin=b64(ALL_BYTES),
        encoding="base64",
    )  # fmt: skip
    assert base64.b64decode(made["stdout"]) == ALL_BYTES
    text = daemon.sh(box["id"], "cat /tmp/all")
    assert text["encoding"] == "utf-8" and "\ufffd" in text["stdout"]
    raw = daemon.client.get(f"/sandboxes/{box['id']}/execs/{text['id']}/stdout")
    assert raw.content == ALL_BYTES


def test_the_output_limit_counts_raw_bytes(daemon: Daemon, box: dict[str, Any]) -> None:
    # 2 MiB of 0xff: as text each byte would be 3 bytes of U+FFFD; the limit is of raw bytes.
    result = daemon.sh(box["id"], "head -c 2097152 /dev/zero | tr '\\0' '\\377'", encoding="base64")
    kept = base64.b64decode(result["stdout"])
    assert result["stdout_truncated"] is True and kept == b"\xff" * (1 << 20)
    raw = daemon.client.get(f"/sandboxes/{box['id']}/execs/{result['id']}/stdout")
    assert raw.content == kept


def test_stream_messages_carry_base64(daemon: Daemon, box: dict[str, Any]) -> None:
    body = {
        "cmd": ["sh", "-c", "printf '\\377\\376'; sleep 0.2; printf '\\000\\200' >&2; cat"],
        "stdin": b64(NOT_UTF8),
        "encoding": "base64",
    }
    got: dict[str, bytes] = {"stdout": b"", "stderr": b""}
    with daemon.client.stream(
        "POST", f"/sandboxes/{box['id']}/exec", json=body, headers=NDJSON
    ) as response:
        assert response.status_code == 200
        lines = [json.loads(line) for line in response.iter_lines() if line]
    for line in lines[:-1]:
        got[line["stream"]] += base64.b64decode(line["data"], validate=True)
    assert got == {"stdout": b"\xff\xfe" + NOT_UTF8, "stderr": b"\x00\x80"}
    last = lines[-1]["exit"]
    assert last["encoding"] == "base64"
    assert base64.b64decode(last["stdout"]) == b"\xff\xfe" + NOT_UTF8
    # Followed later: the same bytes, the same way.
    with daemon.client.stream(
        "GET", f"/sandboxes/{box['id']}/execs/{last['id']}/output"
    ) as response:
        later = [json.loads(line) for line in response.iter_lines() if line]
    again = b"".join(base64.b64decode(m["data"]) for m in later[:-1] if m["stream"] == "stdout")
    assert again == b"\xff\xfe" + NOT_UTF8


def test_a_websocket_gets_base64_output(daemon: Daemon, box: dict[str, Any]) -> None:
    started = daemon.exec(
        box["id"], ["sh", "-c", "read x; printf '\\377%s' \"$x\""], wait=False,
        interactive=True, encoding="base64",
    )  # fmt: skip
    uri = f"ws://localhost/sandboxes/{box['id']}/execs/{started['id']}/attach"
    received = b""
    with unix_connect(str(daemon.socket), uri, open_timeout=10) as ws:
        ws.send(b"hi\n")
        events = [json.loads(message) for message in ws]
    for event in events[:-1]:
        received += base64.b64decode(event["data"], validate=True)
    assert received == b"\xffhi"
    assert base64.b64decode(events[-1]["exit"]["stdout"]) == b"\xffhi"


def test_a_running_execs_raw_output_is_what_it_wrote_so_far(
    daemon: Daemon, box: dict[str, Any]
) -> None:
    started = daemon.exec(box["id"], ["sh", "-c", "printf '\\001\\377'; sleep 30"], wait=False)
    path = f"/sandboxes/{box['id']}/execs/{started['id']}"
    assert wait_for(lambda: daemon.client.get(f"{path}/stdout").content == b"\x01\xff")
    daemon.client.post(f"{path}/signal", json={"signal": "SIGKILL"})
    daemon.await_state(path, "exited")


@pytest.mark.parametrize(
    "body",
    [
        {"stdin": "not base64!", "encoding": "base64"},
        {"stdin": "QUJD=", "encoding": "base64"},
        {"encoding": "latin-1"},
    ],
)
def test_bad_encoding_input_is_422_and_runs_nothing(
    daemon: Daemon, box: dict[str, Any], body: dict[str, Any]
) -> None:
    before = len(daemon.client.get(f"/sandboxes/{box['id']}/execs").json()["items"])
    response = daemon.client.post(f"/sandboxes/{box['id']}/exec", json={"cmd": ["true"], **body})
    assert response.status_code == 422, response.text
    assert response.headers["content-type"].startswith("application/problem+json")
    assert len(daemon.client.get(f"/sandboxes/{box['id']}/execs").json()["items"]) == before


def test_raw_output_of_unknown_execs_is_404(daemon: Daemon, box: dict[str, Any]) -> None:
    for path in (
        f"/sandboxes/{box['id']}/execs/ex_0000000000000000/stdout",
        f"/sandboxes/{box['id']}/execs/ex_0000000000000000/stderr",
        "/sandboxes/nosuch/execs/ex_0000000000000000/stdout",
    ):
        response = daemon.client.get(path)
        assert response.status_code == 404
        assert response.headers["content-type"].startswith("application/problem+json")


def test_raw_output_survives_a_daemon_restart(daemon: Daemon) -> None:
    box = daemon.create()
    result = daemon.exec(box["id"], ["cat"], stdin=b64(ALL_BYTES), encoding="base64")
    daemon.stop()
    daemon.start()
    path = f"/sandboxes/{box['id']}/execs/{result['id']}"
    assert daemon.client.get(f"{path}/stdout").content == ALL_BYTES
    assert base64.b64decode(daemon.client.get(path).json()["stdout"]) == ALL_BYTES
    daemon.client.delete(f"/sandboxes/{box['id']}")
