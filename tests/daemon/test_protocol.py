"""daemon/protocol.py: every message survives its encoding, decode refuses what it does not
know, a supervisor of another version is not adopted, and a failed setup comes back as one
SETUP_ERROR: from A through a real zygote, and from B in place of HELLO."""

from __future__ import annotations

import asyncio
import errno
import json
import secrets
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from daemon.lifecycle.supervisor_link import SpawnError, SupervisorLink, Zygote
from daemon.linux import cgroups
from daemon.protocol import (
    PROTOCOL_VERSION,
    BindMount,
    Configure,
    ErrorReply,
    ExecRequest,
    Exited,
    ExitStatus,
    Hello,
    Input,
    Layer,
    Message,
    NetworkPlan,
    Output,
    ProtocolError,
    Resize,
    SendSignal,
    SetupError,
    Spawned,
    SpawnRequest,
    Started,
    Subscribe,
    Subscribed,
    Unsubscribe,
    decode,
    encode,
)

SANDBOX = "sb_00000000000000bb"


def spawn_request(cgroup: str, run_dir: str, **changes: object) -> SpawnRequest:
    request = SpawnRequest(
        sandbox_id=SANDBOX,
        hostname="box",
        namespaces=["mnt", "pid", "uts", "ipc", "net", "user"],
        uid_base=100000,
        run_dir=run_dir,
        layers=[Layer("/", "/", "/u", "/w", requested=True)],
        mounts=[BindMount("/src", "/dst", True)],
        env={"A": "1"},
        cmd=["sleep", "1"],
        output_limit=1024,
        cgroup=cgroup,
    )
    for name, value in changes.items():
        setattr(request, name, value)
    return request


MESSAGES: list[Message] = [
    spawn_request("/sys/fs/cgroup/x", "/run/x"),
    spawn_request(
        "/c",
        "/r",
        network=NetworkPlan("br0", "veth0", "02:00:00:00:00:01", "10.0.0.2", 24, "10.0.0.1"),
    ),
    Spawned(1234, 5678),
    SetupError("root", errno.ENOENT, "InvalidMount: cannot bind /src", invalid=True),
    Hello(PROTOCOL_VERSION, {"ex_1": 42}, ["ex_2"]),
    ExecRequest("ex_1", ["ls"], {"B": "2"}, "/", 1000, None, stdin="x", timeout=1.5, tty=True),
    Started("ex_1", None),
    SendSignal("ex_1", 9),
    Exited("ex_1", ExitStatus(None, "SIGKILL", timed_out=True, finished_at=1.0)),
    ErrorReply(None, "ValueError: no"),
    Subscribe("ex_1"),
    Subscribed("ex_1", {"stdout": 3, "stderr": 0}),
    Unsubscribe("ex_1"),
    Output("ex_1", "stdout", 3, "aGk="),
    Input("ex_1", "aGk=", eof=True),
    Resize("ex_1", 40, 120),
    Configure("box", {"C": "3"}),
]


@pytest.mark.parametrize("message", MESSAGES, ids=lambda m: type(m).__name__)
def test_every_message_survives_its_encoding(message: Message) -> None:
    line = encode(message)
    assert line.endswith(b"\n") and line.count(b"\n") == 1
    assert json.loads(line)["type"] == message.TYPE.value
    assert decode(line) == message


@pytest.mark.parametrize(
    ("line", "error"),
    [
        (b"not json", "not a JSON line"),
        (b"[1]", "must be a JSON object"),
        (b'{"id": "ex_1"}', "unknown message type None"),
        (b'{"type": "launch", "id": "ex_1"}', "unknown message type 'launch'"),
        (b'{"type": "subscribe", "id": "ex_1", "since": 0}', "subscribe has no field since"),
        (b'{"type": "resize", "id": "ex_1", "rows": 2}', "resize lacks the field cols"),
        (b'{"type": "exited", "id": "ex_1", "status": 0}', "exited: status must hold JSON"),
    ],
)
def test_what_is_not_a_message_is_a_protocol_error(line: bytes, error: str) -> None:
    with pytest.raises(ProtocolError, match=error):
        decode(line)


def test_nested_objects_are_checked_too() -> None:
    raw = json.loads(encode(MESSAGES[0]))
    raw["layers"][0]["lowerdir"] = "/"
    with pytest.raises(ProtocolError, match="Layer has no field lowerdir"):
        decode(json.dumps(raw).encode())


