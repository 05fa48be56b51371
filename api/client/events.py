"""`sandboxd events`: what happened to sandboxes, execs and images, as it happens (the
daemon's Server-Sent Events stream), like `docker events`."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from typing import Any

import click
import httpx

from api.client.base import client, examples
from api.client.render import FORMATS, as_json, short_id, table
from api.client.transport import Client


@click.command(
    "events",
    short_help="Print events as they happen",
    help="Print events as they happen (after replaying those since --since SEQ). With "
    "--no-follow, print what is kept and stop.",
    epilog=examples(
        "sandboxd events",
        "sandboxd events --since 0 --no-follow --type sandbox",
        "sandboxd events --format json --sandbox web | jq .type",
    ),
)
@click.option("--since", metavar="SEQ", help="Replay the events after this sequence number.")
@click.option("--type", "types", multiple=True, help="Only these types (prefix: `sandbox`).")
@click.option("--sandbox", metavar="REF", help="Only this sandbox's.")
@click.option("--label", multiple=True, metavar="K=V", help="Only sandboxes with this label.")
@click.option("--follow/--no-follow", default=True, show_default=True, help="Wait for more.")
@click.option("--format", "fmt", type=FORMATS, default="table", show_default=True)
def events(
    since: str | None,
    types: tuple[str, ...],
    sandbox: str | None,
    label: tuple[str, ...],
    follow: bool,
    fmt: str,
) -> int:
    params: list[tuple[str, str]] = [("type", t) for t in types] + [("label", v) for v in label]
    if since is not None:
        params.append(("since", since))
    if sandbox:
        params.append(("sandbox", sandbox))
    api = client()
    if not follow:
        items = api.get("/events", params=[*params, ("follow", "false")])["items"]
        if fmt == "json":
            as_json(items)
        else:
            table(["SEQ", "TIME", "TYPE", "SUBJECT", ""], [_row(item) for item in items])
        return 0
    try:
        for event in _stream(api, params):
            if fmt == "json":
                sys.stdout.write(json.dumps(event) + "\n")
            else:
                sys.stdout.write("  ".join(_row(event)).rstrip() + "\n")
            sys.stdout.flush()
    except KeyboardInterrupt:
        return 0
    return 0


def _stream(api: Client, params: list[tuple[str, str]]) -> Iterator[dict[str, Any]]:
    """Each event's `data:` from the SSE stream (comments and keep-alives skipped)."""
    with api.stream("GET", "/events", params=params, timeout=httpx.Timeout(10, read=None)) as r:
        data: list[str] = []
        for line in r.iter_lines():
            if line.startswith("data:"):
                data.append(line[5:].removeprefix(" "))
            elif not line and data:
                yield json.loads("\n".join(data))
                data = []


def _row(event: dict[str, Any]) -> list[str]:
    subject = ", ".join(
        f"{key.removesuffix('_id')}={short_id(str(event[key]))}"
        for key in ("sandbox_id", "exec_id", "image_id")
        if event.get(key)
    )
    end = event.get("exit") or {}
    extra = event.get("exit_code"), event.get("signal") or end.get("signal")
    detail = end.get("reason") or ""
    if extra[0] is not None:
        detail = f"exit_code={extra[0]}"
    elif extra[1]:
        detail = f"signal={extra[1]}"
    return [
        str(event.get("seq", "")),
        str(event.get("time", "")),
        str(event.get("type")),
        subject,
        detail,
    ]
