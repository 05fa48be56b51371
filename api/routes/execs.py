"""Execs: run a process in a sandbox (waiting, detached or streamed), list, get, signal."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

from fastapi import APIRouter, Request, Response, WebSocket, WebSocketDisconnect
from fastapi.responses import StreamingResponse
from pydantic import ValidationError

from api.auth import WS_PROTOCOL
from api.deps import Service
from api.problems import documented, invalid
from api.schemas import ExecList
from daemon.errors import SandboxError
from daemon.shapes import (
    AttachMessage,
    Exec,
    ExecCreate,
    ExecExit,
    ExecOutput,
    SandboxService,
    SignalRequest,
)

router = APIRouter(prefix="/sandboxes/{ref}", tags=["execs"])

NDJSON = "application/x-ndjson"

# OpenAPI links: what a client (or a stateful test) can do next with the exec it started.
_THIS_EXEC = {"ref": "$response.body#/sandbox_id", "exec_id": "$response.body#/id"}
EXEC_LINKS = {
    name: {"operationId": operation, "parameters": _THIS_EXEC, "description": description}
    for name, operation, description in (
        ("get", "execs_get", "Get the exec."),
        ("signal", "execs_signal", "Send it a signal."),
        ("output", "execs_output", "Its output as NDJSON."),
    )
}


@router.post(
    "/exec",
    name="create",
    response_model=Exec,
    summary="Run a process in a running sandbox",
    description="`wait` true: 200 with the finished Exec, or with `Accept: application/x-ndjson` "
    'a stream of `{"stream": "stdout"|"stderr", "data": ...}` lines ending with '
    '`{"exit": Exec}`. `wait` false: 202 at once with the running Exec (its `pid` set).',
    responses={
        200: {
            "description": "The finished Exec (or, asked for NDJSON, its output as lines).",
            "content": {NDJSON: {"schema": {"type": "string"}}},
            "links": EXEC_LINKS,
        },
        202: {
            "model": Exec,
            "description": "Started; the Exec is `running`.",
            "links": EXEC_LINKS,
        },
        **documented(400, 401, 404, 409, 413, 415, 422, 504),
    },
)
async def create(
    ref: str, spec: ExecCreate, service: Service, request: Request, response: Response
) -> Exec | Response:
    if spec.wait and _accepts(request, NDJSON):
        started = await service.exec(ref, spec.model_copy(update={"wait": False}))
        events = service.follow(ref, started.id, follow=True)
        return StreamingResponse(_as_ndjson(events), media_type=NDJSON)
    execution = await service.exec(ref, spec)
    if not spec.wait:
        response.status_code = 202
    return execution


@router.get(
    "/execs",
    name="list",
    summary="List a sandbox's execs, oldest first",
    responses=documented(401, 404),
)
async def list_execs(ref: str, service: Service) -> ExecList:
    return ExecList(items=await service.list_execs(ref))


@router.get("/execs/{exec_id}", name="get", summary="Get an exec", responses=documented(401, 404))
async def get(ref: str, exec_id: str, service: Service) -> Exec:
    return await service.get_exec(ref, exec_id)


@router.post(
    "/execs/{exec_id}/signal",
    name="signal",
    status_code=202,
    summary="Send a signal to a running exec",
    description="202 with the Exec as it stands (the signal may not have landed yet).",
    responses=documented(400, 401, 404, 409, 413, 415, 422, 504),
)
async def signal(ref: str, exec_id: str, body: SignalRequest, service: Service) -> Exec:
    try:
        number = body.number()
    except ValueError as exc:
        raise invalid(("body", "signal"), str(exc)) from exc
    return await service.signal_exec(ref, exec_id, number)


@router.get(
    "/execs/{exec_id}/output",
    name="output",
    summary="An exec's output as NDJSON, from its start",
    description='Lines `{"stream": "stdout"|"stderr", "data": ...}` with the output '
    'so far, then `{"exit": Exec}` if the exec has ended. With `follow=true` the stream '
    "stays open and carries the output as it comes, until the exec ends.",
    response_class=StreamingResponse,
    responses={
        200: {"content": {NDJSON: {"schema": {"type": "string"}}}, "description": "NDJSON"},
        **documented(401, 404, 422),
    },
)
async def output(ref: str, exec_id: str, service: Service, follow: bool = False) -> Response:
    await service.get_exec(ref, exec_id)  # a 404 before the stream starts
    events = service.follow(ref, exec_id, follow=follow)
    return StreamingResponse(_as_ndjson(events), media_type=NDJSON)


OCTETS = "application/octet-stream"
_RAW = {
    200: {
        "content": {OCTETS: {"schema": {"type": "string", "format": "binary"}}},
        "description": "The bytes kept, exactly, whatever the exec's `encoding`.",
    },
    **documented(401, 404),
}


@router.get(
    "/execs/{exec_id}/stdout",
    name="stdout",
    summary="An exec's stdout, the exact bytes kept",
    description="What `stdout` holds (up to the output limit), as raw bytes; so far, for a "
    "running exec.",
    response_class=StreamingResponse,
    responses=_RAW,
)
async def stdout(ref: str, exec_id: str, service: Service) -> Response:
    return StreamingResponse(service.exec_output(ref, exec_id, "stdout"), media_type=OCTETS)


@router.get(
    "/execs/{exec_id}/stderr",
    name="stderr",
    summary="An exec's stderr, the exact bytes kept",
    description="What `stderr` holds (up to the output limit), as raw bytes; so far, for a "
    "running exec.",
    response_class=StreamingResponse,
    responses=_RAW,
)
async def stderr(ref: str, exec_id: str, service: Service) -> Response:
    return StreamingResponse(service.exec_output(ref, exec_id, "stderr"), media_type=OCTETS)


@router.websocket("/execs/{exec_id}/attach", name="attach")
async def attach(websocket: WebSocket, ref: str, exec_id: str) -> None:
    """Interactive exec over a WebSocket (see README): output out, input and resizes in.

    Server → client: text messages `{"stream", "data"}`, and last `{"exit": Exec}`.
    Client → server: binary messages (bytes for stdin), or text messages `{"stdin": str}`,
    `{"eof": true}`, `{"resize": {"rows": int, "cols": int}}`.
    A browser offers the subprotocol `sandboxd` (beside its token, see api.auth): a browser
    drops a connection whose server does not pick one of the subprotocols it offered.
    """
    service: SandboxService = websocket.app.state.service
    offered = websocket.scope.get("subprotocols", [])
    await websocket.accept(subprotocol=WS_PROTOCOL if WS_PROTOCOL in offered else None)
    try:
        await service.get_exec(ref, exec_id)
    except SandboxError as exc:
        await websocket.send_json({"error": {"status": exc.status, "detail": exc.detail}})
        await websocket.close(code=1008)
        return
    pump = asyncio.create_task(_pump_input(websocket, service, ref, exec_id))
    try:
        async for event in service.follow(ref, exec_id, follow=True):
            await websocket.send_text(event.model_dump_json())
        await websocket.close()
    except WebSocketDisconnect:
        pass
    finally:
        pump.cancel()
        with contextlib.suppress(asyncio.CancelledError, WebSocketDisconnect):
            await pump


async def _pump_input(
    websocket: WebSocket, service: SandboxService, ref: str, exec_id: str
) -> None:
    """What the client sends, to the exec: until it disconnects or the exec ends."""
    while True:
        message = await websocket.receive()
        if message["type"] == "websocket.disconnect":
            return
        try:
            if message.get("bytes") is not None:
                await service.send_input(ref, exec_id, message["bytes"], eof=False)
                continue
            control = AttachMessage.model_validate_json(message.get("text") or "{}")
            if control.stdin is not None:
                await service.send_input(ref, exec_id, control.stdin.encode(), eof=False)
            if control.resize is not None:
                await service.resize(ref, exec_id, control.resize.rows, control.resize.cols)
            if control.eof:
                await service.send_input(ref, exec_id, b"", eof=True)
        except ValidationError as exc:
            await websocket.send_json({"error": {"status": 422, "detail": str(exc)}})
        except SandboxError:
            return  # it ended: the output side closes the socket with the exit


def _accepts(request: Request, media_type: str) -> bool:
    for item in request.headers.get("accept", "").split(","):
        media, *params = (part.strip().lower() for part in item.split(";"))
        if media == media_type and "q=0" not in params:
            return True
    return False


async def _as_ndjson(events: AsyncIterator[ExecOutput | ExecExit]) -> AsyncIterator[bytes]:
    async for event in events:
        yield event.model_dump_json().encode() + b"\n"
