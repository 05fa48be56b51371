"""`sandboxd info` (the daemon and its host) and `sandboxd completion` (the shell's script,
Click's own)."""

from __future__ import annotations

import click
from click.shell_completion import get_completion_class

from api.client.base import client, examples
from api.client.render import FORMATS, as_json, table


@click.command(
    "info",
    short_help="Show the daemon's version, host and counts",
    help="Show the daemon's version, its host's kernel and cgroups, and its sandboxes' counts.",
    epilog=examples("sandboxd info", "sandboxd info --format json | jq .version"),
)
@click.option("--format", "fmt", type=FORMATS, default="table", show_default=True)
def info(fmt: str) -> int:
    found = client().get("/info")
    if fmt == "json":
        as_json(found)
        return 0
    rows = [[key, str(value)] for key, value in found.items() if not isinstance(value, dict)]
    rows += [
        [f"{key}.{inner}", str(value)]
        for key, nested in found.items()
        if isinstance(nested, dict)
        for inner, value in nested.items()
    ]
    table(["", ""], rows)
    return 0


@click.command(
    "completion",
    short_help="Print the shell completion script",
    help="Print the shell completion script for bash, zsh or fish.",
    epilog=examples(
        'eval "$(sandboxd completion bash)"     # in ~/.bashrc',
        "sandboxd completion fish > ~/.config/fish/completions/sandboxd.fish",
    ),
)
@click.argument("shell", type=click.Choice(["bash", "zsh", "fish"]))
@click.pass_context
def completion(ctx: click.Context, shell: str) -> int:
    root = ctx.find_root().command
    script = get_completion_class(shell)
    assert script is not None
    click.echo(script(root, {}, "sandboxd", "_SANDBOXD_COMPLETE").source())
    return 0
