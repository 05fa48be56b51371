"""The daemon's link to a supervisor that stops reading and answering, over a real unix
socket: its waits end with SupervisorUnresponsive and what it holds unsent stays bounded.
The whole sandbox, SIGSTOP'd, is tests/integration/test_stuck_supervisor.py."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from daemon.config import ConfigError, load_config
from daemon.errors import SupervisorUnresponsive
from daemon.lifecycle.supervisor_link import MAX_UNREAD, SupervisorLink
from daemon.protocol import PROTOCOL_VERSION, Hello, Input, encode

TIMEOUT = 0.2


@contextlib.asynccontextmanager
async def silent_supervisor(tmp_path: Path) -> AsyncIterator[tuple[SupervisorLink, socket.socket]]:
    """A link to a peer that says HELLO, then neither reads nor answers."""
    path = tmp_path / "supervisor.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    listener.listen()
    listener.setblocking(False)

    async def closed() -> None:
        pass

    link = SupervisorLink(str(path), lambda kind, message: None, closed, timeout=TIMEOUT)
    connecting = asyncio.create_task(link.connect())
    peer, _ = await asyncio.get_running_loop().sock_accept(listener)
    peer.sendall(encode(Hello(PROTOCOL_VERSION, {}, [])))
    await connecting
    try:
        yield link, peer
    finally:
        await link.aclose()
        peer.close()
        listener.close()


def test_an_answer_not_given_in_time_is_unresponsive(tmp_path: Path) -> None:
    async def main() -> None:
        async with silent_supervisor(tmp_path) as (link, _):
            started: asyncio.Future[int] = asyncio.get_running_loop().create_future()
            with pytest.raises(SupervisorUnresponsive, match="did not answer the exec within"):
                await link.answer(started, "the exec")
            assert started.cancelled()  # a late answer finds it done

    asyncio.run(main())


def test_an_answer_owed_after_a_deadline_may_come_then(tmp_path: Path) -> None:
    async def main() -> None:
        async with silent_supervisor(tmp_path) as (link, _):
            loop = asyncio.get_running_loop()
            ended: asyncio.Future[str] = loop.create_future()
            loop.call_later(TIMEOUT * 2, ended.set_result, "ended")
            assert await link.answer(ended, "with its end", after=TIMEOUT * 4) == "ended"
            late: asyncio.Future[str] = loop.create_future()
            with pytest.raises(SupervisorUnresponsive, match="after the exec's deadline"):
                await link.answer(late, "with its end", after=TIMEOUT)

    asyncio.run(main())


def test_what_a_supervisor_leaves_unread_is_bounded(tmp_path: Path) -> None:
    async def main() -> None:
        async with silent_supervisor(tmp_path) as (link, peer):
            data = "x" * (1 << 20)
            sent = 0
            with pytest.raises(SupervisorUnresponsive, match="did not read the last"):
                for _ in range(64):  # 64 MiB offered
                    link.send(Input("ex_1", data))
                    sent += 1
            assert link.writer is not None
            unread = link.writer.transport.get_write_buffer_size()
            assert unread <= MAX_UNREAD + len(data) + 100 and sent < 8
            # Waiting for room ends too; once the supervisor reads, there is room again.
            with pytest.raises(SupervisorUnresponsive, match="did not read what was sent"):
                await link.post(Input("ex_1", "y"))
            reading = asyncio.create_task(drain(peer))
            link.timeout = 30  # however slow the machine: this wait must end with room
            await link.post(Input("ex_1", "y"))
            reading.cancel()

    asyncio.run(main())


async def drain(peer: socket.socket) -> None:
    peer.setblocking(False)
    loop = asyncio.get_running_loop()
    while await loop.sock_recv(peer, 1 << 20):
        pass


def test_supervisor_timeout_is_a_setting() -> None:
    assert load_config({}, {}).supervisor_timeout == 5
    environment = {"SANDBOXD_SUPERVISOR_TIMEOUT": "7"}
    assert load_config({}, environment).supervisor_timeout == 7
    assert load_config({"supervisor_timeout": "2"}, environment).supervisor_timeout == 2
    with pytest.raises(ConfigError, match="--supervisor-timeout: must be at least 1"):
        load_config({"supervisor_timeout": "0"}, {})
