"""Execs: run a process in a sandbox (waiting, detached or streamed), list, get, signal."""

from __future__ import annotations

from collections.abc import AsyncIterator

from fastapi import APIRouter, Request, Response
from fastapi.responses import StreamingResponse

from api.deps import Service
from api.problems import documented, invalid
from api.schemas import ExecExit, ExecList, ExecOutput
from daemon.models import Exec, ExecCreate, SignalRequest

router = APIRouter(prefix="/sandboxes/{ref}", tags=["execs"])

NDJSON = "application/x-ndjson"


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
        },
        202: {"model": Exec, "description": "Started; the Exec is `running`."},
        **documented(400, 401, 404, 409, 413, 415, 422),
    },
)
async def create(
    ref: str, spec: ExecCreate, service: Service, request: Request, response: Response
) -> Exec | Response:
    execution = await service.exec(ref, spec)
    if not spec.wait:
        response.status_code = 202
        return execution
    if _accepts(request, NDJSON):
        return StreamingResponse(_as_ndjson(execution), media_type=NDJSON)
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
    responses=documented(400, 401, 404, 409, 413, 415, 422),
)
async def signal(ref: str, exec_id: str, body: SignalRequest, service: Service) -> Exec:
    try:
        number = body.number()
    except ValueError as exc:
        raise invalid(("body", "signal"), str(exc)) from exc
    return await service.signal_exec(ref, exec_id, number)


def _accepts(request: Request, media_type: str) -> bool:
    for item in request.headers.get("accept", "").split(","):
        media, *params = (part.strip().lower() for part in item.split(";"))
        if media == media_type and "q=0" not in params:
            return True
    return False


async def _as_ndjson(execution: Exec) -> AsyncIterator[bytes]:
    # The service hands back a finished Exec, so its output comes as one line per stream;
    # live chunks need a streaming method on SandboxService, which it does not have yet.
    for stream in ("stdout", "stderr"):
        data = getattr(execution, stream)
        if data:
            yield ExecOutput(stream=stream, data=data).model_dump_json().encode() + b"\n"
    yield ExecExit(exit=execution).model_dump_json().encode() + b"\n"
