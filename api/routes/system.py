"""The daemon itself: liveness (no token needed) and facts about the host and the daemon."""

from __future__ import annotations

from fastapi import APIRouter

from api.deps import Service
from api.problems import documented
from api.schemas import Health
from daemon.shapes import Info

router = APIRouter(tags=["system"])


@router.get(
    "/healthz",
    name="healthz",
    summary="Is the daemon serving?",
    description="200 as soon as the daemon serves requests. Needs no token.",
    openapi_extra={"security": []},
)
async def healthz() -> Health:
    return Health()


@router.get(
    "/info",
    name="info",
    summary="Versions, kernel, cgroup mode and counts",
    responses=documented(401),
)
async def info(service: Service) -> Info:
    return await service.info()
