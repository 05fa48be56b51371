"""`sandboxd serve`: check the config, make the directories, bind, and run uvicorn until a signal.

Runs in the daemon process, as root, in the host's namespaces.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from pathlib import Path

import uvicorn
from fastapi import FastAPI

from api.app import create_app
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
    from daemon.network import NetworkError, preflight

    try:
        asyncio.run(preflight(config))
    except NetworkError as exc:
        raise ConfigError(str(exc)) from exc


def private_dir(path: Path) -> None:
    """Create `path` (and missing parents) and make it 0700, also when it already exists."""
    path.mkdir(parents=True, exist_ok=True)
    path.chmod(0o700)


def serve(config: Config) -> int:
    """Serve until SIGTERM or SIGINT; 0 then. Sandboxes outlive this (the service's business)."""
    # Every setting is checked before the first side effect.
    check_serve(config)
    check_network(config)
    # The private directories, 0700 even if they were there before.
    private_dir(config.run_dir)
    private_dir(config.state_dir)
    # The sockets, before the service: a second daemon stops here, before it adopts anything.
    listeners = bind_listeners(config.listen, run_dir=config.run_dir)
    try:
        # Imported here: the manager pulls in the kernel side, which `openapi` never needs.
        from daemon.service import SandboxManager

        service = SandboxManager(config)
    except BaseException:
        close_listeners(listeners)
        raise
    app = create_app(
        service, token=config.token, max_body=config.max_body, cors_origins=config.cors_origins
    )
    return run(app, listeners)


def run(app: FastAPI, listeners: list[Listener]) -> int:
    """Run uvicorn on the bound listeners until a signal; then close them and remove the files.
    0, or 1 if the app never started (uvicorn has logged why)."""
    try:
        started = asyncio.run(_run(app, listeners))
    finally:
        close_listeners(listeners)
    return 0 if started else 1


async def _run(app: FastAPI, listeners: list[Listener]) -> bool:
    server = uvicorn.Server(
        uvicorn.Config(
            app,
            loop="asyncio",  # never uvloop: pyroute2 breaks under it
            http="h11",
            lifespan="on",
            timeout_graceful_shutdown=5,
            log_level="info",
        )
    )

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
