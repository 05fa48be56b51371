"""The dashboard's routes: the page (open: it holds no data), its own assets, and the HTML
fragments htmx swaps in (behind the token, as every data call is).

The page learns everything through the API: the fragments are the sandbox list and one
sandbox's details drawn on the server; the graph, logs, terminal and files are drawn in the
browser from the JSON endpoints (api/ui/static/dashboard.js).
"""

from __future__ import annotations

import functools
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import HTMLResponse, RedirectResponse
from fastapi.staticfiles import StaticFiles

from api.deps import Service

if TYPE_CHECKING:
    from fastapi.templating import Jinja2Templates

HERE = Path(__file__).resolve().parent
# The page holds the token: it runs only its own scripts, talks only to the daemon, and is
# never framed. Styles may be inline: xterm.js and htmx write <style> elements of their own.
PAGE_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; script-src 'self'; "
    "style-src 'self' 'unsafe-inline'; img-src 'self' data: blob:; connect-src 'self'; "
    "frame-ancestors 'none'; base-uri 'none'; form-action 'self'; object-src 'none'",
    "Referrer-Policy": "no-referrer",
    "X-Content-Type-Options": "nosniff",
}
# Not operations of the API: left out of the OpenAPI document (the tag names their ids only).
router = APIRouter(prefix="/ui", tags=["dashboard"], include_in_schema=False)


def install(app: FastAPI) -> None:
    """Serve the dashboard from `app`: /ui, /ui/static/ and /ui/fragments/."""
    app.mount("/ui/static", StaticFiles(directory=HERE / "static"), name="ui-static")
    app.include_router(router)


def _ago(moment: datetime | None) -> str:
    """'3 min ago': how long ago `moment` was, for people."""
    if moment is None:
        return "—"
    seconds = int((datetime.now(UTC) - moment).total_seconds())
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= size:
            return f"{seconds // size} {unit} ago"
    return "just now"


def _bytes(value: int | None) -> str:
    if value is None:
        return "no limit"
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if value >= size:
            return f"{value / size:g} {unit}"
    return f"{value} B"


@functools.cache
def templates() -> Jinja2Templates:
    """The pages' templates, loaded by the first visit: a daemon nobody opens the dashboard
    of never holds Jinja (2 MiB)."""
    from fastapi.templating import Jinja2Templates

    loaded = Jinja2Templates(directory=HERE / "templates")
    loaded.env.filters["ago"] = _ago
    loaded.env.filters["bytes"] = _bytes
    return loaded


@router.get("", response_class=HTMLResponse)
async def page(request: Request) -> HTMLResponse:
    root = request.scope.get("root_path", "").rstrip("/")  # behind a proxy's prefix
    return templates().TemplateResponse(request, "index.html", {"root": root}, headers=PAGE_HEADERS)


@router.get("/")
async def page_with_a_slash(request: Request) -> RedirectResponse:
    root = request.scope.get("root_path", "").rstrip("/")
    return RedirectResponse(f"{root}/ui", status_code=308)


@router.get("/fragments/sandboxes", response_class=HTMLResponse)
async def sandbox_rows(request: Request, service: Service) -> HTMLResponse:
    sandboxes = await service.list([], {})
    newest_first = sorted(sandboxes, key=lambda s: s.created_at, reverse=True)
    return templates().TemplateResponse(request, "_sandboxes.html", {"sandboxes": newest_first})


@router.get("/fragments/sandboxes/{ref}", response_class=HTMLResponse)
async def sandbox_details(request: Request, ref: str, service: Service) -> HTMLResponse:
    sandbox = await service.get(ref)
    return templates().TemplateResponse(request, "_sandbox.html", {"sandbox": sandbox})
