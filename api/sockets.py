"""The daemon's listening sockets, bound by us: unix sockets made 0660 before they listen, TCP.

uvicorn's own --uds leaves a new socket 0666, which would hand root-equivalent power to every
local user; so the daemon binds, sets the mode and only then listens, and gives uvicorn the
ready sockets.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import stat
from dataclasses import dataclass
from pathlib import Path

from daemon.config import TcpEndpoint, UnixEndpoint, parse_listen

log = logging.getLogger(__name__)

SOCKET_MODE = 0o660
BACKLOG = 128
_PROBE_TIMEOUT = 1.0


class ListenError(Exception):
    """A listener that cannot be set up; the message says which and why."""


@dataclass
class Listener:
    url: str
    sock: socket.socket
    # For a unix socket: the file we made, and its inode, so we remove only our own.
    path: Path | None = None
    inode: int | None = None


def bind_unix(path: Path, *, run_dir: Path | None = None, backlog: int = BACKLOG) -> socket.socket:
    """A listening unix socket at `path`, mode 0660, replacing a stale socket file.

    The parent directory is created 0755 (0700 when it is `run_dir`). A socket file that a live
    process still answers on is another daemon's: refuse rather than steal it.
    """
    parent = path.parent
    if not parent.exists():
        mode = 0o700 if run_dir is not None and parent == run_dir else 0o755
        parent.mkdir(parents=True, exist_ok=True)
        parent.chmod(mode)
    _remove_stale(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(str(path))
        # Before listen(): until then a connect is refused, so no one slips in under a
        # wider mode that the umask left.
        os.chmod(path, SOCKET_MODE)
        sock.listen(backlog)
    except OSError as exc:
        sock.close()
        raise ListenError(f"cannot listen on {path}: {exc.strerror}") from exc
    return sock


def bind_tcp(host: str, port: int, *, backlog: int = BACKLOG) -> socket.socket:
    """A listening TCP socket on host:port (an IPv6 literal without brackets)."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
    except socket.gaierror as exc:
        raise ListenError(f"cannot resolve {host}: {exc.strerror}") from exc
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(backlog)
    except OSError as exc:
        sock.close()
        raise ListenError(f"cannot listen on {host}:{port}: {exc.strerror}") from exc
    return sock


def bind_listeners(urls: list[str], *, run_dir: Path) -> list[Listener]:
    """Bind every URL; if one fails, close (and remove) those already bound, then raise."""
    listeners: list[Listener] = []
    try:
        for url in urls:
            endpoint = parse_listen(url)
            if isinstance(endpoint, UnixEndpoint):
                sock = bind_unix(endpoint.path, run_dir=run_dir)
                inode = os.stat(endpoint.path).st_ino
                listeners.append(Listener(url, sock, endpoint.path, inode))
            else:
                assert isinstance(endpoint, TcpEndpoint)
                listeners.append(Listener(url, bind_tcp(endpoint.host, endpoint.port)))
    except BaseException:
        close_listeners(listeners)
        raise
    return listeners


def close_listeners(listeners: list[Listener]) -> None:
    """Close the sockets and remove our socket files (not one a newer daemon put there)."""
    for listener in listeners:
        listener.sock.close()
        if listener.path is None:
            continue
        with contextlib.suppress(FileNotFoundError):
            if os.lstat(listener.path).st_ino == listener.inode:
                listener.path.unlink()


def _remove_stale(path: Path) -> None:
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise ListenError(f"{path} exists and is not a socket; refusing to replace it")
    if _answers(path):
        raise ListenError(f"a process is already serving on {path}; is another sandboxd running?")
    log.info("removing the stale socket %s", path)
    with contextlib.suppress(FileNotFoundError):
        path.unlink()


def _answers(path: Path) -> bool:
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(_PROBE_TIMEOUT)
    try:
        probe.connect(str(path))
    except (ConnectionRefusedError, FileNotFoundError):
        return False
    except TimeoutError:
        return True  # a full backlog: someone is there, just busy
    except OSError as exc:
        raise ListenError(f"cannot tell whether {path} is in use: {exc.strerror}") from exc
    finally:
        probe.close()
    return True
