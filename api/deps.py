"""The one dependency the routes share: the service the app was created with."""

from __future__ import annotations

from typing import Annotated, cast

from fastapi import Depends, Request

from daemon.shapes import SandboxService


async def _service(request: Request) -> SandboxService:
    # async: FastAPI runs a plain def dependency on a worker thread, a hop every request paid.
    return cast(SandboxService, request.app.state.service)


Service = Annotated[SandboxService, Depends(_service)]
