"""Every error the API answers, as RFC 9457 problem details: the one place errors become HTTP.

SandboxError subclasses carry their own status, title and slug. Validation failures are 422,
except a body that is not JSON at all (400) or not sent as JSON (415). Unknown routes and
methods, and anything unexpected (500, without a traceback), are problems too; a 500 is also
logged, with its traceback and the request's id.
"""

from __future__ import annotations

import http
import logging
from collections.abc import Mapping, Sequence
from contextvars import ContextVar
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

from api.schemas import Problem, ValidationIssue
from daemon.errors import SandboxError

log = logging.getLogger(__name__)

PROBLEM_MEDIA_TYPE = "application/problem+json"
PROBLEM_TYPE_BASE = "https://sandboxd.dev/problems/"

# What each documented problem status means in this API, for openapi.json.
DESCRIPTIONS = {
    400: "The body is not valid JSON.",
    401: "Missing or wrong bearer token.",
    404: "No such sandbox or exec.",
    409: "Conflict with the current state: a name in use, or a sandbox or exec not running.",
    413: "The request body is over the configured limit.",
    415: "The body was not sent as application/json.",
    422: "The body or query is well-formed but breaks the schema or a rule.",
    507: "The write would take the sandbox past its disk limit; nothing partial is left.",
    502: "A registry refused the pull, could not be reached, or sent what its digests do not "
    "match.",
    503: "The daemon is at its configured sandbox limit.",
    504: "The sandbox's supervisor did not answer within supervisor_timeout (it is stopped or "
    "overloaded); see docs/supervisor-deadlines.md.",
}
_MAX_DETAILED_ISSUES = 5
_FASTAPI_422 = "#/components/schemas/HTTPValidationError"


class ProblemResponse(JSONResponse):
    media_type = PROBLEM_MEDIA_TYPE


def problem(
    status: int,
    slug: str,
    detail: str,
    *,
    title: str | None = None,
    errors: Sequence[ValidationIssue] | None = None,
    headers: Mapping[str, str] | None = None,
) -> ProblemResponse:
    """A problem+json response; `slug` names the problem type under PROBLEM_TYPE_BASE."""
    body = Problem(
        type=PROBLEM_TYPE_BASE + slug,
        title=title or http.HTTPStatus(status).phrase,
        status=status,
        detail=detail,
        errors=list(errors) if errors is not None else None,
    )
    return ProblemResponse(body.model_dump(exclude_none=True), status_code=status, headers=headers)


def invalid(loc: tuple[str | int, ...], msg: str) -> RequestValidationError:
    """A 422 for a rule a route checks itself, shaped like pydantic's own errors."""
    return RequestValidationError([{"type": "value_error", "loc": loc, "msg": msg, "input": None}])


