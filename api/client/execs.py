"""`sandboxd exec`: run a command in a running sandbox, as `docker exec` does, and exit with
its status."""

from __future__ import annotations

import base64
import sys
from typing import Any

import click

from api.client import terminal
from api.client.base import client, examples
from api.client.render import exit_status, pairs
from api.client.transport import ApiError, Client, path

HELP = """Run CMD in the running sandbox REF and exit with its status (128+n when signal n
killed it).

Without -i the command's stdin is empty and its output streams back as it comes. With -i
this terminal's stdin is passed through byte for byte (end of file closes it). With -it the
command gets a terminal: the keys go to it as typed (Ctrl-C interrupts the command, Ctrl-D
ends a shell), and it follows this window's size."""


@click.command(
    "exec",
    short_help="Run a command in a running sandbox",
    help=HELP,
    epilog=examples(
        "sandboxd exec web ls -la /",
        "sandboxd exec -it web sh",
        "tar c src | sandboxd exec -i -w /work web tar x",
        "sandboxd exec -e DEBUG=1 -u 1000 web env",
    ),
    context_settings={"allow_interspersed_args": False},
)
@click.option("-i", "--interactive", is_flag=True, help="Pass stdin through to the command.")
@click.option("-t", "--tty", is_flag=True, help="Give the command a terminal (with -i).")
@click.option("-e", "--env", multiple=True, metavar="K=V", help="Set a variable (repeatable).")
@click.option("-w", "--workdir", metavar="DIR", help="Run in this directory (absolute).")
@click.option("-u", "--user", metavar="UID[:GID]", help="Run as this uid (numeric, inside).")
@click.argument("ref")
@click.argument("cmd", nargs=-1, required=True, type=click.UNPROCESSED)
def exec_command(
    interactive: bool,
    tty: bool,
    env: tuple[str, ...],
    workdir: str | None,
    user: str | None,
    ref: str,
    cmd: tuple[str, ...],
) -> int:
    body: dict[str, Any] = {"cmd": list(cmd), "env": pairs(env, "--env", from_env=True)}
    if workdir:
        body["cwd"] = workdir
    if user:
        body["user"] = user
    if tty and interactive and (why := terminal.interactive_possible(True)):
        raise click.UsageError(why)
    return run_in(client(), ref, body, interactive=interactive, tty=tty)


def run_in(client: Client, ref: str, body: dict[str, Any], *, interactive: bool, tty: bool) -> int:
    """Run the exec `body` in `ref`: attached (stdin or a terminal) or streamed; its status."""
    if interactive or tty:
        body = {**body, "wait": False, "interactive": True}
        if tty:
            body["tty"] = True
            if size := terminal.window_size():
                body["tty_size"] = size
        execution = start(client, ref, body)
        return terminal.attach(client, ref, execution, stdin=interactive, terminal=tty)
    return _streamed(client, ref, body)


def start(client: Client, ref: str, body: dict[str, Any]) -> Any:
    """POST the exec asking for its output as exact bytes (base64); a daemon that does not
    know `encoding` yet gets the request without it."""
    try:
        return client.post(path("sandboxes", ref, "exec"), {**body, "encoding": "base64"})
    except ApiError as exc:
        if exc.status == 422 and "encoding" in exc.detail:
            return client.post(path("sandboxes", ref, "exec"), body)
        raise


def _streamed(client: Client, ref: str, body: dict[str, Any]) -> int:
    """Output as NDJSON lines while the process runs, to our stdout and stderr."""
    where = path("sandboxes", ref, "exec")
    headers = {"Accept": "application/x-ndjson"}
    try:
        with client.stream(
            "POST", where, json={**body, "encoding": "base64"}, headers=headers
        ) as r:
            return _relay(client, r, binary=True)
    except ApiError as exc:
        if not (exc.status == 422 and "encoding" in exc.detail):
            raise
    with client.stream("POST", where, json=body, headers=headers) as response:
        return _relay(client, response, binary=False)


def _relay(client: Client, response: Any, *, binary: bool) -> int:
    for event in client.lines(response):
        if "exit" in event:
            return exit_status(event["exit"])
        if "stream" in event:
            data = base64.b64decode(event["data"]) if binary else event["data"].encode()
            out = sys.stderr.buffer if event["stream"] == "stderr" else sys.stdout.buffer
            out.write(data)
            out.flush()
    raise click.ClickException("the daemon ended the output before the process's exit")
