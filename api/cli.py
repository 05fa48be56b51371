"""The `sandboxd` command: the daemon's side (`serve` the API, `migrate` the database, print the
`openapi` document, `cleanup` what the daemon made on the host's network, `recover` the
sandboxes of a lost database, print the `settings` reference) and the client's (`ps`, `run`,
`exec`, `cp`, `logs`, … in api/client/).

The root is a Click group (api/client/root.py; the client's commands are Click commands, with
its completion and help). The daemon's side stays argparse, handed the arguments as they
came: its flags are generated from the settings' declaration (daemon/config.py `add_flags`),
so `sandboxd serve --help` lists every setting and a setting added there needs nothing here.
A daemon's command is run here directly, without the Click root, so `serve` never loads the
client.

Exit codes: 0 done, 1 a runtime failure (such as a socket in use, or an error the daemon
answered), 2 a usage or configuration error (or `serve` started without root), reported in
one line rather than a traceback; for `serve`, that line is a log line (daemon/logs.py). The
client's commands exit as Docker's do (`exec` and `run` with their command's status).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Sequence

from daemon.config import (
    LOG_FORMATS,
    LOG_LEVELS,
    ConfigError,
    add_flags,
    example_toml,
    load_config,
    reference_markdown,
    variable,
)

USAGE_ERROR = 2


def daemon_main(argv: Sequence[str]) -> int:
    """The daemon's side: one of its subcommands and its arguments, parsed by argparse."""
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        result: int = args.run(args)
        return result
    except ConfigError as exc:
        print(f"sandboxd: error: {exc}", file=sys.stderr)
        return USAGE_ERROR


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sandboxd", description="A daemon that hands out Linux sandboxes over HTTP."
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = commands.add_parser(
        "serve",
        help="serve the HTTP API",
        description="Serve the HTTP API. Each option can also come from the environment variable "
        "named beside it or from the configuration file; a flag beats the environment, which "
        "beats the file.",
    )
    add_flags(serve)
    serve.set_defaults(run=_serve)

    cleanup = commands.add_parser(
        "cleanup",
        help="remove the bridge, its links and the egress rule (the daemon never does)",
        description="Remove what sandboxd made on the host's network: the links on its bridge, "
        "the bridge (only if this daemon's state directory made it) and the egress NAT table; "
        "with no sandbox left live, release the names and ranges the state directory claimed. "
        "Refused while a daemon serves the state directory, or while it lists bridged "
        "sandboxes that are still live.",
    )
    add_flags(cleanup, frozenset({"state_dir", "bridge_name", "config"}))
    cleanup.set_defaults(run=_cleanup)

    recover = commands.add_parser(
        "recover",
        help="after the database was lost or damaged: adopt or remove the sandboxes on disk",
        description="Settle the sandboxes left on disk when the database is missing, empty, "
        "unreadable or another state directory's (serve then refuses to start). The database "
        "found is kept as sandboxd.db.damaged-TIME and a new one made; the history of execs "
        "and of ended sandboxes is lost. Run it while no daemon serves the state directory, "
        "with the options given to serve.",
    )
    what = recover.add_mutually_exclusive_group(required=True)
    what.add_argument(
        "--adopt",
        action="store_true",
        help="record again the sandboxes whose supervisor is alive, from what was kept beside "
        "them; remove the others",
    )
    what.add_argument(
        "--remove", action="store_true", help="remove them all: processes, cgroups, links, files"
    )
    add_flags(recover, frozenset({"state_dir", "run_dir", "bridge_name", "config"}))
    recover.set_defaults(run=_recover)

    migrate = commands.add_parser("migrate", help="create or upgrade the state database")
    add_flags(migrate, frozenset({"state_dir", "config"}))
    migrate.set_defaults(run=_migrate)

    openapi = commands.add_parser("openapi", help="print the OpenAPI document of the HTTP API")
    openapi.set_defaults(run=_openapi)

    reference = commands.add_parser(
        "settings",
        help="print the settings' reference (Markdown) or the example configuration file (TOML)",
    )
    reference.add_argument("--toml", action="store_true", help="the example configuration file")
    reference.set_defaults(run=_reference)

    return parser


def _settings(args: argparse.Namespace) -> dict[str, object]:
    """The flags given, by setting name: what load_config takes (None: not given)."""
    return {k: v for k, v in vars(args).items() if k not in ("command", "run")}


def _serve(args: argparse.Namespace) -> int:
    # structlog draws tracebacks with rich when it can import it (5 MiB the daemon would hold
    # for good): the daemon's logs use plain_traceback, and this process never runs the client.
    if "structlog" not in sys.modules:
        sys.modules.setdefault("rich", None)  # type: ignore[arg-type]
    from daemon import logs

    # Logging first, as the flags and environment ask (the file is not read yet), so that a
    # refusal below is a log line like any other.
    logs.configure(*_early_log_settings(args))
    log = logging.getLogger("api.serve")
    if os.geteuid() != 0:
        log.error(
            "refusing to start: sandboxd serve needs root (it makes namespaces, mounts, "
            "cgroups and links); run it as root or from its systemd unit"
        )
        return USAGE_ERROR
    from api.serve import check_serve, private_dir, serve
    from api.sockets import ListenError
    from daemon.lifecycle import claims
    from daemon.network.bridge import NetworkError

    try:
        config = load_config(_settings(args), os.environ)
        logs.configure(config.log_level, config.log_format)
        check_serve(config)  # before the first side effect
        # One daemon per state directory, for its whole life: the lock is this process's
        # until it exits. Then the names and ranges of its own that no other daemon uses.
        private_dir(config.state_dir)
        claims.lock_state_dir(config.state_dir)
        fresh = not claims.recorded(config.state_dir)
        config = claims.claim(config)
        served = False
        try:
            served = serve(config) == 0
            return 0 if served else 1
        finally:
            if fresh and not served:  # refused before it ever served: nothing holds the claim
                claims.release(config)
    except claims.StateDirBusy as exc:
        log.error("refusing to start: %s", exc)
        return 1
    except ConfigError as exc:
        log.error("refusing to start: %s", exc)
        return USAGE_ERROR
    except (ListenError, NetworkError) as exc:
        log.error("refusing to start: %s", exc)
        return 1


