"""The daemon's log: every line, ours and uvicorn's, goes through one structlog formatter and
comes out as text or as JSON, with a time, a level, a logger and the ids bound to its context.

Runs in: the daemon process. `configure` is called by the `serve` command before anything logs.

The code logs through the standard library (`logging.getLogger(__name__)`), so that uvicorn's,
Alembic's and our lines are one stream: structlog's `ProcessorFormatter` renders them all. The
ids that belong on a line (request_id, sandbox_id, exec_id) are not passed to each call but
bound to the context (structlog.contextvars): a request's middleware binds its request id, a
lifecycle step its sandbox's id, and every line logged while that context is current carries
them. Fields of a single line travel in `extra=`.
"""

from __future__ import annotations

import contextvars
import logging
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, TextIO

import structlog

# What every line gets, whichever logger made it: the bound ids, the level, the logger's name,
# the time (RFC 3339, UTC, microseconds), and the fields of `extra=` (but uvicorn's copy of
# its message with terminal colours).
_SHARED: list[Any] = [
    structlog.contextvars.merge_contextvars,
    structlog.stdlib.add_log_level,
    structlog.stdlib.add_logger_name,
    structlog.processors.TimeStamper(fmt="iso", utc=True, key="time"),
    structlog.stdlib.ExtraAdder(),
    lambda _logger, _method, event: {k: v for k, v in event.items() if k != "color_message"},
]


def configure(level: str = "info", fmt: str = "text", stream: TextIO | None = None) -> None:
    """Send every logger's lines at `level` or above to `stream` (stderr), rendered as `fmt`."""
    renderer: list[Any]
    if fmt == "json":
        # The traceback of a line logged with exc_info becomes its "exception" field.
        renderer = [
            structlog.processors.format_exc_info,
            _leading_fields,
            structlog.processors.JSONRenderer(),
        ]
    else:
        renderer = [
            structlog.dev.ConsoleRenderer(
                colors=False,
                pad_event_to=0,
                timestamp_key="time",
                exception_formatter=structlog.dev.plain_traceback,
            )
        ]
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=_SHARED,
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, *renderer],
    )
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    for old in list(root.handlers):  # configure may run twice: before the config, and after
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
    logging.getLogger("alembic.runtime.plugins").setLevel(logging.WARNING)  # one per plugin


def _leading_fields(_logger: Any, _method: str, event: dict[str, Any]) -> dict[str, Any]:
    """time, level, logger and event first: what a reader of the raw JSON looks for."""
    first = {key: event.pop(key) for key in ("time", "level", "logger", "event") if key in event}
    return first | event


def bind(**ids: str) -> None:
    """Put `ids` on every line the current task logs from now on (the task is a request's, or
    one that works on one sandbox: its end is the binding's end)."""
    structlog.contextvars.bind_contextvars(**ids)


def unbind(*names: str) -> None:
    structlog.contextvars.unbind_contextvars(*names)


@contextmanager
def bound(**ids: str) -> Iterator[None]:
    """Put `ids` on every line logged inside the block (and by the tasks it starts)."""
    with structlog.contextvars.bound_contextvars(**ids):
        yield


def only(**ids: str) -> None:
    """Start the current task's context afresh with `ids`: for a task that a request merely
    scheduled (a ttl timer), whose lines would otherwise carry that request's id."""
    structlog.contextvars.clear_contextvars()
    structlog.contextvars.bind_contextvars(**ids)


def context_of(**ids: str) -> contextvars.Context:
    """A context holding only `ids`, to start a long-lived task in (asyncio's `context=`)."""
    context = contextvars.Context()
    context.run(structlog.contextvars.bind_contextvars, **ids)
    return context
