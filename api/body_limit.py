"""A cap on request bodies, as pure ASGI middleware: past `max_body` bytes the answer is 413.

A declared Content-Length over the cap is refused before a byte is read. A chunked body has no
declared length, so it is counted while the app reads it; once it passes the cap the app sees
the client as gone, whatever it would have answered is dropped, and the client gets the 413.

Uploads that are streamed to disk (a sandbox's files and tar archives: PUT on UNBOUNDED) are
exempt: they are never held in memory, and the sandbox's disk limit bounds them.
"""

from __future__ import annotations

import re

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api.problems import problem

# Uploads streamed to disk as they come, never held in memory: not bound by the cap.
UNBOUNDED = re.compile(r"^(PUT /sandboxes/[^/]+/(files|archive)|POST /images/import)$")


class BodyLimit:
    def __init__(self, app: ASGIApp, max_body: int) -> None:
        self.app = app
        self.max_body = max_body

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or UNBOUNDED.match(f"{scope['method']} {scope['path']}"):
            await self.app(scope, receive, send)
            return
        declared = _content_length(scope)
        if declared is not None and declared > self.max_body:
            await self._refuse(scope, receive, send)
            return

        received = 0
        exceeded = False
        started = False

        async def counting_receive() -> Message:
            nonlocal received, exceeded
            if exceeded:
                return {"type": "http.disconnect"}
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_body:
                    exceeded = True
                    return {"type": "http.disconnect"}
            return message

        async def guarded_send(message: Message) -> None:
            nonlocal started
            if exceeded and not started:
                return  # the app's answer to a body it never fully got
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counting_receive, guarded_send)
        except Exception:
            if not exceeded or started:
                raise
        if exceeded and not started:
            await self._refuse(scope, receive, send)

    async def _refuse(self, scope: Scope, receive: Receive, send: Send) -> None:
        detail = f"the request body is over the limit of {self.max_body} bytes"
        response = problem(413, "payload-too-large", detail, title="Payload too large")
        await response(scope, receive, send)


def _content_length(scope: Scope) -> int | None:
    for name, value in scope["headers"]:
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None  # the server rejects a malformed length before we see it
    return None
