"""Driving the `sandboxd` command as a user would: as a process (this checkout's code, `python
-m api`, the same code path as the installed script), and inside tmux for a real terminal."""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
from functools import cache
from pathlib import Path

import pytest

from tests.conftest import ROOT, Daemon, wait_for


def clean_env(**extra: str) -> dict[str, str]:
    """This environment without any SANDBOXD_ variable of the machine's, plus `extra`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SANDBOXD_")}
    return {**env, **extra}


def host(daemon: Daemon) -> str:
    return f"unix://{daemon.socket}"


def sandboxd(
    daemon: Daemon | None,
    *args: str,
    input: bytes | None = None,
    env: dict[str, str] | None = None,
    timeout: float = 120,
) -> subprocess.CompletedProcess[bytes]:
    """`sandboxd ARGS…` against `daemon`, its output as bytes."""
    where = {"SANDBOXD_HOST": host(daemon)} if daemon else {}
    return subprocess.run(
        [sys.executable, "-m", "api", *args],
        cwd=ROOT,
        env=clean_env(**where, **(env or {})),
        input=input,
        capture_output=True,
        timeout=timeout,
    )


def ok(result: subprocess.CompletedProcess[bytes]) -> str:
    """The stdout of a command that must have succeeded."""
    assert result.returncode == 0, result.stderr.decode(errors="replace")
    return result.stdout.decode()


def one_line_error(result: subprocess.CompletedProcess[bytes]) -> str:
    """The stderr of a command that must have failed in one line, without a traceback."""
    err = result.stderr.decode(errors="replace")
    assert result.returncode != 0, result.stdout
    assert "Traceback" not in err, err
    assert len(err.strip().splitlines()) == 1, err
    return err


def command_line(daemon: Daemon, *args: str) -> str:
    """A shell line that runs `sandboxd ARGS…` from this checkout against `daemon`."""
    words = [sys.executable, "-m", "api", *args]
    return f"SANDBOXD_HOST={shlex.quote(host(daemon))} " + " ".join(map(shlex.quote, words))


@cache
def app_routes() -> frozenset[str]:
    """The paths the HTTP app serves, in this checkout (as its OpenAPI document lists them)."""
    from api.app import create_app
    from tests.api.fakes import FakeService

    app = create_app(FakeService(), token=None, max_body=1024)
    return frozenset(app.openapi()["paths"])


def needs_route(route: str) -> pytest.MarkDecorator:
    """Skip a test whose endpoint this checkout's daemon does not have yet."""
    return pytest.mark.skipif(route not in app_routes(), reason=f"the app has no {route} yet")


def exec_takes_encoding() -> bool:
    from daemon.shapes import ExecCreate

    return "encoding" in ExecCreate.model_fields


class Tmux:
    """A tmux server of our own (its own socket), one session of a fixed size; panes stay
    after their command exits, so that its screen can be read.

    A command's exit status is written to a file by the shell that runs it, not read from
    tmux: tmux built with libutempter (Debian's) runs utempter's helper when the pane's
    terminal closes, with SIGCHLD at its default for that while, and a command that ends in
    that window (it closes the terminal as it exits) is never reaped, so tmux never learns
    its status. The shell traps SIGINT (a handler: the command gets the default back at
    exec) so that a Ctrl-C for the command leaves the shell to record how it ended.
    """

    def __init__(self, directory: Path, rows: int = 24, cols: int = 80) -> None:
        self.socket = directory / "tmux.sock"
        self.status = directory / "tmux.status"
        self.rows, self.cols = rows, cols
        config = directory / "tmux.conf"
        config.write_text("set -g remain-on-exit on\nset -g history-limit 5000\n")
        self.base = ["tmux", "-S", str(self.socket), "-f", str(config)]

    def tmux(self, *args: str) -> str:
        result = subprocess.run(
            [*self.base, *args], capture_output=True, text=True, timeout=30, env=clean_env()
        )
        assert result.returncode == 0, result.stderr
        return result.stdout

    def start(self, command: str) -> None:
        status = shlex.quote(str(self.status))
        line = f"trap : INT; {command}; echo $? > {status}.new && mv {status}.new {status}"
        self.tmux(
            "new-session", "-d", "-s", "t", "-x", str(self.cols), "-y", str(self.rows),
            "-c", str(ROOT), line,
        )  # fmt: skip

    def send(self, *keys: str) -> None:
        self.tmux("send-keys", "-t", "t", *keys)

    def line(self, text: str) -> None:
        self.send("-l", text)
        self.send("Enter")

    def screen(self) -> str:
        return self.tmux("capture-pane", "-p", "-J", "-S", "-", "-t", "t")

    def wait_for(self, text: str, timeout: float = 30) -> str:
        found = wait_for(lambda: text in self.screen(), timeout=timeout)
        assert found, f"{text!r} never appeared:\n{self.screen()}"
        return self.screen()

    def dead_status(self, timeout: float = 30) -> int:
        """The pane's command's exit status once it has ended (128+n for a death by signal n)."""
        ended = wait_for(self.status.exists, timeout=timeout)
        assert ended, f"the pane's command never ended:\n{self.screen()}"
        return int(self.status.read_text())

    def resize(self, rows: int, cols: int) -> None:
        self.tmux("resize-window", "-t", "t", "-x", str(cols), "-y", str(rows))

    def pane_tty(self) -> str:
        return self.tmux("display", "-p", "-t", "t", "#{pane_tty}").strip()

    def kill(self) -> None:
        subprocess.run([*self.base, "kill-server"], capture_output=True, timeout=30)
