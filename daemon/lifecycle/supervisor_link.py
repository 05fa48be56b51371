"""The daemon's side of daemon/protocol.py: the zygote it spawns through, and the link to each
supervisor. Runs in: the daemon, on its asyncio loop.

A supervisor may stop answering (SIGSTOP, a debugger, a host under pressure) while its sandbox
lives on. The link never lets that hang the daemon: an answer it owes at once is awaited at
most `timeout` seconds (SupervisorLink.answer), and what it has not read is held up to
MAX_UNREAD bytes, past which a message waits at most `timeout` for room (SupervisorLink.room)
or is refused (SupervisorLink.send). Past a bound, SupervisorUnresponsive: a 504.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import subprocess
import sys
from collections.abc import Awaitable, Callable
from typing import TypeVar

from daemon.errors import SupervisorUnresponsive
from daemon.linux.syscalls import process_start_time
from daemon.protocol import (
    NET,
    Hello,
    Message,
    ProtocolError,
    SetupError,
    Spawned,
    SpawnRequest,
    decode,
    encode,
    short_path,
)

log = logging.getLogger(__name__)

_LINE_LIMIT = 1 << 20
# Bytes sent to one supervisor and not yet taken by its socket: past it nothing more is sent
# (one message may overshoot it once: a 1 MiB stdin is never refused for its size alone).
MAX_UNREAD = 4 << 20

T = TypeVar("T")
# The directory the daemon package was imported from: the lean zygote imports it from there.
_PACKAGE_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


class SpawnError(Exception):
    """The zygote, A or B could not build a sandbox: `error` says at which step and why."""

    def __init__(self, error: SetupError) -> None:
        super().__init__(error.message)
        self.error = error


class Zygote:
    """A warm, thread-free child process that forks supervisors (see daemon/sandbox/zygote.py)."""

    def __init__(self, label: str, *, net: bool = False) -> None:
        self.label = label  # on the command line, so `ps` tells which daemon's it is
        self.net = net  # the one with netlink loaded, for bridged sandboxes
        self.process: subprocess.Popen[bytes] | None = None
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None
        self.lock = asyncio.Lock()

    async def start(self) -> None:
        ours, theirs = socket.socketpair()
        # Supervisors inherit the zygote's environment: nothing of the daemon's (its token!).
        env = {k: v for k, v in os.environ.items() if k in ("PATH", "PYTHONPATH")}
        # This package's directory first on its path, and never the daemon's working
        # directory (-P): it imports the daemon's own code, from nowhere anyone else writes.
        env["PYTHONPATH"] = os.pathsep.join(filter(None, (_PACKAGE_ROOT, env.get("PYTHONPATH"))))
        python = [sys.executable, "-P"]
        if not self.net:
            # The lean one needs nothing of site-packages: no `site` (whose .pth files may
            # import MiBs of modules it keeps).
            python.append("-S")
        command = [*python, "-m", "daemon.sandbox.zygote", str(theirs.fileno()), self.label]
        self.process = subprocess.Popen(
            command + ([NET] if self.net else []),
            pass_fds=[theirs.fileno()],
            stdin=subprocess.DEVNULL,
            env=env | {"LANG": "C.UTF-8"},
        )
        theirs.close()
        self.reader, self.writer = await asyncio.open_unix_connection(sock=ours, limit=_LINE_LIMIT)

    async def spawn(self, req: SpawnRequest) -> tuple[int, int]:
        """Build a sandbox's namespaces and supervisor; B's host pid and start time."""
        async with self.lock:
            if self.process is None or self.process.poll() is not None:
                await self.stop()
                await self.start()
            assert self.reader is not None and self.writer is not None
            self.writer.write(encode(req))
            await self.writer.drain()
            line = await self.reader.readline()
        if not line:
            raise SpawnError(SetupError("zygote", None, "the zygote died"))
        reply = decode(line)
        if isinstance(reply, SetupError):
            raise SpawnError(reply)
        if not isinstance(reply, Spawned):
            raise ProtocolError(f"the zygote answered {reply.TYPE}")
        return reply.pid, reply.start

    async def stop(self) -> None:
        if self.writer is not None:
            self.writer.close()
            with contextlib.suppress(OSError):
                await self.writer.wait_closed()
        if self.process is not None:
            try:
                await asyncio.to_thread(self.process.wait, 5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                await asyncio.to_thread(self.process.wait)
        self.process = self.reader = self.writer = None


MessageHandler = Callable[[Message], None]


class SupervisorLink:
    """One connection to one supervisor: send requests, dispatch what comes back."""

    def __init__(
        self,
        path: str,
        on_message: MessageHandler,
        on_closed: Callable[[], Awaitable[None]],
        *,
        timeout: float,
    ):
        self.path = path
        self.on_message = on_message
        self.on_closed = on_closed
        self.timeout = timeout  # for an answer owed at once (config.supervisor_timeout)
        self.writer: asyncio.StreamWriter | None = None
        self.task: asyncio.Task[None] | None = None

    async def connect(self) -> Hello:
        """Connect and wait for HELLO (sent once the sandbox is set up); return it.

        Raises SpawnError when the supervisor failed its setup (it says SETUP_ERROR instead),
        ConnectionError when it is gone, ProtocolError when it speaks another version.
        """
        directory, name = os.path.split(self.path)
        dir_fd = os.open(directory, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            reader, writer = await asyncio.open_unix_connection(
                short_path(dir_fd, name), limit=_LINE_LIMIT
            )
        finally:
            os.close(dir_fd)
        line = await reader.readline()
        if not line:
            writer.close()
            raise ConnectionError("the supervisor closed the connection")
        try:
            hello = decode(line)
        except ProtocolError:
            writer.close()
            raise
        if not isinstance(hello, Hello):
            writer.close()
            if isinstance(hello, SetupError):
                raise SpawnError(hello)
            raise ConnectionError(f"the supervisor said {hello.TYPE}, not hello")
        self.writer = writer
        self.task = asyncio.create_task(self._read(reader))
        return hello

    def send(self, message: Message) -> None:
        """Queue a message now. ConnectionError if the link is gone; SupervisorUnresponsive
        if the supervisor has left more than MAX_UNREAD bytes unread (nothing is queued)."""
        writer = self._connected()
        unread = writer.transport.get_write_buffer_size()
        if unread > MAX_UNREAD:
            raise SupervisorUnresponsive(
                f"the supervisor did not read the last {unread} bytes sent to it"
            )
        writer.write(encode(message))

    async def post(self, message: Message) -> None:
        """Queue a message once the supervisor has room for it (see room)."""
        await self.room()
        self.send(message)

    async def room(self) -> None:
        """Return when send will take a message: past MAX_UNREAD unread bytes, once the
        supervisor has read them (it may just have been continued), at most `timeout`."""
        writer = self._connected()
        if writer.transport.get_write_buffer_size() > MAX_UNREAD:
            try:
                await asyncio.wait_for(writer.drain(), self.timeout)
            except TimeoutError:
                raise SupervisorUnresponsive(
                    f"the supervisor did not read what was sent to it within {self.timeout:g} s"
                ) from None

    def _connected(self) -> asyncio.StreamWriter:
        if self.writer is None or self.writer.is_closing():
            raise ConnectionError("not connected to the supervisor")
        return self.writer

    async def answer(self, future: asyncio.Future[T], what: str, *, after: float = 0.0) -> T:
        """Await an answer the supervisor owes (`what` it answers, for the message): at
        once, or `after` seconds from now (an exec's end at its deadline), give or take
        `timeout`. Past that the future is cancelled (an answer arriving later finds it done)
        and SupervisorUnresponsive is raised."""
        try:
            return await asyncio.wait_for(future, after + self.timeout)
        except TimeoutError:
            late = " after the exec's deadline" if after else ""
            raise SupervisorUnresponsive(
                f"the supervisor did not answer {what} within {self.timeout:g} s{late}"
            ) from None

    async def _read(self, reader: asyncio.StreamReader) -> None:
        try:
            while line := await reader.readline():
                try:
                    self.on_message(decode(line))
                except Exception:  # one bad message (or a store error) must not end the link
                    log.exception("%s: cannot handle %r", self.path, line[:200])
        except (ConnectionError, asyncio.IncompleteReadError, ValueError):
            pass
        finally:
            self.close()
        await self.on_closed()

    def close(self) -> None:
        """Drop the connection and what it had not sent: a supervisor that reads nothing
        would otherwise keep the socket (and that buffer) open until it died."""
        if self.writer is not None:
            self.writer.transport.abort()
            self.writer = None

    async def aclose(self) -> None:
        """Close without reporting the supervisor as gone (the daemon is stopping)."""
        if self.task is not None and self.task is not asyncio.current_task():
            self.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.task
        self.close()


def open_pidfd(pid: int, start_time: int | None) -> int | None:
    """A pidfd for the process, or None if it is gone or its pid now names another process."""
    try:
        fd = os.pidfd_open(pid)
    except OSError:
        return None
    if start_time is not None and process_start_time(pid) != start_time:
        os.close(fd)
        return None
    return fd


async def wait_readable(fd: int, timeout: float) -> bool:
    """Wait until a pidfd says its process has exited; False on timeout."""
    loop = asyncio.get_running_loop()
    ready: asyncio.Future[None] = loop.create_future()
    loop.add_reader(fd, _resolve, ready)
    try:
        await asyncio.wait_for(ready, timeout)
        return True
    except TimeoutError:
        return False
    finally:
        loop.remove_reader(fd)


def _resolve(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)
