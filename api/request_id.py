"""Request ids and the access log, as pure ASGI middleware around everything else.

Runs in: the daemon, on its event loop, once per request.

Each request gets an id: the client's `X-Request-ID` when it is one we can log safely (visible
ASCII, at most 128 characters), else a new one. The id is bound to the request's logging
context, so every line logged while serving the request carries it; the answer carries it back
in `X-Request-ID`, 401s and 413s included (those middlewares sit inside this one). When the
request is done, one access line: method, path (never the query string, which may hold a
WebSocket's token), status, duration in ms. /healthz is logged at debug: probes poll it.

A 500 is answered by Starlette's outermost middleware, outside this one: the id is left in
`scope["state"]` and in the request's context (the request has a task of its own) for the
problem handler, which logs the traceback and sets the header itself.
"""

from __future__ import annotations

import logging
import time
import uuid

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from daemon import logs

HEADER = b"x-request-id"
MAX_LENGTH = 128

log = logging.getLogger("api.access")

_QUIET = {"/healthz"}


class RequestId:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        request_id = _given(scope) or uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = request_id
        logs.bind(request_id=request_id)
        status = 500  # unless an answer starts: the app raised, and the 500 is sent outside
        started = time.monotonic()

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] in ("http.response.start", "websocket.accept"):
                status = message.get("status", 101)
                headers = [(k, v) for k, v in message.get("headers", []) if k.lower() != HEADER]
                message = {**message, "headers": [*headers, (HEADER, request_id.encode())]}
            elif message["type"] == "websocket.close" and status == 500:
                status = 403  # closed before it was accepted: the server answers 403
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            _access(scope, status, started)


def _given(scope: Scope) -> str | None:
    """The client's X-Request-ID, if it is safe to log and to send back."""
    for name, value in scope["headers"]:
        if name == HEADER:
            if 0 < len(value) <= MAX_LENGTH and all(0x21 <= c <= 0x7E for c in value):
                return bytes(value).decode("ascii")
            return None
    return None


def _access(scope: Scope, status: int, started: float) -> None:
    method = scope.get("method", "GET")  # a WebSocket's scope has none: its handshake is a GET
    path = scope["path"]
    level = logging.DEBUG if path in _QUIET else logging.INFO
    log.log(
        level,
        "%s %s %d",
        method,
        path,
        status,
        extra={
            "method": method,
            "path": path,
            "status": status,
            "duration_ms": round((time.monotonic() - started) * 1000, 3),
        },
    )


class NoServerAccessLines(logging.Filter):
    """Drop uvicorn's own line for each WebSocket handshake (it logs those even without its
    access log): it carries the query string, and so a browser's `?token=`. The access line
    above replaces it."""

    def filter(self, record: logging.LogRecord) -> bool:
        return '"WebSocket %s"' not in str(record.msg)
