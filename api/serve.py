"""`sandboxd serve`: check the config, make the directories, bind, and run uvicorn until a signal.

Runs in the daemon process, as root, in the host's namespaces.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
from pathlib import Path

import uvicorn
from fastapi import FastAPI

from api.app import create_app
from api.problems import LoggedOnce
from api.request_id import NoServerAccessLines
from api.sd_notify import Notifier
from api.sockets import Listener, bind_listeners, close_listeners
from daemon.config import Config, ConfigError, TcpEndpoint, parse_listen

log = logging.getLogger(__name__)


def check_serve(config: Config) -> None:
    """Refuse settings that are valid alone but unsafe to serve with."""
    tcp = [url for url in config.listen if isinstance(parse_listen(url), TcpEndpoint)]
    if tcp and not config.token:
        raise ConfigError(
            f"refusing to listen on {', '.join(tcp)} without a token: exec is root-equivalent, "
            "so an open TCP port would hand this machine to anyone who can reach it "
            "(set --token, --token-file or SANDBOXD_TOKEN, or listen on a unix socket only)"
        )


def check_network(config: Config) -> None:
    """Refuse a bridge subnet that the host already routes, or a bridge that is not ours."""
    # Imported here: the kernel side, which `openapi` never needs.
    from daemon.network.bridge import NetworkError, preflight

    try:
        asyncio.run(preflight(config))
    except NetworkError as exc:
        raise ConfigError(str(exc)) from exc


def check_cgroups(config: Config) -> None:
    """Refuse a delegated cgroup tree where nothing was delegated."""
    if config.cgroup_parent != "delegated":
        return
    from daemon.linux.cgroups import NotDelegated, own_cgroup

    try:
        own_cgroup()
    except NotDelegated as exc:
        raise ConfigError(f"cgroup_parent = delegated: {exc}") from exc


def private_dir(path: Path) -> None:
    """Create `path` (and missing parents) and make it 0700, also when it already exists."""
    path.mkdir(parents=True, exist_ok=True)
    path.chmod(0o700)


def serve(config: Config) -> int:
    """Serve until SIGTERM or SIGINT; 0 then. Sandboxes outlive this (the service's business)."""
    # Every setting is checked before the first side effect.
    check_serve(config)
    check_network(config)
    check_cgroups(config)
    notifier = Notifier.from_environment()
    # The private directories, 0700 even if they were there before.
    private_dir(config.run_dir)
    private_dir(config.state_dir)
    # The sockets, before the service: a second daemon stops here, before it adopts anything.
    listeners = bind_listeners(config.listen, run_dir=config.run_dir)
    try:
        # Imported here: the manager pulls in the kernel side, which `openapi` never needs.
        from daemon.lifecycle.service import SandboxManager

        service = SandboxManager(config)
    except BaseException:
        close_listeners(listeners)
        raise
    app = create_app(
        service,
        token=config.token,
        max_body=config.max_body,
        cors_origins=config.cors_origins,
        metrics_public=config.metrics_public,
    )
    return run(app, listeners, log_level=config.log_level, notifier=notifier)


def run(
    app: FastAPI,
    listeners: list[Listener],
    *,
    log_level: str = "info",
    notifier: Notifier | None = None,
) -> int:
    """Run uvicorn on the bound listeners until a signal; then close them and remove the files.
    0, or 1 if the app never started (uvicorn has logged why)."""
    try:
        started = asyncio.run(_run(app, listeners, log_level, notifier or Notifier(None)))
    finally:
        close_listeners(listeners)
    return 0 if started else 1


class _Server(uvicorn.Server):
    """uvicorn's server, telling systemd when it serves and when it stops."""

    def __init__(self, config: uvicorn.Config, notifier: Notifier) -> None:
        super().__init__(config)
        self.notifier = notifier

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        # Started: the service has started (the lifespan) and the sockets accept.
        if self.started and not self.should_exit:
            self.notifier.notify("READY=1", f"STATUS=serving, pid {os.getpid()}")

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        self.notifier.notify("STOPPING=1")
        await super().shutdown(sockets)


async def _run(app: FastAPI, listeners: list[Listener], log_level: str, notifier: Notifier) -> bool:
    server = _Server(
        uvicorn.Config(
            app,
            loop="asyncio",  # never uvloop: pyroute2 breaks under it
            http="httptools",
            lifespan="on",
            timeout_graceful_shutdown=5,
            log_level=log_level,
            # Our logging, not uvicorn's: its lines go through the daemon's formatter, and the
            # access lines are the RequestId middleware's (with the request id and duration).
            log_config=None,
            access_log=False,
        ),
        notifier,
    )
    server_log = logging.getLogger("uvicorn.error")
    for only_ours in (LoggedOnce(), NoServerAccessLines()):
        server_log.addFilter(only_ours)

    # uvicorn re-raises the signal that stopped it once it has shut down, to whatever handler
    # was there before: make that one merely ask to stop, so SIGTERM or SIGINT exits 0.
    def stop(_signum: int, _frame: object) -> None:
        server.should_exit = True

    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, stop)
    for listener in listeners:
        log.info("listening on %s", listener.url)
    await server.serve(sockets=[listener.sock for listener in listeners])
    return server.started