def documented(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """The `responses=` entries of a route for these problem statuses."""
    return {s: {"model": Problem, "description": DESCRIPTIONS[s]} for s in statuses}


def use_problem_media_type(openapi: dict[str, Any]) -> dict[str, Any]:
    """Rewrite the documented error responses' content to application/problem+json.

    FastAPI files every `responses=` model under application/json; clients (and generated
    ones) should see the media type the API really answers with.
    """
    for path_item in openapi.get("paths", {}).values():
        for operation in path_item.values():
            responses = operation.get("responses", {})
            # FastAPI's own 422 (HTTPValidationError) on routes that only take path parameters:
            # strings that cannot fail, and not the shape this API answers with anyway.
            if _FASTAPI_422 in str(responses.get("422")):
                del responses["422"]
            for status, response in responses.items():
                content = response.get("content", {})
                if status[:1] in "45" and "application/json" in content:
                    content[PROBLEM_MEDIA_TYPE] = content.pop("application/json")
    schemas = openapi.get("components", {}).get("schemas", {})
    for unused in ("HTTPValidationError", "ValidationError"):
        schemas.pop(unused, None)
    return openapi


def install(app: FastAPI) -> None:
    """Register the exception handlers that turn every error into a problem."""
    app.add_exception_handler(SandboxError, _sandbox_error)  # type: ignore[arg-type]
    app.add_exception_handler(RequestValidationError, _validation_error)  # type: ignore[arg-type]
    app.add_exception_handler(StarletteHTTPException, _http_error)  # type: ignore[arg-type]
    app.add_exception_handler(Exception, _unexpected)


def sandbox_problem(exc: SandboxError) -> ProblemResponse:
    """The answer to a SandboxError: its own status, slug, title and detail."""
    return problem(exc.status, exc.slug, exc.detail, title=exc.title)


async def _sandbox_error(_request: Request, exc: SandboxError) -> ProblemResponse:
    return sandbox_problem(exc)


async def _validation_error(request: Request, exc: RequestValidationError) -> ProblemResponse:
    issues = [_issue(e) for e in exc.errors()]
    content_type = request.headers.get("content-type")
    body_issues = [i for i in issues if i.loc[:1] == ["body"]]
    if any(i.type == "json_invalid" for i in issues):
        detail = "; ".join(i.msg for i in issues if i.type == "json_invalid")
        return problem(400, "invalid-json", detail, title="Malformed JSON", errors=issues)
    if body_issues and content_type is not None and not is_json(content_type):
        detail = f"the body must be sent as application/json, not {content_type}"
        return problem(415, "unsupported-media-type", detail)
    if any(i.loc == ["body"] and i.type == "missing" for i in issues):
        detail = "the request needs a JSON body, and it was empty"
        return problem(400, "invalid-json", detail, title="Malformed JSON", errors=issues)
    shown = [f"{_where(i.loc)}: {i.msg}" for i in issues[:_MAX_DETAILED_ISSUES]]
    more = len(issues) - len(shown)
    detail = "; ".join(shown) + (f"; and {more} more" if more > 0 else "")
    return problem(422, "validation", detail, title="Invalid request", errors=issues)


async def _http_error(request: Request, exc: StarletteHTTPException) -> ProblemResponse:
    if exc.status_code == 404:
        detail = f"no route for {request.method} {request.url.path}"
    elif exc.status_code == 405:
        detail = f"{request.method} is not allowed on {request.url.path}"
    else:
        detail = str(exc.detail)
    headers = dict(exc.headers or {})
    if exc.status_code == 405:
        headers["Allow"] = ", ".join(_allowed_methods(request))
    slug = http.HTTPStatus(exc.status_code).phrase.lower().replace(" ", "-")
    return problem(exc.status_code, slug, detail, headers=headers)


def _allowed_methods(request: Request) -> list[str]:
    """Every method some route takes on this path; Starlette names only the first route's."""
    allowed = []
    for method in ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE"):
        probe = {**request.scope, "method": method}
        if any(route.matches(probe)[0] == Match.FULL for route in request.app.router.routes):
            allowed.append(method)
    return allowed


async def _unexpected(request: Request, exc: Exception) -> ProblemResponse:
    # The log has the traceback, with the request's id (still bound: this handler runs in the
    # request's task, outside the middleware that bound it); the client learns only that it
    # happened, and the id to look for.
    log.error("unexpected error on %s %s", request.method, request.url.path, exc_info=exc)
    _logged.set(exc)
    request_id = request.scope.get("state", {}).get("request_id")
    headers = {"X-Request-ID": request_id} if request_id else None
    detail = "an unexpected error occurred; the daemon's log has details"
    return problem(500, "internal", detail, headers=headers)


# The exception whose traceback _unexpected has logged, in the request's own context.
_logged: ContextVar[BaseException | None] = ContextVar("logged_exception", default=None)


class LoggedOnce(logging.Filter):
    """Drop the server's own line for an exception that the 500 handler has logged: Starlette
    re-raises it after the answer, and uvicorn would log the same traceback again, without
    the request's context. (Exceptions it did not log, such as a WebSocket's, still pass.)"""

    def filter(self, record: logging.LogRecord) -> bool:
        logged = _logged.get()
        return logged is None or record.exc_info is None or record.exc_info[1] is not logged


def _issue(error: Any) -> ValidationIssue:
    loc = [p if isinstance(p, int) else str(p) for p in error.get("loc", ())]
    msg = str(error.get("msg", "invalid"))
    error_type = str(error.get("type", "value_error"))
    if error_type == "json_invalid":
        ctx = error.get("ctx") or {}
        position = loc[1] if len(loc) > 1 else None
        msg = f"the body is not valid JSON: {ctx.get('error', msg)}"
        msg += f" at position {position}" if position is not None else ""
    return ValidationIssue(loc=loc, msg=msg.removeprefix("Value error, "), type=error_type)


def _where(loc: list[str | int]) -> str:
    parts = loc[1:] if len(loc) > 1 and loc[0] in ("body", "query", "path") else loc
    return ".".join(str(p) for p in parts) if parts else "body"


def is_json(content_type: str) -> bool:
    media = content_type.split(";", 1)[0].strip().lower()
    return media == "application/json" or (
        media.startswith("application/") and media.endswith("+json")
    )
