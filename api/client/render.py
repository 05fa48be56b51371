"""What the commands print and parse: tables (rich), JSON for scripts, sizes and durations
both ways, and exit statuses as a shell reports them."""

from __future__ import annotations

import json
import os
import re
import signal
import sys
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

import click
from rich.console import Console
from rich.table import Table

FORMATS = click.Choice(["table", "json"])
_UNITS = {"": 1, "b": 1, "k": 1024, "m": 1024**2, "g": 1024**3, "t": 1024**4}
_DURATION = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}


def stdout() -> Console:
    """Our stdout; into a pipe, lines as long as they are (a script cuts them, not us)."""
    console = Console(highlight=False, soft_wrap=True)
    if not console.is_terminal:
        console.width = 1000
    return console


def stderr() -> Console:
    return Console(stderr=True, highlight=False)


def table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
    """A plain table in Docker's manner: headers in capitals, no borders."""
    grid = Table(
        box=None, pad_edge=False, show_edge=False, header_style="bold", show_header=any(headers)
    )
    for header in headers:
        grid.add_column(header, no_wrap=True, overflow="ellipsis")
    for row in rows:
        grid.add_row(*row)
    stdout().print(grid)


def as_json(value: object) -> None:
    sys.stdout.write(json.dumps(value, indent=2) + "\n")


def short_id(value: str) -> str:
    return value.removeprefix("sha256:")[:12]


def size(value: int | None) -> str:
    """1536 → '1.5KiB'."""
    if value is None:
        return "-"
    amount = float(value)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if amount < 1024:
            return f"{amount:.0f}{unit}" if unit == "B" else f"{amount:.1f}{unit}"
        amount /= 1024
    return f"{amount:.1f}TiB"


def parse_size(text: str) -> int:
    """'512m', '1g', '1048576' → bytes (binary units, as Docker's --memory)."""
    found = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([bkmgt]?)(?:i?b)?\s*", text.lower())
    if not found:
        raise click.BadParameter(f"{text!r}: expected a size such as 512m or 1g")
    return int(float(found[1]) * _UNITS[found[2]])


def parse_duration(text: str) -> float:
    """'90', '90s', '10m', '2h', '1d' → seconds."""
    found = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*", text.lower())
    if not found:
        raise click.BadParameter(f"{text!r}: expected a duration such as 90s, 10m or 2h")
    return float(found[1]) * _DURATION[found[2]]


def ago(stamp: str | None) -> str:
    """An RFC 3339 time as 'N units ago', as `docker ps` shows it."""
    if not stamp:
        return "-"
    then = datetime.fromisoformat(stamp.replace("Z", "+00:00"))
    seconds = int((datetime.now(UTC) - then).total_seconds())
    for unit, length in (("day", 86400), ("hour", 3600), ("minute", 60)):
        if seconds >= length:
            count = seconds // length
            return f"{count} {unit}{'s' if count > 1 else ''} ago"
    return f"{max(seconds, 0)} seconds ago"


def pairs(values: Sequence[str], what: str, *, from_env: bool = False) -> dict[str, str]:
    """['K=V', …] → {K: V}. With `from_env`, a bare `K` takes K's value from this environment,
    and is left out when it is not set there (as `docker run -e K` does)."""
    result: dict[str, str] = {}
    for value in values:
        key, sep, rest = value.partition("=")
        if key and sep:
            result[key] = rest
        elif key and from_env:
            if key in os.environ:
                result[key] = os.environ[key]
        else:
            raise click.BadParameter(f"{value!r}: expected KEY=VALUE", param_hint=what)
    return result


def exit_status(record: dict[str, Any] | None) -> int:
    """A shell's $? for an ended process: its code, or 128+n for death by signal n."""
    if not record:
        return 0
    if record.get("exit_code") is not None:
        return int(record["exit_code"])
    name = record.get("signal")
    if name:
        try:
            return 128 + int(signal.Signals[name])
        except KeyError:
            return 128 + int(name) if str(name).isdigit() else 255
    return 255


def sandbox_exit(sandbox: dict[str, Any]) -> str:
    """The STATUS column: 'running', 'exited (0)', 'exited (SIGKILL)', 'failed (oom)'."""
    state = str(sandbox.get("state"))
    end = sandbox.get("exit")
    if not end:
        return state
    if end.get("signal"):
        return f"{state} ({end['signal']})"
    if end.get("reason") not in (None, "exited"):
        return f"{state} ({end['reason']})"
    return f"{state} ({end.get('exit_code')})"
