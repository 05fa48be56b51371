"""The three requests of a sandbox's life, answered as pure ASGI: create, exec, delete.

The routes in api/routes/ stay what the OpenAPI document describes and what answers every
request these paths do not take. A path here takes a request its route would answer plainly,
and answers it as the route would, without FastAPI's router, dependency solving, request
object and response re-validation (a sixth of the daemon's CPU per exec):

- `POST /sandboxes` with no Idempotency-Key, its body empty or a SandboxCreate;
- `POST /sandboxes/{ref}/exec` with an ExecCreate, not asking for NDJSON (the streamed answer);
- `DELETE /sandboxes/{ref}`;

each with no query string, and a body whose Content-Type is JSON or absent (the routes read a
body without one as JSON). Anything else, a body that does not validate included, is handed
on to FastAPI with the body it sent (read once, given again), so that every error is the
route's own problem+json. A SandboxError from the service is answered as problems.py answers
it. This sits inside the request id, authentication and body limit middlewares: it sees what
the routes would see. tests/api/test_fast_paths.py checks that both answer alike.
"""

from __future__ import annotations

import json
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

from pydantic import BaseModel
from starlette.responses import JSONResponse, Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api.problems import is_json, sandbox_problem
from api.routes.execs import NDJSON
from daemon.errors import SandboxError
from daemon.shapes import ExecCreate, SandboxCreate, SandboxService

M = TypeVar("M", bound=BaseModel)
_IDEMPOTENCY_KEY = b"idempotency-key"


@dataclass
class Answer:
    status: int
    model: BaseModel | None = None
    headers: dict[str, str] | None = None


# What a path does with the service, the sandbox reference (None for a create) and the body:
# its answer, or None when the body is not one it takes (the route answers instead).
Handler = Callable[[SandboxService, str | None, bytes], Awaitable[Answer | None]]


async def _create(service: SandboxService, _ref: str | None, body: bytes) -> Answer | None:
    spec = _parsed(SandboxCreate, body, empty_is=SandboxCreate())
    if spec is None:
        return None
    sandbox = await service.create(spec, None)
    return Answer(201, sandbox, {"Location": f"/sandboxes/{sandbox.id}"})


async def _exec(service: SandboxService, ref: str | None, body: bytes) -> Answer | None:
    spec = _parsed(ExecCreate, body)
    if spec is None or ref is None:
        return None
    return Answer(200 if spec.wait else 202, await service.exec(ref, spec))


async def _delete(service: SandboxService, ref: str | None, _body: bytes) -> Answer | None:
    if ref is None:
        return None
    await service.destroy(ref)
    return Answer(204)


_PATHS: list[tuple[str, re.Pattern[str], Handler]] = [
    ("POST", re.compile(r"/sandboxes"), _create),
    ("POST", re.compile(r"/sandboxes/([^/]+)/exec"), _exec),
    ("DELETE", re.compile(r"/sandboxes/([^/]+)"), _delete),
]


class FastPaths:
    def __init__(self, app: ASGIApp, service: Callable[[], SandboxService]) -> None:
        self.app = app
        self.service = service

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        taken = _taken(scope)
        if taken is None:
            await self.app(scope, receive, send)
            return
        handler, ref = taken
        body, messages = await _read_body(receive)
        try:
            answer = None if body is None else await handler(self.service(), ref, body)
        except SandboxError as exc:
            await sandbox_problem(exc)(scope, receive, send)
            return
        if answer is None:  # the route's own answer: its 400, 413 or 422, or a gone client
            await self.app(scope, _replay(messages, receive), send)
            return
        await _response(answer)(scope, receive, send)


def _taken(scope: Scope) -> tuple[Handler, str | None] | None:
    """The handler and sandbox reference of a request a path here answers, else None."""
    if scope["type"] != "http" or scope["query_string"]:
        return None
    matched = _match(scope["method"], scope["path"])
    if matched is None:
        return None
    handler, found = matched
    for name, value in scope["headers"]:
        if name == b"content-type" and not is_json(value.decode("latin-1")):
            return None
        if name == b"accept" and handler is _exec and NDJSON in value.decode("latin-1").lower():
            return None
        if name == _IDEMPOTENCY_KEY and handler is _create:
            return None
    # scope["path"] is decoded already, and the routes take their {ref} from it as it is.
    return handler, found[1] if found.groups() else None


def _match(method: str, path: str) -> tuple[Handler, re.Match[str]] | None:
    for own_method, pattern, handler in _PATHS:
        found = pattern.fullmatch(path) if method == own_method else None
        if found is not None:
            return handler, found
    return None


def _parsed(model: type[M], body: bytes, empty_is: M | None = None) -> M | None:
    """The body as FastAPI reads one (json.loads, then the model in Python mode), or None if
    it is not a valid one."""
    if not body and empty_is is not None:
        return empty_is
    try:
        return model.model_validate(json.loads(body))
    except ValueError:  # invalid JSON, or a ValidationError (a ValueError too)
        return None


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


def _response(answer: Answer) -> Response:
    """As FastAPI answers with a response model (its JSONResponse), or with no body."""
    if answer.model is None:
        return Response(status_code=answer.status, headers=answer.headers)
    content = answer.model.model_dump(mode="json", by_alias=True)
    return JSONResponse(content, status_code=answer.status, headers=answer.headers)
