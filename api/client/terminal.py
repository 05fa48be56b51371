"""An attached exec: the user's stdin to the process and its output to the user, over the
attach WebSocket; with a terminal, raw mode for the session and the window's size.

Runs in: the client, two threads. The main thread receives (output, then the exit); an input
thread sends (stdin as binary messages, end of file, resizes woken by SIGWINCH through a
signal wakeup pipe, so that a resize never waits on a blocked read). The terminal is put back
as it was on every way out: the process's exit, an error, Ctrl-C or SIGTERM/SIGHUP to the
client, and a connection the daemon dropped.

    client                                   daemon (GET …/execs/{id}/attach)
      ── binary: stdin bytes ────────────────▶
      ── {"resize": {"rows", "cols"}} ──────▶
      ── {"eof": true} ─────────────────────▶
      ◀──────────── {"stream", "data"} ──────  output as it comes
      ◀──────────── {"exit": Exec} ──────────  last; then the socket closes
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import json
import os
import select
import signal
import struct
import termios
import threading
import tty
from collections.abc import Iterator
from types import FrameType
from typing import Any

from websockets.exceptions import ConnectionClosed
from websockets.sync.client import ClientConnection

from api.client.render import exit_status
from api.client.transport import ApiError, Client, ConnectionLost

STDIN, STDOUT, STDERR = 0, 1, 2
_FORWARDED_EXITS = (signal.SIGTERM, signal.SIGHUP)


def window_size() -> dict[str, int] | None:
    """The terminal's rows and columns (of stdout, else stdin), or None without one."""
    for fd in (STDOUT, STDIN):
        with contextlib.suppress(OSError):
            rows, cols, _, _ = struct.unpack("HHHH", fcntl.ioctl(fd, termios.TIOCGWINSZ, b"\0" * 8))
            if rows and cols:
                return {"rows": rows, "cols": cols}
    return None


@contextlib.contextmanager
def raw_mode(enabled: bool) -> Iterator[None]:
    """The user's terminal in raw mode (keys go to the process as typed: Ctrl-C, Ctrl-D), and
    back as it was however the block ends."""
    if not enabled:
        yield
        return
    saved = termios.tcgetattr(STDIN)
    tty.setraw(STDIN, termios.TCSANOW)
    try:
        yield
    finally:
        termios.tcsetattr(STDIN, termios.TCSADRAIN, saved)


@contextlib.contextmanager
def _signals_wake(fd: int) -> Iterator[None]:
    """SIGWINCH (and the rest) written to `fd` as they arrive; SIGTERM and SIGHUP end the
    client through its `finally`s (their default would leave the terminal raw)."""

    def _exit_on(signum: int, _frame: FrameType | None) -> None:
        raise SystemExit(128 + signum)

    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGWINCH, *_FORWARDED_EXITS)}
    signal.signal(signal.SIGWINCH, lambda _s, _f: None)  # a handler, so the wakeup fd is written
    for sig in _FORWARDED_EXITS:
        signal.signal(sig, _exit_on)
    old_fd = signal.set_wakeup_fd(fd, warn_on_full_buffer=False)
    try:
        yield
    finally:
        signal.set_wakeup_fd(old_fd)
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def attach(
    client: Client, ref: str, execution: dict[str, Any], *, stdin: bool, terminal: bool
) -> int:
    """Attach to a started exec until it ends; its status as a shell reports it."""
    raw = terminal and stdin and os.isatty(STDIN)
    socket = client.attach(ref, execution["id"])
    wake_read, wake_write = os.pipe()
    for fd in (wake_read, wake_write):
        os.set_blocking(fd, False)
    try:
        with _signals_wake(wake_write), raw_mode(raw):
            pump = _Input(socket, wake_read, stdin=stdin, terminal=terminal)
            pump.start()
            if terminal and (size := window_size()):
                pump.send_text({"resize": size})  # it may have changed since the create
            return _receive(socket, binary=execution.get("encoding") == "base64")
    finally:
        socket.close()
        os.close(wake_read)
        os.close(wake_write)


def _receive(socket: ClientConnection, *, binary: bool) -> int:
    """Output to stdout/stderr until the exit message; a close before it is a lost daemon."""
    try:
        for message in socket:
            event = json.loads(message)
            if "stream" in event:
                data = event["data"]
                chunk = base64.b64decode(data) if binary else data.encode()
                _write_all(STDERR if event["stream"] == "stderr" else STDOUT, chunk)
            elif "exit" in event:
                return exit_status(event["exit"])
            elif "error" in event:
                error = event["error"]
                raise ApiError(int(error.get("status", 500)), str(error.get("detail")))
    except ConnectionClosed:
        pass
    raise ConnectionLost(
        "lost the connection to the daemon before the process ended (it may still be running)"
    )


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


class _Input(threading.Thread):
    """Client, input thread: stdin and resizes to the socket, until either ends."""

    def __init__(self, socket: ClientConnection, wake: int, *, stdin: bool, terminal: bool) -> None:
        super().__init__(daemon=True, name="attach-input")
        self.socket = socket
        self.wake = wake
        self.stdin = stdin
        self.terminal = terminal
        self.lock = threading.Lock()

    def send_text(self, message: dict[str, Any]) -> None:
        with self.lock:
            self.socket.send(json.dumps(message))

    def run(self) -> None:
        with contextlib.suppress(ConnectionClosed, OSError):
            self._pump()

    def _pump(self) -> None:
        watched = [self.wake, STDIN] if self.stdin else [self.wake]
        while True:
            ready, _, _ = select.select(watched, [], [])
            if self.wake in ready:
                woken = os.read(self.wake, 512)
                if self.terminal and signal.SIGWINCH in woken and (size := window_size()):
                    self.send_text({"resize": size})
            if STDIN in ready:
                chunk = os.read(STDIN, 65536)
                if not chunk:  # end of file: the process's stdin closes too
                    self.send_text({"eof": True})
                    watched.remove(STDIN)
                    continue
                with self.lock:
                    self.socket.send(chunk)


def interactive_possible(terminal: bool) -> str | None:
    """Why `-t` cannot be honoured here, or None."""
    if terminal and not os.isatty(STDIN):
        return "the input device is not a TTY (drop -t, or run from a terminal)"
    return None
