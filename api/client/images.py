"""Images from the command line: `images`, `pull` (a bar per layer), `import`, `rmi`."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import click
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TaskID,
    TextColumn,
    TransferSpeedColumn,
)

from api.client.base import client, each, examples
from api.client.render import FORMATS, ago, as_json, short_id, size, stderr, table
from api.client.transport import ApiError, image_path

CHUNK = 1 << 20


@click.command(
    "images",
    short_help="List images",
    help="List the images in the daemon's store.",
    epilog=examples("sandboxd images", "sandboxd images --format json | jq '.[].names'"),
)
@click.option("-q", "--quiet", is_flag=True, help="Only the ids.")
@click.option("--format", "fmt", type=FORMATS, default="table", show_default=True)
def images(quiet: bool, fmt: str) -> int:
    items = client().get("/images")["items"]
    if fmt == "json":
        as_json(items)
    elif quiet:
        for item in items:
            click.echo(item["id"])
    else:
        table(
            ["NAME", "ID", "SIZE", "LAYERS", "CREATED"],
            [
                [
                    ", ".join(item.get("names") or []) or "<none>",
                    short_id(item["id"]),
                    size(item.get("size")),
                    str(item.get("layers", "")),
                    ago(item.get("created_at")),
                ]
                for item in items
            ],
        )
    return 0


@click.command(
    "pull",
    short_help="Fetch an image from a registry",
    help="Fetch an image from its registry into the daemon's store, with a bar per layer.",
    epilog=examples(
        "sandboxd pull docker.io/library/alpine:3.20",
        "sandboxd pull 127.0.0.1:5000/team/app:1 --platform linux/arm64",
    ),
)
@click.option("--platform", metavar="OS/ARCH", help="Default: the daemon's own.")
@click.argument("reference")
def pull(platform: str | None, reference: str) -> int:
    api = client()
    body: dict[str, Any] = {"reference": reference}
    if platform:
        body["platform"] = platform
    headers = {"Accept": "application/x-ndjson"}
    console = stderr()
    image: dict[str, Any] | None = None
    with (
        api.stream("POST", "/images/pull", json=body, headers=headers) as response,
        Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            DownloadColumn(),
            TransferSpeedColumn(),
            console=console,
            disable=not console.is_terminal,
        ) as progress,
    ):
        layers: dict[str, TaskID] = {}
        for line in api.lines(response):
            if "image" in line:
                image = line["image"]
                break
            if "error" in line:
                error = line["error"]
                detail = error.get("detail") if isinstance(error, dict) else error
                raise ApiError(502, str(detail))
            _advance(progress, layers, line)
    if image is None:
        raise click.ClickException("the daemon ended the pull without an image")
    click.echo(f"{reference}: {image['id']}")
    return 0


def _advance(progress: Progress, layers: dict[str, TaskID], line: dict[str, Any]) -> None:
    """One progress line: whatever names a layer, its bytes so far and its total."""
    counted = ("current", "completed", "downloaded", "bytes")
    sized = any(isinstance(line.get(k), int) for k in ("total", "size", *counted))
    layer = line.get("layer") or (line.get("digest") if sized else None)
    if not layer:
        return
    total = next((line[k] for k in ("total", "size") if isinstance(line.get(k), int)), None)
    done = next(
        (
            line[k]
            for k in ("current", "completed", "downloaded", "bytes")
            if isinstance(line.get(k), int)
        ),
        None,
    )
    if layer not in layers:
        layers[layer] = progress.add_task(short_id(layer), total=total)
    task = layers[layer]
    if total is not None:
        progress.update(task, total=total)
    if done is not None:
        progress.update(task, completed=done)
    status = str(line.get("status", "")).lower()
    if status in ("done", "complete", "exists", "already exists", "verified") and total:
        progress.update(task, completed=total)


@click.command(
    "import",
    short_help="Add an image from an OCI or docker-save tar",
    help="Add an image from a tar: an OCI image layout, or what `docker save` or `podman "
    "save` wrote.",
    epilog=examples(
        "sandboxd import app.tar app:1",
        "docker save alpine:3.20 -o alpine.tar && sandboxd import alpine.tar alpine:3.20",
    ),
)
@click.argument("file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.argument("reference", metavar="NAME:TAG")
def import_image(file: Path, reference: str) -> int:
    total = file.stat().st_size
    console = stderr()
    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        console=console,
        disable=not console.is_terminal,
    ) as progress:
        task = progress.add_task(file.name, total=total)

        def chunks() -> Iterator[bytes]:
            with open(file, "rb") as source:
                while chunk := source.read(CHUNK):
                    progress.advance(task, len(chunk))
                    yield chunk

        image = (
            client()
            .request(
                "POST",
                "/images/import",
                params={"reference": reference},
                content=chunks(),
                headers={"Content-Type": "application/x-tar", "Content-Length": str(total)},
            )
            .json()
        )
    click.echo(f"{reference}: {image['id']}")
    return 0


@click.command(
    "rmi",
    short_help="Remove images",
    help="Remove images from the store (refused while a sandbox uses one).",
    epilog=examples("sandboxd rmi app:1", "sandboxd rmi sha256:3f5c…"),
)
@click.argument("refs", nargs=-1, required=True)
def rmi(refs: tuple[str, ...]) -> int:
    api = client()

    def remove(ref: str) -> str:
        api.delete(image_path(ref))
        return f"removed {ref}"

    return each(refs, remove)
