"""`sandboxd exec -it` in a real terminal (tmux): a shell that echoes, follows a resize, ends on
Ctrl-D or `exit N` with that status, and leaves the user's terminal as it found it, also after
Ctrl-C and when the daemon goes away in the middle of the session."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.cli.helpers import Tmux, command_line, ok, sandboxd
from tests.conftest import Daemon, Daemons

pytestmark = [
    pytest.mark.skipif(shutil.which("tmux") is None, reason="tmux is not installed"),
    pytest.mark.usefixtures("nothing_carries_over"),
]


@pytest.fixture
def tmux(tmp_path: Path) -> Iterator[Tmux]:
    terminal = Tmux(tmp_path)
    yield terminal
    terminal.kill()


@pytest.fixture
def box(daemon: Daemon) -> str:
    return ok(sandboxd(daemon, "run", "-d")).strip()


def stty_g(tty: str) -> str:
    """The terminal's settings as `stty -g` prints them, read from outside."""
    with open(tty) as device:
        result = subprocess.run(["stty", "-g"], stdin=device, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


def test_a_shell_echoes_follows_resizes_and_exits_with_its_status(
    daemon: Daemon, box: str, tmux: Tmux
) -> None:
    tmux.start(command_line(daemon, "exec", "-it", box, "sh"))
    tmux.line("echo hel''lo-$((6 * 7))")  # the answer, not the echo of what was typed
    tmux.wait_for("hello-42")
    tmux.line("stty size")
    tmux.wait_for("24 80")
    tmux.resize(30, 100)
    tmux.line("stty size")
    tmux.wait_for("30 100")
    tmux.line("exit 3")
    assert tmux.dead_status() == 3


def test_ctrl_d_ends_the_shell_with_status_0(daemon: Daemon, box: str, tmux: Tmux) -> None:
    tmux.start(command_line(daemon, "exec", "-it", box, "sh"))
    tmux.line("echo rea''dy")
    tmux.wait_for("ready")
    tmux.send("C-d")
    assert tmux.dead_status() == 0


def test_ctrl_c_reaches_the_command_and_the_terminal_is_cooked_again(
    daemon: Daemon, box: str, tmux: Tmux, tmp_path: Path
) -> None:
    tmux.start("sh")
    before, after = tmp_path / "before", tmp_path / "after"
    tmux.line(
        f"stty -g > {before}; {command_line(daemon, 'exec', '-it', box, 'sh')}; "
        f"echo client-ended-$?; stty -g > {after}"
    )
    tmux.line("echo insi''de")
    tmux.wait_for("inside")
    assert stty_g(tmux.pane_tty()) != before.read_text().strip()  # raw while attached
    tmux.line("sleep 600")
    tmux.send("C-c")  # to the sleep in the sandbox, not to the client
    tmux.line("echo sur''vived-$((1 + 1))")
    tmux.wait_for("survived-2")
    tmux.line("exit")
    tmux.wait_for("client-ended-0")
    assert after.read_text() == before.read_text()
    assert stty_g(tmux.pane_tty()) == before.read_text().strip()


def test_a_daemon_gone_mid_session_restores_the_terminal_in_one_line(
    daemons: Daemons, tmux: Tmux, tmp_path: Path
) -> None:
    own = daemons.new()
    ident = ok(sandboxd(own, "run", "-d")).strip()
    tmux.start("sh")
    before, after = tmp_path / "before", tmp_path / "after"
    tmux.line(
        f"stty -g > {before}; {command_line(own, 'exec', '-it', ident, 'sh')}; "
        f"echo client-ended-$?; stty -g > {after}"
    )
    tmux.line("echo insi''de")
    tmux.wait_for("inside")
    own.stop()
    screen = tmux.wait_for("client-ended-")
    assert "client-ended-0" not in screen
    errors = [line for line in screen.splitlines() if "sandboxd:" in line]
    assert len(errors) == 1 and "lost the connection" in errors[0], screen
    assert "Traceback" not in screen
    assert after.read_text() == before.read_text()
    own.start()
    own.destroy_all()
