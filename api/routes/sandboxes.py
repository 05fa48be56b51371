"""Sandboxes: create, list (filtered by state and labels), get by id or name, delete; their
resource usage, their time to live, and their main command's log."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta, timezone
from typing import Annotated, Any

from fastapi import APIRouter, Body, Header, Query, Response
from fastapi.responses import StreamingResponse
from pydantic import StringConstraints

from api.deps import Service
from api.problems import documented, invalid
from api.schemas import SandboxList
from daemon.lifecycle.states import SandboxState
from daemon.shapes import (
    Encoding,
    LogLine,
    LogQuery,
    LogStream,
    Sandbox,
    SandboxCreate,
    SandboxStats,
    TtlUpdate,
)

router = APIRouter(prefix="/sandboxes", tags=["sandboxes"])

# `[\s\S]`, not `.`: a value may hold a newline, and `.` skips it in ECMA-262 and in Rust.
LabelFilter = Annotated[str, StringConstraints(pattern=r"^[^=]+=[\s\S]*$")]

# OpenAPI links: what a client (or a stateful test) can do next with the sandbox it made.
_THIS_SANDBOX = {"ref": "$response.body#/id"}
SANDBOX_LINKS = {
    name: {"operationId": operation, "parameters": _THIS_SANDBOX, "description": description}
    for name, operation, description in (
        ("get", "sandboxes_get", "Get the sandbox."),
        ("delete", "sandboxes_delete", "Delete the sandbox."),
        ("stats", "sandboxes_stats", "Its resource usage."),
        ("set_ttl", "sandboxes_set_ttl", "Set when it expires."),
        ("exec", "execs_create", "Run a process in it."),
        ("execs", "execs_list", "List its execs."),
        ("logs", "sandboxes_logs", "Its main command's log."),
    )
}

IDEMPOTENCY_KEY: dict[str, Any] = {
    "alias": "Idempotency-Key",
    "min_length": 1,
    "max_length": 255,
    "pattern": r"^[\x20-\x7e]+$",  # printable ASCII
    "description": "Makes a retried create safe: the same key with the same body within 24 "
    "hours answers 201 with the sandbox it made (as it is now) instead of making another; "
    "with another body 422; if that sandbox has been deleted since, 409. Requests with one "
    "key run one at a time. A create that fails does not use up its key. At most 255 "
    "printable ASCII characters, e.g. a UUID.",
}


@router.post(
    "",
    name="create",
    status_code=201,
    summary="Create and start a sandbox",
    description="201 with the sandbox, `running` (or already `exited` if its cmd ended at once). "
    "The Location header names the new sandbox. Every field is optional, and so is the body.",
    responses={
        201: {"description": "Created.", "links": SANDBOX_LINKS},
        **documented(400, 401, 409, 413, 415, 422, 503),
    },
)
async def create(
    service: Service,
    response: Response,
    spec: Annotated[SandboxCreate, Body(default_factory=SandboxCreate)],
    idempotency_key: Annotated[str | None, Header(**IDEMPOTENCY_KEY)] = None,
) -> Sandbox:
    sandbox = await service.create(spec, idempotency_key)
    response.headers["Location"] = f"/sandboxes/{sandbox.id}"
    return sandbox


@router.get("", name="list", summary="List sandboxes, oldest first", responses=documented(401, 422))
async def list_sandboxes(
    service: Service,
    state: Annotated[
        list[SandboxState], Query(description="Only sandboxes in one of these states.")
    ] = [],  # noqa: B006 (FastAPI copies defaults)
    label: Annotated[
        list[LabelFilter], Query(description="`key=value`; a sandbox must match every one.")
    ] = [],  # noqa: B006
) -> SandboxList:
    labels: dict[str, str] = {}
    for pair in label:
        key, _, value = pair.partition("=")
        if labels.setdefault(key, value) != value:
            return SandboxList(items=[])  # one key, two values: nothing matches both
    return SandboxList(items=await service.list(list(dict.fromkeys(state)), labels))


@router.get(
    "/{ref}", name="get", summary="Get a sandbox by id or name", responses=documented(401, 404)
)
async def get(ref: str, service: Service) -> Sandbox:
    return await service.get(ref)


@router.delete(
    "/{ref}",
    name="delete",
    status_code=204,
    response_class=Response,
    summary="Kill a sandbox and remove everything made for it",
    responses=documented(401, 404),
)
async def delete(ref: str, service: Service) -> None:
    await service.destroy(ref)


@router.get(
    "/{ref}/stats",
    name="stats",
    summary="A running sandbox's resource usage, from its cgroups",
    description="Memory now and at its peak, CPU time, processes now and at their peak, and "
    "OOM kills, read from the sandbox's cgroups at the time of the request. 409 if the "
    "sandbox is not running.",
    responses=documented(401, 404, 409),
)
async def stats(ref: str, service: Service) -> SandboxStats:
    return await service.stats(ref)


@router.post(
    "/{ref}/ttl",
    name="set_ttl",
    summary="Set when a sandbox expires",
    description="The sandbox is destroyed `ttl_seconds` from now, whatever its expiry was "
    "(earlier or later), or never with `null`; 200 with the sandbox and its new `expires_at`. "
    "409 if it has already expired and is being destroyed.",
    responses=documented(400, 401, 404, 409, 413, 415, 422),
)
async def set_ttl(ref: str, body: TtlUpdate, service: Service) -> Sandbox:
    return await service.set_ttl(ref, body.ttl_seconds)


NDJSON = "application/x-ndjson"


@router.get(
    "/{ref}/logs",
    name="logs",
    summary="The main command's log, as NDJSON",
    description='Lines `{"stream": "stdout"|"stderr", "data": ..., "time": ...}`, oldest '
    "first: what the log keeps of the sandbox's `cmd` (the last `log_limit` bytes of each "
    "stream), while it runs, after it ends, and after a daemon restart, until the sandbox is "
    "deleted. A line is a line of output, or the part of one read at once. With "
    "`follow=true` the response stays open and carries lines as they come, until the "
    "command ends.",
    response_class=StreamingResponse,
    responses={
        200: {"content": {NDJSON: {"schema": {"type": "string"}}}, "description": "NDJSON"},
        **documented(401, 404, 422),
    },
)
async def logs(
    ref: str,
    service: Service,
    follow: bool = False,
    tail: Annotated[
        int | None, Query(ge=0, description="Only the last N lines (after the other filters).")
    ] = None,
    since: Annotated[
        str | None,
        Query(
            description="Only lines read at or after this time (RFC 3339, with its offset).",
            json_schema_extra={"format": "date-time"},
        ),
    ] = None,
    stream: Annotated[LogStream | None, Query(description="Only this stream.")] = None,
    encoding: Annotated[
        Encoding, Query(description="`base64`: `data` is base64 of the exact bytes.")
    ] = "utf-8",
) -> Response:
    after = None if since is None else _rfc3339(since)
    lines = service.logs(
        ref, LogQuery(follow=follow, tail=tail, since=after, stream=stream, encoding=encoding)
    )
    return StreamingResponse(_as_ndjson(lines), media_type=NDJSON)


_RFC3339 = re.compile(
    r"(\d{4})-(\d{2})-(\d{2})[Tt](\d{2}):(\d{2}):(\d{2})(?:\.(\d+))?(?:([Zz])|([+-])(\d{2}):(\d{2}))"
)


def _rfc3339(value: str) -> datetime:
    """An RFC 3339 date-time, exactly: pydantic's would take a bare number as epoch seconds."""
    found = _RFC3339.fullmatch(value)
    try:
        if found is None:
            raise ValueError("not of the form 2026-12-05T19:46:12.358395Z")
        year, month, day, hour, minute, second, fraction, utc, sign, zh, zm = found.groups()
        if int(zh or 0) > 23 or int(zm or 0) > 59:
            raise ValueError("an offset past 23:59")
        offset = timedelta(hours=int(zh or 0), minutes=int(zm or 0))
        zone = timezone(-offset if sign == "-" else offset)
        micros = int((fraction or "0")[:6].ljust(6, "0"))
        y, mo, d, h, mi, sec = (int(part) for part in (year, month, day, hour, minute, second))
        when = datetime(y, mo, d, h, mi, sec, micros, tzinfo=UTC if utc else zone)
    except ValueError as exc:
        raise invalid(("query", "since"), f"since must be an RFC 3339 date-time: {exc}") from None
    return when.astimezone(UTC)


async def _as_ndjson(lines: AsyncIterator[LogLine]) -> AsyncIterator[bytes]:
    async for line in lines:
        yield line.model_dump_json().encode() + b"\n"
