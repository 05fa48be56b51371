"""POST /sandboxes/{ref}/exec, the request agents and CI jobs send most, answered as pure ASGI.

The route in api/routes/execs.py stays what the OpenAPI document describes and what answers
every request this path does not take. This path takes a request the route would answer with
an Exec as JSON, and answers it as the route would, without FastAPI's router, dependency
solving, request object and response re-validation (a third of the daemon's CPU per exec):

- a POST to exactly /sandboxes/{ref}/exec, with no query string;
- whose Content-Type is JSON or absent (the route reads a body without one as JSON);
- that does not ask for NDJSON (the streamed answer);
- whose body is an ExecCreate.

Anything else, a body that does not validate included, is handed on to FastAPI with the body
it sent (read once, given again), so that every error is the route's own problem+json. A
SandboxError from the service is answered as problems.py answers it. It sits inside the
request id, authentication and body limit middlewares: it sees what the route would see.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from urllib.parse import unquote

from pydantic import ValidationError
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api.problems import is_json, problem
from daemon.errors import SandboxError
from daemon.shapes import Exec, ExecCreate, SandboxService

_PATH = re.compile(r"/sandboxes/([^/]+)/exec")
_NDJSON = "application/x-ndjson"


class FastExec:
    def __init__(self, app: ASGIApp, service: Callable[[], SandboxService]) -> None:
        self.app = app
        self.service = service

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        found = _taken(scope)
        if found is None:
            await self.app(scope, receive, send)
            return
        body, messages = await _read_body(receive)
        try:  # as FastAPI reads a body: json.loads, then the model in Python mode
            spec = ExecCreate.model_validate(json.loads(body)) if body is not None else None
        except (ValueError, ValidationError):  # JSONDecodeError is a ValueError
            spec = None
        if spec is None:  # the route's own answer: its 400, 413 or 422, or a gone client
            await self.app(scope, _replay(messages, receive), send)
            return
        try:
            execution = await self.service().exec(unquote(found), spec)
        except SandboxError as exc:
            response = problem(exc.status, exc.slug, exc.detail, title=exc.title)
            await response(scope, receive, send)
            return
        await _send_json(send, 200 if spec.wait else 202, execution)


def _taken(scope: Scope) -> str | None:
    """The sandbox reference of a request this path answers, else None."""
    if scope["type"] != "http" or scope["method"] != "POST" or scope["query_string"]:
        return None
    found = _PATH.fullmatch(scope["path"])
    if found is None:
        return None
    for name, value in scope["headers"]:
        if name == b"content-type" and not is_json(value.decode("latin-1")):
            return None
        if name == b"accept" and _NDJSON in value.decode("latin-1").lower():
            return None
    return found[1]


async def _read_body(receive: Receive) -> tuple[bytes | None, list[Message]]:
    """The whole body (None if the client left first) and the messages it came in."""
    messages: list[Message] = []
    chunks: list[bytes] = []
    while True:
        message = await receive()
        messages.append(message)
        if message["type"] != "http.request":
            return None, messages
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            return b"".join(chunks), messages


def _replay(messages: list[Message], receive: Receive) -> Receive:
    pending = list(messages)

    async def replayed() -> Message:
        return pending.pop(0) if pending else await receive()

    return replayed


async def _send_json(send: Send, status: int, execution: Exec) -> None:
    """As FastAPI's JSONResponse renders a response model: compact, UTF-8, no NaN."""
    content = execution.model_dump(mode="json")
    body = json.dumps(content, ensure_ascii=False, allow_nan=False, separators=(",", ":"))
    encoded = body.encode()
    headers = [
        (b"content-length", str(len(encoded)).encode()),
        (b"content-type", b"application/json"),
    ]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": encoded})
