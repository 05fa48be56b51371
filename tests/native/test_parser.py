"""The native PID 1's message parser, run as `sandboxd-init --parse-only` (one line of stdin
decoded at a time): the daemon's own messages decode; what daemon/protocol.py refuses, it
refuses too; and thousands of random and mutated lines crash neither the static binary nor
one built with AddressSanitizer and UndefinedBehaviorSanitizer."""

from __future__ import annotations

import base64
import json
import random
import subprocess
from pathlib import Path

import pytest

from daemon import protocol
from daemon.protocol import (
    Configure,
    ExecRequest,
    Input,
    Message,
    ProtocolError,
    Resize,
    SendSignal,
    Subscribe,
    Unsubscribe,
)
from daemon.sandbox import native

SEEDS: list[Message] = [
    ExecRequest("e1", ["sh", "-c", "echo hé ☃"], {"A": "1", "PATH": "/bin"}, "/tmp", 0, None),
    ExecRequest("e-2", ["cat"], {}, "/", 1000, 100, "input\n", 2.5, True, True, 40, 120),
    SendSignal("e1", 15),
    Subscribe("e1"),
    Unsubscribe("e1"),
    Input("e1", base64.b64encode(b"\x00\xff binary").decode(), True),
    Resize("e1", 50, 132),
    Configure("host-1", {"K": "v"}),
]


def parse(binary: Path, lines: list[bytes]) -> list[str]:
    """How the binary decodes each line: 'ok TYPE ...' or 'error ...'."""
    result = subprocess.run(
        [str(binary), "--parse-only"],
        input=b"".join(line + b"\n" for line in lines),
        capture_output=True,
        timeout=120,
        env={"ASAN_OPTIONS": "detect_leaks=1:abort_on_error=0", "UBSAN_OPTIONS": "halt_on_error=1"},
    )
    assert result.returncode == 0, result.stderr.decode(errors="replace")[-4000:]
    assert b"runtime error" not in result.stderr, result.stderr.decode(errors="replace")[-4000:]
    out = result.stdout.decode().splitlines()
    assert len(out) == len(lines)
    return out


def python_refuses(line: bytes) -> bool:
    try:
        protocol.decode(line)
    except ProtocolError:
        return True
    return False


def mutations(rng: random.Random, count: int) -> list[bytes]:
    """Lines near the seeds: bytes flipped, cut, repeated or spliced, fields retyped, plus
    random JSON and random bytes."""
    seeds = [protocol.encode(m).rstrip(b"\n") for m in SEEDS]
    values: list[object] = [None, True, 0, -1, 2**63, 1.5, 1e400, "", "x" * 70, [], {}, ["a"]]
    lines = []
    for _ in range(count):
        line = bytearray(rng.choice(seeds))
        kind = rng.randrange(7)
        if kind == 0:  # flip bytes
            for _ in range(rng.randint(1, 4)):
                line[rng.randrange(len(line))] = rng.randrange(256)
        elif kind == 1:  # cut short
            del line[rng.randrange(len(line)) :]
        elif kind == 2:  # splice two seeds
            other = rng.choice(seeds)
            line = line[: rng.randrange(len(line))] + other[rng.randrange(len(other)) :]
        elif kind == 3:  # a field retyped, dropped or added
            message = json.loads(bytes(line))
            key = rng.choice([*message.keys(), "extra"])
            if rng.random() < 0.3:
                message.pop(key, None)
            else:
                message[key] = rng.choice(values)
            line = bytearray(json.dumps(message).encode())
        elif kind == 4:  # deep nesting
            depth = rng.randint(1, 200)
            line = bytearray(b"[" * depth + b"1" + b"]" * rng.randint(0, depth))
        elif kind == 5:  # escapes and surrogates, whole or cut anywhere
            line = bytearray(
                b'{"type":"subscribe","id":"'
                + rng.choice([b"\\ud800", b"\\udc00\\ud800", b"\\u0000", b"\\uD83D\\uDE00", b"\\"])
                + b'"}'
            )
            if rng.random() < 0.5:
                del line[rng.randrange(len(line)) :]
        else:  # noise
            line = bytearray(rng.randbytes(rng.randint(0, 200)))
        lines.append(bytes(line).replace(b"\n", b" "))
    return lines


def test_the_daemons_messages_decode() -> None:
    lines = [protocol.encode(m).rstrip(b"\n") for m in SEEDS]
    assert parse(native.BINARY, lines) == [
        "ok exec",
        "ok exec",
        "ok signal",
        "ok subscribe",
        "ok unsubscribe",
        "ok input AP8gYmluYXJ5",
        "ok resize",
        "ok configure",
    ]


@pytest.mark.parametrize(
    "line",
    [
        b"",
        b"nope",
        b"[]",
        b'{"type":"hello","version":1,"running":{},"finished":[]}',
        b'{"type":"launch","id":"a"}',
        b'{"type":"signal","id":"a"}',
        b'{"type":"signal","id":"a","signal":9,"more":1}',
        b'{"type":"exec","id":"a","cmd":["x"],"env":{},"cwd":"/","uid":0}',
        b'{"type":"input","id":"a","data":"QQ"}',
        b'{"type":"subscribe","id":"a"} trailing',
    ],
)
def test_what_the_protocol_refuses_is_refused(line: bytes) -> None:
    assert parse(native.BINARY, [line])[0].startswith("error ")


def test_thousands_of_mutated_lines_crash_nothing(sanitized: Path) -> None:
    lines = mutations(random.Random(16), 5000)
    for binary in (sanitized, native.BINARY):
        answers = parse(binary, lines)
    for line, answer in zip(lines, answers, strict=True):
        if python_refuses(line):
            assert answer.startswith("error "), line
