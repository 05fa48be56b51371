"""Published ports: a TCP proxy in the daemon's asyncio loop from `host_port` on every host
address to `sandbox_port` at a bridged sandbox's address.

Runs in: the daemon, host root in the host's namespaces, on its asyncio loop.

Why a proxy and not kernel DNAT: a DNAT rule in PREROUTING never sees a connection to
127.0.0.1 (locally made packets take OUTPUT), and one in OUTPUT that rewrites a loopback
destination to the bridge is dropped as a martian unless route_localnet is turned on for the
whole of lo. Users of Docker expect `curl 127.0.0.1:HOST_PORT` to work, and Docker's own
userland proxy is what makes it work there. The price: the sandbox sees connections come from
the bridge's address, not the client's, and every byte crosses the daemon.

A port is taken by binding it when the sandbox is created, before anything is stored, so a
port in use answers 409 and changes nothing; the sockets are closed when the sandbox ends or
is deleted, and bound again for running sandboxes when the daemon restarts.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import socket
from collections.abc import Sequence

from daemon.errors import Conflict
from daemon.shapes import PortSpec

log = logging.getLogger(__name__)

_BACKLOG = 128
_CHUNK = 65536
_CONNECT_TIMEOUT = 5.0
# No IPv6 on the host (or none on lo) is no reason to refuse a port: IPv4 alone then.
_NO_IPV6 = (errno.EAFNOSUPPORT, errno.EADDRNOTAVAIL, errno.EPROTONOSUPPORT)


class PublishedPorts:
    """One sandbox's published ports: listening sockets, then their servers."""

    def __init__(self, sockets: list[tuple[PortSpec, socket.socket]]) -> None:
        self.sockets = sockets
        self.servers: list[asyncio.Server] = []
        self.connections: set[asyncio.Task[None]] = set()

    @classmethod
    def bind(cls, ports: Sequence[PortSpec]) -> PublishedPorts:
        """Take every host port on 0.0.0.0 and [::]; Conflict (409) if one is in use, with
        nothing kept."""
        bound: list[tuple[PortSpec, socket.socket]] = []
        try:
            for port in ports:
                bound.append((port, _listen(socket.AF_INET, "0.0.0.0", port.host_port)))
                try:
                    bound.append((port, _listen(socket.AF_INET6, "::", port.host_port)))
                except OSError as exc:
                    if exc.errno not in _NO_IPV6:
                        raise
        except OSError as exc:
            for _, sock in bound:
                sock.close()
            if exc.errno == errno.EADDRINUSE:
                raise Conflict(f"host port {port.host_port} is already in use") from exc
            raise
        return cls(bound)

    async def start(self, ip: str) -> None:
        """Serve: each connection to a host port is relayed to ip:sandbox_port."""
        for port, sock in self.sockets:

            async def relay(
                reader: asyncio.StreamReader,
                writer: asyncio.StreamWriter,
                target: tuple[str, int] = (ip, port.sandbox_port),
            ) -> None:
                await self._relay(reader, writer, target)

            self.servers.append(await asyncio.start_server(relay, sock=sock, backlog=_BACKLOG))

    async def close(self) -> None:
        """Stop listening and drop every relayed connection; the ports are free afterwards."""
        for server in self.servers:
            server.close()
        for _, sock in self.sockets:
            sock.close()
        for task in list(self.connections):
            task.cancel()
        await asyncio.gather(*self.connections, return_exceptions=True)
        self.servers.clear()
        self.sockets.clear()

    async def _relay(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, target: tuple[str, int]
    ) -> None:
        task = asyncio.current_task()
        assert task is not None
        self.connections.add(task)
        try:
            try:
                upstream = await asyncio.wait_for(
                    asyncio.open_connection(*target), _CONNECT_TIMEOUT
                )
            except (OSError, TimeoutError):
                writer.transport.abort()  # the client sees a reset, as from a closed port
                return
            await _splice((reader, writer), upstream)
        finally:
            writer.close()
            self.connections.discard(task)


Stream = tuple[asyncio.StreamReader, asyncio.StreamWriter]


async def _splice(a: Stream, b: Stream) -> None:
    """Copy both ways until both sides have finished; a half-close is passed on as one, and
    an error on either side aborts both."""
    pipes = [asyncio.ensure_future(_pipe(a[0], b[1])), asyncio.ensure_future(_pipe(b[0], a[1]))]
    try:
        done, _ = await asyncio.wait(pipes, return_when=asyncio.FIRST_EXCEPTION)
        if any(not t.cancelled() and t.exception() is not None for t in done):
            a[1].transport.abort()
            b[1].transport.abort()
    finally:
        for pipe in pipes:
            pipe.cancel()
        await asyncio.gather(*pipes, return_exceptions=True)
        b[1].close()


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    while data := await reader.read(_CHUNK):
        writer.write(data)
        await writer.drain()
    if writer.can_write_eof():
        with contextlib.suppress(OSError):
            writer.write_eof()


def _listen(family: socket.AddressFamily, host: str, port: int) -> socket.socket:
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        # As any server does: a port whose last connections are in TIME_WAIT can be taken.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind((host, port))
        sock.listen(_BACKLOG)
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    return sock
