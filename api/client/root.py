"""The root of the `sandboxd` command as the client sees it: a Click group with the client's
commands (api/client/) and the daemon's, which it hands to argparse untouched (api/cli.py)."""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence
from typing import Any

import click

from api.cli import _parser, daemon_main
from api.client import events, execs, files, images, sandboxes, system
from api.client.base import Connection, examples
from api.client.transport import HOST_VARIABLE, TOKEN_VARIABLE, ClientError
from daemon.config import DEFAULT_SOCKET

# The daemon's subcommands, handed to argparse untouched (`--help` included).
_AS_IS = {
    "ignore_unknown_options": True,
    "allow_extra_args": True,
    "allow_interspersed_args": False,
    "help_option_names": [],
}


class _Root(click.Group):
    """Every client failure as one line on stderr and a non-zero exit, never a traceback."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except ClientError as exc:
            click.echo(f"sandboxd: error: {exc}", err=True)
            ctx.exit(exc.exit_code)
        except KeyboardInterrupt:
            ctx.exit(130)
        except click.UsageError:
            raise
        except click.ClickException as exc:
            click.echo(f"sandboxd: error: {exc.format_message()}", err=True)
            ctx.exit(exc.exit_code)


@click.group(
    cls=_Root,
    context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100},
    epilog=examples(
        "sandboxd run -d --name web -p 8080:80 python3 -m http.server 80",
        "sandboxd exec -it web sh",
        "sandboxd --host tcp://10.0.0.5:7070 ps -a     # with SANDBOXD_TOKEN set",
        'eval "$(sandboxd completion bash)"',
    ),
)
@click.option(
    "-H",
    "--host",
    envvar=HOST_VARIABLE,
    metavar="URL",
    help=f"The daemon: unix:///path, tcp://HOST:PORT or http(s)://HOST[:PORT] "
    f"[{HOST_VARIABLE}; default {DEFAULT_SOCKET}]. The token is read from {TOKEN_VARIABLE}.",
)
@click.pass_context
def sandboxd(ctx: click.Context, host: str | None) -> None:
    """A daemon that hands out Linux sandboxes over HTTP, and its client.

    The client's commands behave as their Docker namesakes do; the daemon's (serve, cleanup,
    recover, migrate, openapi, settings) run on the daemon's host, as root.
    """
    # The token only from the environment: on the command line every user's `ps` would show it.
    ctx.obj = Connection(host, os.environ.get(TOKEN_VARIABLE))


def _daemon_command(name: str, summary: str) -> click.Command:
    def run(args: tuple[str, ...]) -> int:
        return daemon_main([name, *args])

    return click.Command(
        name,
        callback=run,
        params=[click.Argument(["args"], nargs=-1, type=click.UNPROCESSED)],
        help=f"{summary[0].upper()}{summary[1:]}. See `sandboxd {name} --help`.",
        short_help=f"{summary[0].upper()}{summary[1:]}",
        context_settings=_AS_IS,
        add_help_option=False,
    )


def _daemon_summaries() -> dict[str, str]:
    """Each daemon subcommand's one-line help, as its argparse parser says it."""
    for action in _parser()._actions:
        if isinstance(action, argparse._SubParsersAction):
            return {choice.dest: choice.help or "" for choice in action._choices_actions}
    return {}


for _name, _summary in _daemon_summaries().items():
    sandboxd.add_command(_daemon_command(_name, _summary))
for _command in (
    sandboxes.ps,
    sandboxes.run,
    execs.exec_command,
    sandboxes.logs,
    files.cp,
    sandboxes.stats,
    events.events,
    sandboxes.inspect,
    sandboxes.rm,
    images.images,
    images.pull,
    images.import_image,
    images.rmi,
    system.info,
    system.completion,
):
    sandboxd.add_command(_command)


def main(argv: Sequence[str] | None = None) -> int:
    """The `sandboxd` command as Click runs it; its exit status."""
    try:
        result = sandboxd.main(
            args=list(argv) if argv is not None else None,
            prog_name="sandboxd",
            complete_var="_SANDBOXD_COMPLETE",
            standalone_mode=False,
        )
    except click.exceptions.Abort:
        click.echo("Aborted.", err=True)
        return 130
    except click.ClickException as exc:
        exc.show()
        return exc.exit_code
    return result if isinstance(result, int) else 0
