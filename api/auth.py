"""Bearer-token authentication, as pure ASGI middleware in front of every route but /healthz.

It sits in front of the whole app, so /docs, /openapi.json and unknown paths are guarded too,
and a request without the token is answered before its body is read.
"""

from __future__ import annotations

import hmac
from urllib.parse import parse_qsl

from starlette.types import ASGIApp, Receive, Scope, Send

from api.problems import problem

# Probes (load balancers, systemd's ExecStartPost, scripts waiting for readiness) carry no token.
_OPEN = {("GET", "/healthz"), ("HEAD", "/healthz")}


class BearerAuth:
    """Answer 401 unless the request carries `Authorization: Bearer <token>`."""

    def __init__(self, app: ASGIApp, token: str) -> None:
        self.app = app
        self.expected = token.encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "websocket":
            await self._websocket(scope, receive, send)
            return
        if scope["type"] != "http" or (scope["method"], scope["path"]) in _OPEN:
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
        """A browser cannot set headers on a WebSocket: it may give `?token=` instead."""
        presented = _bearer(scope) or _query_token(scope)
        if presented is not None and hmac.compare_digest(presented, self.expected):
            await self.app(scope, receive, send)
            return
        await receive()  # websocket.connect
        await send({"type": "websocket.close", "code": 1008, "reason": "unauthorized"})


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
