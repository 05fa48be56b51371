"""Events: what happened to sandboxes, execs and images, as a Server-Sent Events stream that
resumes where a client left off (Last-Event-ID), or as one JSON list."""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncIterator
from typing import Annotated, Any

from fastapi import APIRouter, Header, Query
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field
from sse_starlette import EventSourceResponse, ServerSentEvent

from api.deps import Service
from api.problems import documented
from api.routes.sandboxes import LabelFilter
from daemon.errors import NotFound
from daemon.lifecycle.events import Event

router = APIRouter(tags=["events"])

# A follower whose socket takes no bytes for this long is let go, even with its queue not full:
# a stream ended (of a dropped follower) must not wait for a client that never reads.
SEND_TIMEOUT = 10.0
# The largest seq a client may name (SQLite's integers are 64-bit).
MAX_SEQ = 2**63 - 1
# A comment line this often: proxies and clients see the stream is alive while nothing happens.
PING_SECONDS = 15


class EventItem(BaseModel):
    """One event, as the `data:` of a stream's event and as an item of the JSON list. Besides
    the fields below, each type has its own: `name` and `labels` (of the sandbox), `state`,
    `exit` (sandbox.exited, .failed, .expired), `cmd` (exec.started), `exit_code`, `signal`,
    `timed_out`, `oom_killed`, `duration_seconds` (exec.exited), `victim` (sandbox.oom: main
    or exec)."""

    model_config = ConfigDict(extra="allow")

    seq: int = Field(description="Grows with each event, across restarts; the SSE `id:`.")
    time: str = Field(description="RFC 3339, UTC.")
    type: str = Field(description="e.g. sandbox.created; the SSE `event:`.")
    sandbox_id: str | None
    exec_id: str | None
    image_id: str | None


class EventList(BaseModel):
    items: list[EventItem] = Field(description="Oldest first.")


class _Filter:
    def __init__(self, types: list[str], sandbox: str | None, labels: list[str]) -> None:
        self.types = types
        self.sandbox = sandbox
        self.labels: dict[str, str] = {}
        self.impossible = False  # one key asked with two values: nothing matches both
        for pair in labels:
            key, _, value = pair.partition("=")
            self.impossible |= self.labels.setdefault(key, value) != value

    def matches(self, event: Event) -> bool:
        if self.impossible:
            return False
        if self.types and not any(event.type.startswith(prefix) for prefix in self.types):
            return False
        if self.sandbox is not None and self.sandbox not in (
            event.sandbox_id,
            event.data.get("name"),
        ):
            return False
        if self.labels:
            labels = event.data.get("labels") or {}
            return bool(self.labels.items() <= labels.items())
        return True


@router.get(
    "/events",
    name="stream",
    summary="Follow events (Server-Sent Events)",
    description="A `text/event-stream`: each event has `id:` (its seq), `event:` (its type) and "
    "`data:` (an EventItem as JSON). With `Last-Event-ID` (or `since`) the events kept after "
    "it (the last 10,000) come first, then live ones, with no gap and none twice. Without "
    "either, live events from now. `follow=false`: the events kept (after `since`) as one "
    "JSON list. A client more than `--event-queue` events behind is dropped (its stream ends): "
    "it reconnects with its last id.",
    response_model=EventList,
    responses={
        200: {
            "description": "The stream; with follow=false, the list.",
            "content": {"text/event-stream": {"schema": {"type": "string"}}},
        },
        **documented(401, 422),
    },
)
async def stream(
    service: Service,
    type: Annotated[
        list[str],
        Query(description="Only types starting with one of these (sandbox, exec.exited)."),
    ] = [],  # noqa: B006 (FastAPI copies a default list)
    sandbox: Annotated[
        str | None, Query(description="Only events of this sandbox (id or name).")
    ] = None,
    label: Annotated[
        list[LabelFilter],
        Query(description="KEY=VALUE: only events of sandboxes carrying every such label."),
    ] = [],  # noqa: B006
    since: Annotated[
        int | None,
        Query(ge=0, le=MAX_SEQ, description="Replay the events kept after this seq."),
    ] = None,
    follow: Annotated[bool, Query(description="false: a JSON list, then the end.")] = True,
    last_event_id: Annotated[
        str,
        Header(
            pattern=r"^[0-9]{0,18}$",
            description="The id of the last event a client saw: it overrides `since`.",
        ),
    ] = "",
) -> Any:
    if last_event_id:
        since = int(last_event_id)
    if sandbox is not None:
        with contextlib.suppress(NotFound):  # the id of the sandbox named so now, else as given
            sandbox = (await service.get(sandbox)).id
    wanted = _Filter(type, sandbox, label)
    if not follow:
        kept = await service.events_after(since or 0)
        items = [event.as_json() for event in kept if wanted.matches(event)]
        return JSONResponse({"items": items})
    return EventSourceResponse(
        _follow(service, wanted, since),
        ping=PING_SECONDS,
        send_timeout=SEND_TIMEOUT,
        headers={"X-Accel-Buffering": "no"},
    )


async def _follow(
    service: Service, wanted: _Filter, since: int | None
) -> AsyncIterator[ServerSentEvent]:
    """Kept events after `since`, then live ones. Subscribed before reading the store: an
    event committed meanwhile is in both, and is sent once (its seq is not above `last`);
    commits are in seq order, so a live event at or below `last` was in the replay."""
    live = service.subscribe_events()
    try:
        last = 0
        if since is not None:
            for event in await service.events_after(since):
                last = event.seq
                if wanted.matches(event):
                    yield _sse(event)
        while (news := await live.get()) is not None:
            if news.seq > last and wanted.matches(news):
                yield _sse(news)
    finally:
        live.close()


def _sse(event: Event) -> ServerSentEvent:
    data = json.dumps(event.as_json(), separators=(",", ":"))
    return ServerSentEvent(data=data, id=str(event.seq), event=str(event.type))