def _early_log_settings(args: argparse.Namespace) -> tuple[str, str]:
    """Level and format from the flag or the environment, if valid (load_config says why
    not); the defaults otherwise."""
    level = args.log_level or os.environ.get(variable("log_level"), "").strip().lower()
    fmt = args.log_format or os.environ.get(variable("log_format"), "").strip().lower()
    return (
        level if level in LOG_LEVELS else "info",
        fmt if fmt in LOG_FORMATS else "text",
    )


def _migrate(args: argparse.Namespace) -> int:
    from api.serve import private_dir
    from daemon.lifecycle import claims, recovery
    from daemon.store.database import migrate

    config = load_config(_settings(args), os.environ)
    private_dir(config.state_dir)
    # As serve does: not while a daemon holds the state directory, and not over a database
    # that is not the one kept with the sandboxes on disk (a new one would be trusted next).
    try:
        recovery.lock(config.state_dir)
    except claims.StateDirBusy as exc:
        print(f"sandboxd: error: refusing to migrate: {exc}", file=sys.stderr)
        return 1
    try:
        recovery.preflight(config)
        migrate(config.state_dir / recovery.DATABASE)
    except recovery.RecoveryNeeded as exc:
        print(f"sandboxd: error: refusing to migrate: {exc}", file=sys.stderr)
        return 1
    finally:
        recovery.unlock(config.state_dir)
    return 0


def _cleanup(args: argparse.Namespace) -> int:
    import asyncio

    from daemon.lifecycle import claims, recovery
    from daemon.network.bridge import NetworkError, cleanup
    from daemon.store.database import Store

    config = load_config(_settings(args), os.environ)
    if not config.state_dir.is_dir():
        return 0  # no daemon ever ran there: nothing of it on the host
    database = config.state_dir / recovery.DATABASE
    try:
        # Held until the process ends: no daemon starts on the state directory meanwhile.
        lock = claims.lock_state_dir(config.state_dir)  # noqa: F841 (held, never read)
        live = []
        if database.exists():
            store = Store(database)
            try:
                live = store.live_sandboxes()
            finally:
                store.close()
        bridged = [r.id for r in live if (r.spec.get("network") or {}).get("mode") == "bridge"]
        if bridged:
            print(
                f"sandboxd: error: {len(bridged)} bridged sandbox(es) are still live "
                f"({', '.join(bridged[:5])}): delete them first",
                file=sys.stderr,
            )
            return 1
        ours = claims.known(config)
        removed = [] if ours is None else asyncio.run(cleanup(ours))
        if not live:  # no sandbox holds a uid or cgroup of it: the next daemon claims afresh
            claims.release(config)
    except (claims.StateDirBusy, NetworkError) as exc:
        print(f"sandboxd: error: {exc}", file=sys.stderr)
        return 1
    for line in removed:
        print(f"removed {line}")
    return 0


def _reference(args: argparse.Namespace) -> int:
    sys.stdout.write(example_toml() if args.toml else reference_markdown())
    return 0


def _recover(args: argparse.Namespace) -> int:
    import asyncio

    from daemon.lifecycle.recovery import RecoveryError, recover

    settings = {k: v for k, v in _settings(args).items() if k not in ("adopt", "remove")}
    config = load_config(settings, os.environ)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(name)s: %(message)s")
    try:
        report = asyncio.run(recover(config, adopt=args.adopt))
    except RecoveryError as exc:
        print(f"sandboxd: error: {exc}", file=sys.stderr)
        return 1
    for line in report:
        print(line)
    return 0


def _openapi(_args: argparse.Namespace) -> int:
    from api.app import openapi_document

    sys.stdout.write(json.dumps(openapi_document(), indent=2, sort_keys=False) + "\n")
    return 0


# -- the root: a Click group over the daemon's side and the client's ----------------------------


def daemon_commands() -> set[str]:
    """The names of the daemon's subcommands."""
    for action in _parser()._actions:
        if isinstance(action, argparse._SubParsersAction):
            return set(action.choices)
    return set()


def main(argv: Sequence[str] | None = None) -> int:
    """The `sandboxd` command; its exit status."""
    args = list(sys.argv[1:] if argv is None else argv)
    # The daemon's commands straight to argparse, as the Click root would hand them: a daemon
    # then never loads the client (Click, httpx, rich, websockets: 3 MiB it would hold).
    if args and args[0] in daemon_commands():
        return daemon_main(args)
    from api.client.root import main as client_main

    return client_main(argv)