@pytest.mark.parametrize(
    "hello",
    [
        {"type": "hello", "running": {}, "finished": []},  # before versions: version 0
        {"type": "hello", "version": PROTOCOL_VERSION + 1, "running": {}, "finished": []},
        {"type": "hello", "version": PROTOCOL_VERSION + 1, "execs": []},  # other fields too
    ],
)
def test_a_hello_of_another_version_is_refused(hello: dict[str, object]) -> None:
    version = hello.get("version", 0)
    with pytest.raises(ProtocolError, match=f"speaks protocol version {version}, this daemon"):
        decode(json.dumps(hello).encode())


def test_a_setup_error_has_one_shape() -> None:
    error = SetupError.of("root", FileNotFoundError(errno.ENOENT, "No such file", "/x"))
    assert error == SetupError(
        "root", errno.ENOENT, "FileNotFoundError: [Errno 2] No such file: '/x'", False
    )
    assert SetupError.of("x", ValueError("bad"), invalid=True) == SetupError(
        "x", None, "ValueError: bad", True
    )
    # Always one atomic pipe write, however long the exception's text.
    assert len(encode(SetupError.of("root", OSError("x" * 100_000)))) < 4096


# -- the daemon's side: the link and the zygote -------------------------------------------------


async def link_to_peer(tmp_path: Path, first_line: bytes) -> Hello:
    """Connect a SupervisorLink to a peer that sends `first_line` as its first message."""
    path = tmp_path / "supervisor.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as listener:
        listener.bind(str(path))
        listener.listen()
        listener.setblocking(False)

        async def closed() -> None:
            pass

        link = SupervisorLink(str(path), lambda message: None, closed, timeout=5)
        connecting = asyncio.create_task(link.connect())
        peer, _ = await asyncio.get_running_loop().sock_accept(listener)
        with peer:
            peer.sendall(first_line)
            try:
                return await connecting
            finally:
                await link.aclose()


def test_the_link_adopts_a_supervisor_of_its_version(tmp_path: Path) -> None:
    hello = Hello(PROTOCOL_VERSION, {"ex_1": 7}, [])
    assert asyncio.run(link_to_peer(tmp_path, encode(hello))) == hello


def test_the_link_refuses_a_supervisor_of_another_version(tmp_path: Path) -> None:
    old = json.dumps({"type": "hello", "running": {}, "finished": []}).encode() + b"\n"
    with pytest.raises(ProtocolError, match="speaks protocol version 0"):
        asyncio.run(link_to_peer(tmp_path, old))


def test_a_setup_error_in_place_of_hello_is_a_spawn_error(tmp_path: Path) -> None:
    error = SetupError("root", None, "InvalidMount: cannot bind /x", invalid=True)
    with pytest.raises(SpawnError) as raised:
        asyncio.run(link_to_peer(tmp_path, encode(error)))
    assert raised.value.error == error


@pytest.fixture
def sandbox_cgroup(tmp_path: Path) -> Iterator[str]:
    tree = cgroups.ProcessTree(f"sandboxd-unit-{secrets.token_hex(4)}", tmp_path)
    tree.start()
    tree.create(SANDBOX)
    try:
        yield str(tree.path(SANDBOX))
    finally:
        tree.remove(SANDBOX)
        tree.stop()


def spawn_through_a_zygote(request: SpawnRequest) -> SpawnError:
    async def main() -> SpawnError:
        zygote = Zygote("sandboxd-test-protocol")
        await zygote.start()
        try:
            with pytest.raises(SpawnError) as raised:
                await zygote.spawn(request)
            return raised.value
        finally:
            await zygote.stop()

    return asyncio.run(main())


def test_a_failure_in_a_comes_back_through_the_real_zygote(
    sandbox_cgroup: str, tmp_path: Path
) -> None:
    # A joins the hierarchies it is given before anything else: a missing one fails step 1.
    request = spawn_request(sandbox_cgroup, str(tmp_path), join=[str(tmp_path / "no-cgroup")])
    error = spawn_through_a_zygote(request).error
    assert (error.step, error.errno, error.invalid) == ("cgroups", errno.ENOENT, False)
    assert error.message.startswith("FileNotFoundError: ")


def test_a_failure_in_the_zygote_itself_has_the_same_shape(tmp_path: Path) -> None:
    request = spawn_request(str(tmp_path / "no-cgroup"), str(tmp_path))
    error = spawn_through_a_zygote(request).error
    assert (error.step, error.errno, error.invalid) == ("zygote", errno.ENOENT, False)
