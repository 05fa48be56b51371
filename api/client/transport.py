"""Where the daemon is and how to talk to it: the host URL, an httpx client, the attach
WebSocket, and every failure turned into one line for the user.

Errors, drawn as httpx draws its own:

    ClientError              one line on stderr, a non-zero exit, never a traceback
    ├── Unreachable          no daemon answers at the host (or the socket is closed to us)
    ├── ApiError             the daemon answered with a problem (its `detail`, its status)
    │   └── Unauthorized     401: the token is missing or wrong
    └── ConnectionLost       the daemon went away in the middle of a stream
"""

from __future__ import annotations

import json
import os
import ssl
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, urlsplit

import httpx
from websockets.exceptions import InvalidHandshake, InvalidStatus
from websockets.sync.client import ClientConnection, connect, unix_connect

from daemon.config import DEFAULT_SOCKET

HOST_VARIABLE = "SANDBOXD_HOST"
TOKEN_VARIABLE = "SANDBOXD_TOKEN"
# A create or an exec that waits may take as long as its process: reads never time out.
TIMEOUT = httpx.Timeout(connect=10, read=None, write=None, pool=None)


class ClientError(Exception):
    """Said to the user in one line; `exit_code` is the command's status."""

    exit_code = 1


class Unreachable(ClientError):
    pass


class ConnectionLost(ClientError):
    pass


class ApiError(ClientError):
    def __init__(self, status: int, detail: str) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail


class Unauthorized(ApiError):
    pass


@dataclass(frozen=True)
class Host:
    """A daemon endpoint: `unix:///path`, `tcp://HOST:PORT`, `http(s)://HOST[:PORT]`."""

    url: str
    socket: str | None  # the unix socket's path, or None for TCP
    base: str  # the http(s) base URL requests go to

    @classmethod
    def parse(cls, url: str | None) -> Host:
        url = (url or os.environ.get(HOST_VARIABLE) or DEFAULT_SOCKET).strip()
        parts = urlsplit(url)
        if parts.scheme == "unix":
            path = parts.netloc + parts.path  # unix:///abs and unix://rel alike
            if not path:
                raise ClientError(f"{url!r}: expected unix:///path/to/socket")
            return cls(url, path, "http://localhost")
        if parts.scheme in ("tcp", "http", "https") and parts.hostname:
            scheme = "https" if parts.scheme == "https" else "http"
            return cls(url, None, f"{scheme}://{parts.netloc}{parts.path.rstrip('/')}")
        raise ClientError(
            f"{url!r}: the host must be unix:///path, tcp://HOST:PORT or http(s)://HOST[:PORT]"
        )


class Client:
    """One daemon, its token, and the requests the commands make."""

    def __init__(self, host: Host, token: str | None) -> None:
        self.host = host
        self.token = token or None
        headers = {"Authorization": f"Bearer {self.token}"} if self.token else {}
        transport = httpx.HTTPTransport(uds=host.socket) if host.socket else None
        self.http = httpx.Client(
            base_url=host.base, headers=headers, timeout=TIMEOUT, transport=transport
        )

    # -- plain requests ------------------------------------------------------------------------

    def request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        """The response, once its status is a success; else the problem as an ApiError."""
        with self._mapped():
            response = self.http.request(method, path, **kwargs)
        return self.checked(response)

    def get(self, path: str, **kwargs: Any) -> Any:
        return self.request("GET", path, **kwargs).json()

    def post(self, path: str, body: object, **kwargs: Any) -> Any:
        return self.request("POST", path, json=body, **kwargs).json()

    def delete(self, path: str, **kwargs: Any) -> None:
        self.request("DELETE", path, **kwargs)

    # -- streams -------------------------------------------------------------------------------

    @contextmanager
    def stream(self, method: str, path: str, **kwargs: Any) -> Iterator[httpx.Response]:
        """A response whose body is read as it comes; a problem before it starts is raised."""
        with self._mapped(), self.http.stream(method, path, **kwargs) as response:
            if response.is_error:
                response.read()
                self.checked(response)
            yield response

    def lines(self, response: httpx.Response) -> Iterator[dict[str, Any]]:
        """NDJSON objects of a streamed response, one a line."""
        with self._mapped():
            for line in response.iter_lines():
                if line.strip():
                    yield json.loads(line)

    def checked(self, response: httpx.Response) -> httpx.Response:
        if response.is_success:
            return response
        detail = _detail(response)
        if response.status_code == 401:
            hint = "" if self.token else f" (set {TOKEN_VARIABLE})"
            raise Unauthorized(401, f"the daemon at {self.host.url} refused us: {detail}{hint}")
        raise ApiError(response.status_code, detail)

    @contextmanager
    def _mapped(self) -> Iterator[None]:
        """httpx's transport errors as the one line a user needs (raise … from, as httpx does)."""
        try:
            yield
        except httpx.ConnectError as exc:
            raise Unreachable(self._unreachable(exc)) from exc
        except (httpx.RemoteProtocolError, httpx.ReadError) as exc:
            raise ConnectionLost(f"lost the connection to the daemon at {self.host.url}") from exc
        except httpx.TransportError as exc:
            raise Unreachable(f"cannot talk to the daemon at {self.host.url}: {exc}") from exc

    def _unreachable(self, exc: Exception) -> str:
        cause = f"{exc}".lower()
        if "permission denied" in cause:
            why = "permission denied (run as root or as a member of the socket's group)"
        else:
            why = "is the daemon running? is SANDBOXD_HOST right?"
        return f"cannot reach the daemon at {self.host.url}: {why}"

    # -- the attach WebSocket ------------------------------------------------------------------

    def attach(self, ref: str, exec_id: str) -> ClientConnection:
        """The exec's attach WebSocket, open."""
        path = f"/sandboxes/{quote(ref, safe='')}/execs/{quote(exec_id, safe='')}/attach"
        headers = {"Authorization": f"Bearer {self.token}"} if self.token else {}
        options: dict[str, Any] = {
            "additional_headers": headers,
            "max_size": None,
            "compression": None,
            "ping_interval": None,  # an idle shell is not a dead peer
            "open_timeout": 10,
        }
        try:
            socket: ClientConnection
            if self.host.socket:
                socket = unix_connect(self.host.socket, "ws://localhost" + path, **options)
            else:
                uri = self.host.base.replace("http", "ws", 1) + path
                if uri.startswith("wss:"):
                    options["ssl"] = ssl.create_default_context()
                socket = connect(uri, proxy=None, **options)
            return socket
        except InvalidStatus as exc:
            if exc.response.status_code == 401:
                raise Unauthorized(401, f"the daemon at {self.host.url} refused the token") from exc
            raise ApiError(exc.response.status_code, f"attach refused: {exc}") from exc
        except (OSError, InvalidHandshake, TimeoutError) as exc:
            raise Unreachable(self._unreachable(exc)) from exc

    def close(self) -> None:
        self.http.close()


def path(*parts: str) -> str:
    """A URL path from segments, each quoted (a ref may hold characters a path must not)."""
    return "/" + "/".join(quote(part, safe="") for part in parts)


def image_path(ref: str) -> str:
    """/images/{ref}: an image reference keeps its `/` and `:` (`/images/host:5000/team/app:1`)."""
    return "/images/" + quote(ref, safe="/:@")


def _detail(response: httpx.Response) -> str:
    """The problem's `detail`, else its title, else the status line."""
    try:
        body = response.json()
    except ValueError:
        body = None
    if isinstance(body, Mapping):
        for key in ("detail", "title"):
            if isinstance(body.get(key), str) and body[key]:
                return str(body[key])
    return f"{response.status_code} {response.reason_phrase}"
