"""The `sandboxd` command: `serve` the API, `migrate` the database, print the `openapi` document,
`cleanup` what the daemon made on the host's network; `bench` a daemon.

Exit codes: 0 done, 1 a runtime failure (such as a socket in use), 2 a usage or configuration
error (or `serve` started without root), reported in one line rather than a traceback; for
`serve`, that line is a log line (daemon/logs.py).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Sequence

from daemon.config import (
    CGROUP_PARENTS,
    ENVIRONMENT,
    LOG_FORMATS,
    LOG_LEVELS,
    ConfigError,
    load_config,
)

USAGE_ERROR = 2


def main(argv: Sequence[str] | None = None) -> int:
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
    serve.add_argument(
        "--listen",
        action="append",
        metavar="URL",
        help="unix:///path or tcp://HOST:PORT, repeatable "
        "[SANDBOXD_LISTEN, comma-separated; default unix://RUN_DIR/sandboxd.sock]",
    )
    _state_dir(serve)
    serve.add_argument("--run-dir", metavar="DIR", help="sockets, runtime files [SANDBOXD_RUN_DIR]")
    token = serve.add_mutually_exclusive_group()
    token.add_argument("--token", metavar="TOKEN", help="the bearer token [SANDBOXD_TOKEN]")
    token.add_argument(
        "--token-file", metavar="FILE", help="read the bearer token from FILE [SANDBOXD_TOKEN_FILE]"
    )
    serve.add_argument(
        "--max-sandboxes", metavar="N", help="past it, create answers 503 [SANDBOXD_MAX_SANDBOXES]"
    )
    serve.add_argument(
        "--output-limit", metavar="BYTES", help="bytes kept per exec stream [SANDBOXD_OUTPUT_LIMIT]"
    )
    serve.add_argument(
        "--max-body", metavar="BYTES", help="larger request bodies answer 413 [SANDBOXD_MAX_BODY]"
    )
    serve.add_argument(
        "--exec-retention",
        metavar="SECONDS",
        help="how long finished execs are kept [SANDBOXD_EXEC_RETENTION; default 86400]",
    )
    serve.add_argument(
        "--pool-size",
        metavar="N",
        help="sandboxes kept started for creates on the default options "
        "[SANDBOXD_POOL_SIZE; default 0]",
    )
    serve.add_argument(
        "--log-level",
        choices=LOG_LEVELS,
        help="log lines at this level and above [SANDBOXD_LOG_LEVEL; default info]",
    )
    serve.add_argument(
        "--log-format",
        choices=LOG_FORMATS,
        help="text, or json: one object a line [SANDBOXD_LOG_FORMAT; default text]",
    )
    serve.add_argument(
        "--cgroup-parent",
        choices=CGROUP_PARENTS,
        help="root: sandboxes' cgroups at the top of the cgroup2 tree; delegated: under the "
        "daemon's own cgroup, as a systemd unit with Delegate=yes wants "
        "[SANDBOXD_CGROUP_PARENT; default root]",
    )
    _bridge(serve)
    serve.add_argument(
        "--bridge-subnet",
        metavar="CIDR",
        help="IPv4 subnet of the bridge; the bridge takes its first address "
        "[SANDBOXD_BRIDGE_SUBNET; default 10.88.0.0/16]",
    )
    serve.add_argument(
        "--egress",
        action=argparse.BooleanOptionalAction,
        help="let bridged sandboxes reach the outside through NAT, and give them the host's "
        "name servers [SANDBOXD_EGRESS; default off]",
    )
    _config_file(serve)
    serve.set_defaults(run=_serve)

    cleanup = commands.add_parser(
        "cleanup",
        help="remove the bridge, its links and the egress rule (the daemon never does)",
        description="Remove what sandboxd made on the host's network: the links on its bridge, "
        "the bridge (only if this daemon's state directory made it) and the egress NAT table. "
        "Refused while the state directory lists bridged sandboxes that are still live.",
    )
    _state_dir(cleanup)
    _bridge(cleanup)
    _config_file(cleanup)
    cleanup.set_defaults(run=_cleanup)

    migrate = commands.add_parser("migrate", help="create or upgrade the state database")
    _state_dir(migrate)
    _config_file(migrate)
    migrate.set_defaults(run=_migrate)

    openapi = commands.add_parser("openapi", help="print the OpenAPI document of the HTTP API")
    openapi.set_defaults(run=_openapi)

    bench = commands.add_parser(
        "bench",
        help="measure a daemon: latencies, exec throughput, memory per idle sandbox",
        description="Measure a daemon over its HTTP API: p50/p90/p99 of create, exec and "
        "destroy, execs per second at several concurrencies, and memory per idle sandbox. "
        "Without --url it starts a private daemon on a temporary directory (as root) and "
        "removes it, with everything it made, at the end.",
    )
    bench.add_argument(
        "--url",
        help="the daemon to measure: unix:///path or http://HOST:PORT "
        "[default: a private daemon of this installation]",
    )
    bench.add_argument("--token", help="bearer token for --url [SANDBOXD_TOKEN]")
    bench.add_argument("--count", type=_positive, default=200, help="samples per latency row [200]")
    bench.add_argument("--warmup", type=_count, default=5, help="untimed rounds first [5]")
    bench.add_argument(
        "--concurrency",
        type=_counts,
        default=[1, 4, 16],
        metavar="N,N,…",
        help="exec throughput at these concurrencies, each with its own sandbox [1,4,16]",
    )
    bench.add_argument(
        "--duration", type=float, default=5.0, help="seconds per concurrency level [5]"
    )
    bench.add_argument(
        "--idle",
        type=_counts,
        default=[100, 1000],
        metavar="N,N,…",
        help="measure memory with this many idle sandboxes alive; '' for none [100,1000]",
    )
    bench.add_argument(
        "--pool",
        type=_count,
        default=0,
        metavar="N",
        help="start the private daemon with --pool-size N, and measure creates that find the "
        "pool ready (the other create rows then take from it whenever it has one) [0]",
    )
    bench.add_argument("--json", action="store_true", help="print the report as JSON")
    bench.set_defaults(run=_bench)
    return parser


def _count(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text}: expected a whole number, 0 or more")
    return value


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text}: expected a whole number, 1 or more")
    return value


def _counts(text: str) -> list[int]:
    return [_positive(part) for part in text.split(",") if part.strip()]


def _state_dir(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--state-dir", metavar="DIR", help="database and writable layers [SANDBOXD_STATE_DIR]"
    )


def _bridge(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--bridge-name",
        metavar="NAME",
        help="the bridge of bridged sandboxes [SANDBOXD_BRIDGE_NAME; default sandboxd0]",
    )


def _config_file(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config",
        metavar="FILE",
        help="TOML configuration file [SANDBOXD_CONFIG; default /etc/sandboxd/config.toml if any]",
    )


def _settings(args: argparse.Namespace) -> dict[str, object]:
    """The flags given, by setting name: what load_config takes (None: not given)."""
    return {k: v for k, v in vars(args).items() if k not in ("command", "run")}


def _serve(args: argparse.Namespace) -> int:
    from api.serve import serve
    from api.sockets import ListenError
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
    try:
        config = load_config(_settings(args), os.environ)
        logs.configure(config.log_level, config.log_format)
        return serve(config)
    except ConfigError as exc:
        log.error("refusing to start: %s", exc)
        return USAGE_ERROR
    except ListenError as exc:
        log.error("refusing to start: %s", exc)
        return 1


def _early_log_settings(args: argparse.Namespace) -> tuple[str, str]:
    """Level and format from the flag or the environment, if valid (load_config says why
    not); the defaults otherwise."""
    level = args.log_level or os.environ.get(ENVIRONMENT["log_level"], "").strip().lower()
    fmt = args.log_format or os.environ.get(ENVIRONMENT["log_format"], "").strip().lower()
    return (
        level if level in LOG_LEVELS else "info",
        fmt if fmt in LOG_FORMATS else "text",
    )


def _migrate(args: argparse.Namespace) -> int:
    from api.serve import private_dir
    from daemon.store import migrate

    config = load_config(_settings(args), os.environ)
    private_dir(config.state_dir)
    migrate(config.state_dir / "sandboxd.db")
    return 0


def _cleanup(args: argparse.Namespace) -> int:
    import asyncio

    from daemon.lifecycle import SandboxState
    from daemon.network import NetworkError, cleanup
    from daemon.store import Store

    config = load_config(_settings(args), os.environ)
    database = config.state_dir / "sandboxd.db"
    if database.exists():
        store = Store(database)
        try:
            live = [
                r.id
                for r in store.list_sandboxes([SandboxState.CREATING, SandboxState.RUNNING])
                if (r.spec.get("network") or {}).get("mode") == "bridge"
            ]
        finally:
            store.close()
        if live:
            print(
                f"sandboxd: error: {len(live)} bridged sandbox(es) are still live "
                f"({', '.join(live[:5])}): delete them first",
                file=sys.stderr,
            )
            return 1
    try:
        removed = asyncio.run(cleanup(config))
    except NetworkError as exc:
        print(f"sandboxd: error: {exc}", file=sys.stderr)
        return 1
    for line in removed:
        print(f"removed {line}")
    return 0


def _bench(args: argparse.Namespace) -> int:
    from api.bench.run import BenchError, Options, main

    options = Options(
        args.count, args.warmup, args.concurrency, args.duration, args.idle, pool=args.pool
    )
    try:
        return main(args.url, args.token or os.environ.get("SANDBOXD_TOKEN"), options, args.json)
    except BenchError as exc:
        print(f"sandboxd bench: {exc}", file=sys.stderr)
        return 1


def _openapi(_args: argparse.Namespace) -> int:
    from api.app import openapi_document

    sys.stdout.write(json.dumps(openapi_document(), indent=2, sort_keys=False) + "\n")
    return 0
