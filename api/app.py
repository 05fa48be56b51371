"""The FastAPI application: routers, problem handlers, auth and body limit around a service."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from importlib.metadata import PackageNotFoundError, version
from typing import Any

from fastapi import FastAPI
from fastapi.routing import APIRoute

from api import problems
from api.auth import BearerAuth
from api.body_limit import BodyLimit
from api.request_id import RequestId
from api.routes import execs, sandboxes, system
from daemon.models import SandboxService

DESCRIPTION = """\
sandboxd hands out Linux sandboxes. Errors are RFC 9457 problem details
(`application/problem+json`). When the daemon has a token, every request but `GET /healthz`
needs `Authorization: Bearer <token>`.
"""
TAGS = [
    {"name": "system", "description": "The daemon itself."},
    {"name": "sandboxes", "description": "Sandboxes: isolated process trees with their own root."},
    {"name": "execs", "description": "Processes run inside a sandbox."},
]


def package_version() -> str:
    try:
        return version("sandboxd")
    except PackageNotFoundError:
        return "0.1.0"


def operation_id(route: APIRoute) -> str:
    """`<tag>_<name>`, e.g. sandboxes_create: what a generated client calls its methods."""
    return f"{route.tags[0]}_{route.name}"


def create_app(service: SandboxService, *, token: str | None, max_body: int) -> FastAPI:
    """The app serving `service`; it starts and stops the service with its own lifespan."""

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        await service.start()
        try:
            yield
        finally:
            await service.stop()

    app = FastAPI(
        title="sandboxd",
        version=package_version(),
        description=DESCRIPTION,
        openapi_tags=TAGS,
        lifespan=lifespan,
        generate_unique_id_function=operation_id,
        # A body sent without Content-Type is read as JSON; one sent as another type is a 415.
        strict_content_type=False,
    )
    app.state.service = service
    problems.install(app)
    for module in (system, sandboxes, execs):
        app.include_router(module.router)
    # The last middleware added runs first: authenticate before reading any body.
    app.add_middleware(BodyLimit, max_body=max_body)
    if token:
        app.add_middleware(BearerAuth, token=token)
    # Outermost: the request id is bound before anything logs, and goes on every answer.
    app.add_middleware(RequestId)
    app.openapi = _documented_openapi(app)  # type: ignore[method-assign]
    return app


def _documented_openapi(app: FastAPI) -> Callable[[], dict[str, Any]]:
    """FastAPI's document, plus the bearer scheme and the problem+json media type."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = FastAPI.openapi(app)
            schema["components"]["securitySchemes"] = {
                "bearer": {"type": "http", "scheme": "bearer", "description": "The daemon's token."}
            }
            schema["security"] = [{"bearer": []}]
            app.openapi_schema = problems.use_problem_media_type(schema)
        return app.openapi_schema

    return openapi


def openapi_document() -> dict[str, Any]:
    """The OpenAPI document, from an app whose service is never started or called."""
    return create_app(_NoService(), token=None, max_body=1).openapi()


class _NoService:
    """A stand-in that only lets the app be built; any call is a bug."""

    def __getattr__(self, name: str) -> Any:
        raise RuntimeError(f"the OpenAPI-only app has no service (called {name})")
