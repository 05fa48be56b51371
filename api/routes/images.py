"""Images: pull from a registry (with NDJSON progress), import an archive, list, get, delete."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Annotated, Any

from fastapi import APIRouter, Query, Request, Response
from fastapi.responses import StreamingResponse

from api.deps import Service
from api.problems import documented
from api.routes.execs import NDJSON, _accepts
from api.schemas import ImageList
from daemon.errors import SandboxError
from daemon.shapes import IMAGE_REF_PATTERN, PLATFORM_PATTERN, Image, ImagePull, ImageStoreService

router = APIRouter(prefix="/images", tags=["images"])

_REF = "An image: name[:tag] (tag latest when none), its id or manifest digest (`sha256:…`)."


@router.post(
    "/pull",
    name="pull",
    response_model=Image,
    summary="Pull an image from a registry",
    description="200 with the Image once every blob is in the store and checked. With "
    '`Accept: application/x-ndjson`: progress lines (`{"status": "resolving"|"resolved"|'
    '"downloading"|"done"|"exists", "layer", "current", "total"}`) then '
    '`{"image": Image}`, or `{"error": Problem}` if it fails once the stream has begun.',
    responses={
        200: {
            "description": "The Image (or, asked for NDJSON, progress lines ending with it).",
            "content": {NDJSON: {"schema": {"type": "string"}}},
        },
        **documented(400, 401, 413, 415, 422, 502),
    },
)
async def pull(body: ImagePull, service: Service, request: Request) -> Image | Response:
    images = service.images
    if not _accepts(request, NDJSON):
        return await images.pull(body.reference, body.platform)
    return await _pull_with_progress(images, body)


async def _pull_with_progress(images: ImageStoreService, body: ImagePull) -> Response:
    """Progress as NDJSON; a failure before the first line is an ordinary problem answer."""
    queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
    task = asyncio.create_task(images.pull(body.reference, body.platform, queue.put_nowait))
    first = asyncio.create_task(queue.get())
    await asyncio.wait({task, first}, return_when=asyncio.FIRST_COMPLETED)
    if not first.done():
        first.cancel()
        await task  # raised: the problem answer; else the pull needed no progress line
        return _lines([{"image": task.result().model_dump(mode="json")}])

    async def lines() -> AsyncIterator[bytes]:
        yield _line(first.result())
        while True:
            getter = asyncio.create_task(queue.get())
            await asyncio.wait({task, getter}, return_when=asyncio.FIRST_COMPLETED)
            if getter.done():
                yield _line(getter.result())
                continue
            getter.cancel()
            while not queue.empty():
                yield _line(queue.get_nowait())
            try:
                image = task.result()
            except SandboxError as exc:
                problem = {"status": exc.status, "title": exc.title, "detail": exc.detail}
                yield _line({"error": problem})
            else:
                yield _line({"image": image.model_dump(mode="json")})
            return

    return StreamingResponse(lines(), media_type=NDJSON)


def _line(value: dict[str, Any]) -> bytes:
    return json.dumps(value).encode() + b"\n"


def _lines(values: list[dict[str, Any]]) -> Response:
    return Response(b"".join(_line(v) for v in values), media_type=NDJSON)


@router.post(
    "/import",
    name="import",
    status_code=201,
    summary="Import an image from an OCI layout tar or a docker/podman save tar",
    description="The body is the tar (`application/x-tar`), streamed: not bound by "
    "max_body. 201 with the Image, named `reference` (else by the names the archive gives).",
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {"application/x-tar": {"schema": {"type": "string", "format": "binary"}}},
        }
    },
    responses=documented(401, 422),
)
async def import_image(
    service: Service,
    request: Request,
    reference: Annotated[
        str | None,
        Query(max_length=512, pattern=IMAGE_REF_PATTERN.replace(r"(?![\s\S])", "$")),
    ] = None,
    platform: Annotated[
        str, Query(max_length=64, pattern=PLATFORM_PATTERN.replace(r"(?![\s\S])", "$"))
    ] = "linux/amd64",
) -> Image:
    return await service.images.import_archive(request.stream(), reference, platform)


@router.get("", name="list", summary="List images, oldest first", responses=documented(401))
async def list_images(service: Service) -> ImageList:
    return ImageList(items=await service.images.list())


@router.get(
    "/{ref:path}",
    name="get",
    summary="Get an image by name, id or digest",
    description=_REF,
    responses=documented(401, 404),
)
async def get(ref: str, service: Service) -> Image:
    return await service.images.get(ref)


@router.delete(
    "/{ref:path}",
    name="delete",
    status_code=204,
    response_class=Response,
    summary="Delete an image and the layers no other image uses",
    description=_REF + " 409 while a sandbox made from it exists (delete the sandbox first).",
    responses=documented(401, 404, 409),
)
async def delete(ref: str, service: Service) -> None:
    await service.images.delete(ref)
