"""What every client command shares: the connection the root options describe, examples in
`--help`, and whether the daemon has a route (endpoints arrive one release at a time)."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import click

from api.client.transport import ApiError, Client, Host


@dataclass
class Connection:
    """The root options (`--host`, SANDBOXD_HOST, SANDBOXD_TOKEN); the client made once."""

    host: str | None
    token: str | None
    made: list[Client] = field(default_factory=list)

    def client(self) -> Client:
        if not self.made:
            self.made.append(Client(Host.parse(self.host), self.token))
            click.get_current_context().call_on_close(self.made[0].close)
        return self.made[0]


def client() -> Client:
    connection = click.get_current_context().find_object(Connection)
    if connection is None:  # a command invoked on its own, as tests of one command may
        connection = Connection(None, None)
    return connection.client()


def examples(*lines: str) -> str:
    """An `Examples:` epilog that click leaves as written."""
    return "\b\nExamples:\n" + "\n".join(f"  {line}" for line in lines)


def no_route(exc: ApiError) -> bool:
    """The daemon has no such endpoint (an older daemon), as opposed to no such object."""
    return exc.status in (404, 405) and exc.detail.startswith(("no route for", "GET is not"))


def each(refs: Iterable[str], act: Callable[[str], str]) -> int:
    """`act` on every ref in turn, printing what it returns; one that fails is said on stderr
    and the rest still run, as `docker rm a b` does: exit status 1 if any failed."""
    failed = 0
    for ref in refs:
        try:
            click.echo(act(ref))
        except ApiError as exc:
            click.echo(f"sandboxd: error: {exc.detail}", err=True)
            failed += 1
    return 1 if failed else 0
