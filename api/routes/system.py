"""The daemon itself: liveness (no token needed) and facts about the host and the daemon."""

from __future__ import annotations

from fastapi import APIRouter, Response

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


@router.get(
    "/metrics",
    name="metrics",
    summary="Prometheus metrics",
    description="The Prometheus text exposition: sandboxes by state, creates and execs by "
    "outcome, their durations (histograms), the warm pool, each running sandbox's memory, "
    "CPU and processes (labels `id` and `name`), event followers, and the daemon process. "
    "Needs the token unless the daemon runs with `--metrics-public`.",
    response_class=Response,
    responses={
        200: {"content": {"text/plain": {"schema": {"type": "string"}}}},
        **documented(401),
    },
)
async def metrics(service: Service) -> Response:
    body, content_type = await service.metrics_exposition()
    return Response(body, media_type=content_type)
