"""Bearer-token authentication, as pure ASGI middleware in front of every route but /healthz
and the API's documentation.

It sits in front of the whole app, so unknown paths are guarded too, and a request without the
token is answered before its body is read. Open without it, to GET and HEAD only: /healthz,
/docs, its assets under /static/, and /openapi.json. Swagger UI needs the document to draw
the page; it gives away only the API's shape, which is public (it is in the repository). The
dashboard's page, /ui, and its assets under /ui/static/ are open too: the page holds no data,
asks for the token itself and sends it with every call it makes.

A WebSocket may carry the token as a header, as a subprotocol (what a browser can do: it cannot
set headers, and a token in a URL lands in logs) or, for older clients, as `?token=`.
"""

from __future__ import annotations

import base64
import binascii
import hmac
from collections.abc import Set
from urllib.parse import parse_qsl

from starlette.types import ASGIApp, Receive, Scope, Send

from api.problems import problem

# Probes (load balancers, systemd's ExecStartPost, scripts waiting for readiness) carry no token;
# nor does a browser loading the documentation, which asks for the token itself (Authorize).
_OPEN_PATHS = {"/healthz", "/docs", "/openapi.json", "/ui", "/ui/"}
_OPEN_PREFIXES = ("/static/", "/ui/static/")
_READS = {"GET", "HEAD"}

# A browser's WebSocket offers `Sec-WebSocket-Protocol: sandboxd, bearer.<token as base64url>`;
# the server accepts with `sandboxd` (never echoing the token back).
WS_PROTOCOL = "sandboxd"
WS_TOKEN_PREFIX = "bearer."


class BearerAuth:
    """Answer 401 unless the request carries `Authorization: Bearer <token>`."""

    def __init__(self, app: ASGIApp, token: str, open_paths: Set[str] = frozenset()) -> None:
        self.app = app
        self.expected = token.encode()
        self.open_paths = _OPEN_PATHS | open_paths  # and those the settings open (/metrics)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "websocket":
            await self._websocket(scope, receive, send)
            return
        if scope["type"] != "http" or _is_open(scope["method"], scope["path"], self.open_paths):
            await self.app(scope, receive, send)
            return
        presented = _bearer(scope)
        # compare_digest takes as long for a near miss as for a far one.
        if presented is not None and hmac.compare_digest(presented, self.expected):
            await self.app(scope, receive, send)
            return
        detail = "a bearer token is required" if presented is None else "the token is wrong"
        response = problem(401, "unauthorized", detail, headers={"WWW-Authenticate": "Bearer"})
        await response(scope, receive, send)

    async def _websocket(self, scope: Scope, receive: Receive, send: Send) -> None:
        """A browser cannot set headers on a WebSocket: it offers the token as a subprotocol
        (older clients give `?token=`)."""
        presented = _bearer(scope) or _subprotocol_token(scope) or _query_token(scope)
        if presented is not None and hmac.compare_digest(presented, self.expected):
            await self.app(scope, receive, send)
            return
        await receive()  # websocket.connect
        await send({"type": "websocket.close", "code": 1008, "reason": "unauthorized"})


def _is_open(method: str, path: str, open_paths: Set[str]) -> bool:
    if method not in _READS:
        return False
    if path in open_paths:
        return True
    # No "..": a path that climbs out of /static/ is not a static file (nor is it open).
    return path.startswith(_OPEN_PREFIXES) and ".." not in path.split("/")


def _subprotocol_token(scope: Scope) -> bytes | None:
    """The token a browser offered as the subprotocol `bearer.<base64url, unpadded>`."""
    for offered in scope.get("subprotocols", []):
        if offered.startswith(WS_TOKEN_PREFIX):
            encoded = offered.removeprefix(WS_TOKEN_PREFIX)
            try:
                return base64.urlsafe_b64decode(encoded + "=" * (-len(encoded) % 4)) or None
            except (binascii.Error, ValueError):
                return None
    return None


def _query_token(scope: Scope) -> bytes | None:
    for key, value in parse_qsl(scope.get("query_string", b"").decode()):
        if key == "token" and value:
            return str(value).encode()
    return None


def _bearer(scope: Scope) -> bytes | None:
    """The token of the Authorization header, or None when there is no Bearer credential."""
    for name, value in scope["headers"]:
        if name == b"authorization":
            scheme, _, credential = value.partition(b" ")
            if scheme.lower() == b"bearer" and credential.strip():
                return bytes(credential.strip())
            return None
    return None
