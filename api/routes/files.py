"""Files: read, write, stat, list, make, move and delete a running sandbox's files, and tar
archives of them out and in; bodies streamed both ways (not bound by --max-body)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable
from contextlib import closing
from typing import Annotated, Any, TypeVar

from fastapi import APIRouter, Query, Request, Response
from fastapi.responses import StreamingResponse

from api.deps import Service
from api.problems import documented
from daemon.shapes import (
    FILE_MODE_PATTERN,
    FILE_PATH_PATTERN,
    MAX_ID_INSIDE,
    Entry,
    EntryList,
    MkdirRequest,
    MoveRequest,
    SandboxFiles,
)

T = TypeVar("T")

router = APIRouter(prefix="/sandboxes/{ref}", tags=["files"])

OCTETS = "application/octet-stream"
TAR = "application/x-tar"
PathQuery = Annotated[
    str,
    Query(
        pattern=FILE_PATH_PATTERN,
        description="Absolute, as a process in the sandbox sees it; resolved in its root.",
    ),
]
Owner = Annotated[
    int | None,
    Query(ge=0, le=MAX_ID_INSIDE, description="As seen inside the sandbox; default 0 (root)."),
]


def _binary_body(media_types: list[str], description: str) -> dict[str, Any]:
    """openapi_extra: a raw request body (read by the route as a stream, so FastAPI does not
    know of it), documented for generated clients."""
    schema = {"type": "string", "format": "binary"}
    return {
        "requestBody": {
            "required": True,
            "description": description,
            "content": {media: {"schema": schema} for media in media_types},
        }
    }


def _binary_response(media_type: str, description: str) -> dict[int | str, dict[str, Any]]:
    return {
        200: {
            "description": description,
            "content": {media_type: {"schema": {"type": "string", "format": "binary"}}},
        }
    }


async def _opened(files: SandboxFiles, opening: Awaitable[T]) -> T:
    """A download's stream, which closes the sandbox's root when it ends; the root closed
    here if the stream cannot even start (no such path, not a file)."""
    try:
        return await opening
    except BaseException:
        files.close()
        raise


async def _body(request: Request) -> AsyncIterator[bytes]:
    async for chunk in request.stream():
        yield chunk


@router.get(
    "/files",
    name="read",
    summary="Download a file",
    description="The file's bytes (symlinks followed inside the sandbox), streamed, with "
    "Content-Length. 409 for a directory or anything but a regular file.",
    response_class=StreamingResponse,
    responses={**_binary_response(OCTETS, "The file's bytes."), **documented(401, 404, 409, 422)},
)
async def read(ref: str, path: PathQuery, service: Service) -> Response:
    files = service.files(ref)
    size, chunks = await _opened(files, files.read(path))
    headers = {"Content-Length": str(size)}
    return StreamingResponse(chunks, media_type=OCTETS, headers=headers)


@router.put(
    "/files",
    name="write",
    response_model=Entry,
    summary="Upload a file",
    description="The body is the file's bytes (any size, streamed to disk). Missing parent "
    "directories are made; the file replaces what is there atomically (by rename). 201 new, "
    "200 replaced; 507 past the sandbox's disk limit, with nothing left of the upload.",
    status_code=201,
    openapi_extra=_binary_body([OCTETS], "The file's bytes."),
    responses={
        200: {"model": Entry, "description": "Replaced."},
        **documented(401, 404, 409, 422, 507),
    },
)
async def write(
    ref: str,
    path: PathQuery,
    service: Service,
    request: Request,
    response: Response,
    mode: Annotated[str, Query(pattern=FILE_MODE_PATTERN, description="Octal.")] = "0644",
    uid: Owner = None,
    gid: Owner = None,
) -> Entry:
    with closing(service.files(ref)) as files:
        entry, created = await files.write(path, _body(request), mode, uid, gid)
    response.status_code = 201 if created else 200
    return entry


@router.get(
    "/files/stat",
    name="stat",
    summary="Stat a path (a symlink itself, not its target)",
    responses=documented(401, 404, 409, 422),
)
async def stat(ref: str, path: PathQuery, service: Service) -> Entry:
    with closing(service.files(ref)) as files:
        return await files.stat(path)


@router.get(
    "/files/list",
    name="list",
    summary="List a directory, down to `depth` levels, sorted by path",
    responses=documented(401, 404, 409, 422),
)
async def list_files(
    ref: str,
    path: PathQuery,
    service: Service,
    depth: Annotated[int, Query(ge=1, le=64)] = 1,
) -> EntryList:
    with closing(service.files(ref)) as files:
        return EntryList(items=await files.list(path, depth))


@router.post(
    "/files/mkdir",
    name="mkdir",
    status_code=201,
    response_model=Entry,
    summary="Make a directory",
    description="201 made; 200 if it exists and `parents` is true (409 if not).",
    responses={
        200: {"model": Entry, "description": "It existed."},
        **documented(400, 401, 404, 409, 413, 415, 422, 507),
    },
)
async def mkdir(ref: str, spec: MkdirRequest, service: Service, response: Response) -> Entry:
    with closing(service.files(ref)) as files:
        entry, created = await files.mkdir(spec)
    response.status_code = 201 if created else 200
    return entry


@router.post(
    "/files/move",
    name="move",
    summary="Move (rename) a file or directory",
    description="Within one filesystem of the sandbox (409 across them); what is at `to` "
    "is replaced, as by mv.",
    responses=documented(400, 401, 404, 409, 413, 415, 422),
)
async def move(ref: str, spec: MoveRequest, service: Service) -> Entry:
    with closing(service.files(ref)) as files:
        return await files.move(spec.source, spec.to)


@router.delete(
    "/files",
    name="delete",
    status_code=204,
    summary="Delete a file, a link, or a directory",
    description="A directory that is not empty needs `recursive=true` (409 without).",
    responses=documented(401, 404, 409, 422),
)
async def delete(ref: str, path: PathQuery, service: Service, recursive: bool = False) -> Response:
    with closing(service.files(ref)) as files:
        await files.delete(path, recursive)
    return Response(status_code=204)


@router.get(
    "/archive",
    name="archive_read",
    summary="Download a tar of a file or a tree",
    description="Like `docker cp` out: the tar holds P under its own name (`.` for /), with "
    "modes, owners as seen inside, symlinks and empty directories; streamed.",
    response_class=StreamingResponse,
    responses={**_binary_response(TAR, "A tar stream."), **documented(401, 404, 409, 422)},
)
async def archive_read(ref: str, path: PathQuery, service: Service) -> Response:
    files = service.files(ref)
    chunks = await _opened(files, files.archive(path))
    return StreamingResponse(chunks, media_type=TAR)


@router.put(
    "/archive",
    name="archive_write",
    status_code=204,
    summary="Unpack a tar into a directory",
    description="Like `docker cp` in: a tar (or gzip'd tar) unpacked into the existing "
    "directory `path`. Members with absolute names or `..`, symlinks and hard links "
    "pointing out of it, and device nodes are refused (422) before anything is written; "
    "507 past the sandbox's disk limit.",
    openapi_extra=_binary_body([TAR], "A tar, or a gzip'd tar (sent as the same media type)."),
    responses=documented(401, 404, 409, 422, 507),
)
async def archive_write(ref: str, path: PathQuery, service: Service, request: Request) -> Response:
    with closing(service.files(ref)) as files:
        await files.unpack(path, _body(request))
    return Response(status_code=204)
