"""The FastAPI application: routers, problem handlers, auth, body limit and CORS around a
service, the API's documentation (Swagger UI, served from the package: no internet needed) and
the web dashboard (/ui)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse
from fastapi.routing import APIRoute
from fastapi.staticfiles import StaticFiles
from starlette.middleware.cors import CORSMiddleware

from api import problems
from api.auth import BearerAuth
from api.body_limit import BodyLimit
from api.fast_paths import FastPaths
from api.request_id import RequestId
from api.routes import events, execs, files, images, sandboxes, system
from api.ui import routes as ui
from daemon.shapes import SandboxService, package_version

DESCRIPTION = """\
sandboxd hands out Linux sandboxes. Errors are RFC 9457 problem details
(`application/problem+json`). When the daemon has a token, every request needs
`Authorization: Bearer <token>` but `GET /healthz`, the documentation (`/docs`, its assets
under `/static/`, and this document, `/openapi.json`) and the dashboard's page (`/ui`, its
assets under `/ui/static/`). In `/docs`, *Authorize* takes the token.
"""
STATIC = Path(__file__).resolve().parent / "static"
SWAGGER = "/static/vendor/swagger-ui"
# Headers a browser page of an allowed origin may send, and read back, across origins.
CORS_REQUEST_HEADERS = ["Authorization", "Content-Type", "Idempotency-Key", "X-Request-ID"]
CORS_RESPONSE_HEADERS = ["Location", "X-Request-ID", "WWW-Authenticate"]
TAGS = [
    {"name": "system", "description": "The daemon itself."},
    {"name": "sandboxes", "description": "Sandboxes: isolated process trees with their own root."},
    {"name": "execs", "description": "Processes run inside a sandbox."},
    {"name": "events", "description": "What happened, as a stream that resumes."},
    {"name": "files", "description": "A running sandbox's files, and tar archives of them."},
    {"name": "images", "description": "OCI images that sandboxes can be made from."},
]


def operation_id(route: APIRoute) -> str:
    """`<tag>_<name>`, e.g. sandboxes_create: what a generated client calls its methods."""
    return f"{route.tags[0]}_{route.name}"


def create_app(
    service: SandboxService,
    *,
    token: str | None,
    max_body: int,
    cors_origins: Sequence[str] = (),
    metrics_public: bool = False,
) -> FastAPI:
    """The app serving `service`; it starts and stops the service with its own lifespan.
    `cors_origins`: browser origins allowed to call it (none: no CORS headers at all).
    `metrics_public`: GET /metrics needs no token."""

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
        # FastAPI's own pages load Swagger UI and ReDoc from CDNs: /docs is served below.
        docs_url=None,
        redoc_url=None,
    )
    app.state.service = service
    problems.install(app)
    for module in (system, sandboxes, execs, files, images, events):
        app.include_router(module.router)
    _serve_docs(app)
    ui.install(app)
    # The last middleware added runs first: authenticate before reading any body, and answer
    # a CORS preflight (which carries no token) before authenticating.
    app.add_middleware(FastPaths, service=lambda: app.state.service)  # inside all but the router
    app.add_middleware(BodyLimit, max_body=max_body)
    if token:
        open_paths = {"/metrics"} if metrics_public else set()
        app.add_middleware(BearerAuth, token=token, open_paths=open_paths)
    if cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=list(cors_origins),
            allow_methods=["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE"],
            allow_headers=CORS_REQUEST_HEADERS,
            expose_headers=CORS_RESPONSE_HEADERS,
            # The token travels in a header a page sets itself: no cookies, no credentials mode.
            allow_credentials=False,
            max_age=600,
        )
    # Outermost: the request id is bound before anything logs, and goes on every answer.
    app.add_middleware(RequestId)
    app.openapi = _documented_openapi(app)  # type: ignore[method-assign]
    return app


def _serve_docs(app: FastAPI) -> None:
    """/docs: Swagger UI from the files vendored into the package (deploy/vendor_assets.py),
    at /static/, so that it draws with no internet; it reads /openapi.json."""
    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    # A plain route: not an operation of the API (it has no tag, no operation id).
    async def docs(request: Request) -> HTMLResponse:
        root = request.scope.get("root_path", "").rstrip("/")
        return get_swagger_ui_html(
            openapi_url=f"{root}{app.openapi_url}",
            title=f"{app.title} API",
            swagger_js_url=f"{root}{SWAGGER}/swagger-ui-bundle.js",
            swagger_css_url=f"{root}{SWAGGER}/swagger-ui.css",
            swagger_favicon_url=f"{root}{SWAGGER}/favicon-32x32.png",
            oauth2_redirect_url=None,  # bearer tokens only: no OAuth2 flow to return from
            # Swagger UI would otherwise show a badge fetched from validator.swagger.io.
            swagger_ui_parameters={"validatorUrl": None},
        )

    app.add_route("/docs", docs, methods=["GET", "HEAD"], include_in_schema=False)


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
