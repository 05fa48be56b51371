"""The `sandboxd` client against a real daemon: run, ps, inspect, exec, rm, stats, the errors a
user sees, help and completion; cp, logs, events and images once the daemon has their routes."""

from __future__ import annotations

import hashlib
import io
import json
import os
import random
import re
import socket
import stat
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from daemon.config import Source, settings
from tests.cli.helpers import (
    Tmux,
    clean_env,
    command_line,
    exec_takes_encoding,
    host,
    needs_route,
    ok,
    one_line_error,
    sandboxd,
)
from tests.conftest import ROOT, Daemon, Daemons, wait_for

pytestmark = pytest.mark.usefixtures("nothing_carries_over")

CLIENT_COMMANDS = [
    "ps", "run", "exec", "logs", "cp", "stats", "events", "inspect", "rm", "images", "pull",
    "import", "rmi", "info", "completion",
]  # fmt: skip
DAEMON_COMMANDS = ["serve", "cleanup", "recover", "migrate", "openapi", "settings"]


def run_detached(daemon: Daemon, *args: str) -> str:
    return ok(sandboxd(daemon, "run", "-d", *args)).strip()


# -- help and completion -----------------------------------------------------------------------


def test_every_command_is_listed_and_each_client_command_has_an_example() -> None:
    listed = ok(sandboxd(None, "--help"))
    for name in CLIENT_COMMANDS + DAEMON_COMMANDS:
        assert f"  {name} " in listed, name
    for name in CLIENT_COMMANDS:
        text = ok(sandboxd(None, name, "--help"))
        assert "Examples:" in text and f"sandboxd {name}" in text.split("Examples:")[1], name


def test_serve_help_lists_every_setting_of_the_declaration() -> None:
    text = ok(sandboxd(None, "serve", "--help"))
    flags = [doc.flag(name) for name, _field, doc in settings() if Source.FLAG in doc.sources]
    assert flags and all(flag in text for flag in flags), [f for f in flags if f not in text]


def test_shell_completion_comes_from_the_library() -> None:
    script = ok(sandboxd(None, "completion", "bash"))
    assert "_SANDBOXD_COMPLETE" in script
    words = {"_SANDBOXD_COMPLETE": "bash_complete", "COMP_WORDS": "sandboxd ex", "COMP_CWORD": "1"}
    offered = ok(sandboxd(None, env=words))
    assert "exec" in offered and "ps" not in offered


# -- run, ps, inspect, rm ---------------------------------------------------------------------


def test_run_detached_then_ps_inspect_and_rm(daemon: Daemon) -> None:
    ident = run_detached(
        daemon, "--name", "cli-web", "--label", "team=ci", "-e", "GREETING=hi there",
        "--memory", "64m", "--pids", "50", "--cpus", "0.5", "--ttl", "1h",
    )  # fmt: skip
    assert ident.startswith("sb_")
    table = ok(sandboxd(daemon, "ps"))
    assert "cli-web" in table and ident in table and "running" in table
    listed = json.loads(ok(sandboxd(daemon, "ps", "--format", "json", "--label", "team=ci")))
    assert [item["id"] for item in listed] == [ident]
    assert listed[0]["limits"]["memory_bytes"] == 64 * 1024**2
    assert listed[0]["limits"]["pids"] == 50 and listed[0]["limits"]["cpus"] == 0.5
    assert listed[0]["expires_at"] is not None
    [inspected] = json.loads(ok(sandboxd(daemon, "inspect", "cli-web")))
    assert inspected["id"] == ident and inspected["env"]["GREETING"] == "hi there"
    assert inspected["labels"] == {"team": "ci"}

    # A running sandbox is removed only with -f, as `docker rm` asks; several at once.
    refused = sandboxd(daemon, "rm", "cli-web")
    assert "rm -f" in one_line_error(refused)
    other = run_detached(daemon)
    assert ok(sandboxd(daemon, "rm", "-f", "cli-web", other)).split() == ["cli-web", other]
    assert json.loads(ok(sandboxd(daemon, "ps", "-a", "--format", "json"))) == []
    assert daemon.client.get(f"/sandboxes/{ident}").status_code == 404


def test_run_waits_for_its_command_and_exits_with_its_status(daemon: Daemon) -> None:
    result = sandboxd(daemon, "run", "--name", "cli-four", "sh", "-c", "exit 4")
    assert result.returncode == 4, result.stderr
    [ended] = json.loads(ok(sandboxd(daemon, "inspect", "cli-four")))
    assert ended["state"] == "exited" and ended["exit"]["exit_code"] == 4
    assert "cli-four" in ok(sandboxd(daemon, "ps", "-a"))
    assert "cli-four" not in ok(sandboxd(daemon, "ps"))  # not running: only with -a
    result = sandboxd(daemon, "run", "--rm", "--name", "cli-killed", "sh", "-c", "kill -9 $$")
    assert result.returncode == 128 + 9
    assert daemon.client.get("/sandboxes/cli-killed").status_code == 404  # --rm


@needs_route("/sandboxes/{ref}/logs")
def test_run_prints_its_commands_output(daemon: Daemon) -> None:
    result = sandboxd(daemon, "run", "--rm", "sh", "-c", "echo out; echo err >&2; exit 5")
    assert result.returncode == 5
    assert result.stdout == b"out\n" and result.stderr == b"err\n"


def test_run_with_a_bad_option_says_what_is_wrong(daemon: Daemon) -> None:
    err = one_line_error(sandboxd(daemon, "run", "-d", "--name", "no good"))
    assert "name" in err
    assert daemon.client.get("/sandboxes").json()["items"] == []  # nothing was made


# -- exec --------------------------------------------------------------------------------------


def test_exec_streams_and_exits_with_the_commands_status(daemon: Daemon) -> None:
    ident = run_detached(daemon)
    result = sandboxd(daemon, "exec", ident, "sh", "-c", "echo out; echo err >&2; exit 3")
    assert (result.returncode, result.stdout, result.stderr) == (3, b"out\n", b"err\n")
    assert sandboxd(daemon, "exec", ident, "sh", "-c", "kill -TERM $$").returncode == 128 + 15
    assert sandboxd(daemon, "exec", ident, "no-such-program").returncode == 127


def test_exec_takes_env_workdir_and_user(daemon: Daemon) -> None:
    ident = run_detached(daemon)
    script = 'echo "$K|$(pwd)|$(id -u)"'
    out = ok(sandboxd(daemon, "exec", "-e", "K=v w", "-w", "/tmp", "-u", "1000", ident,
                      "sh", "-c", script))  # fmt: skip
    assert out == "v w|/tmp|1000\n"


def test_exec_pipes_stdin_byte_exact(daemon: Daemon) -> None:
    ident = run_detached(daemon)
    data = bytes(range(256)) * 64 + random.randbytes(1 << 20)
    out = ok(sandboxd(daemon, "exec", "-i", ident, "sha256sum", input=data))
    assert out.split()[0] == hashlib.sha256(data).hexdigest()
    # Without -i the command's stdin is empty, as with `docker exec`.
    assert ok(sandboxd(daemon, "exec", ident, "wc", "-c", input=data)).strip() == "0"


@pytest.mark.skipif(not exec_takes_encoding(), reason="exec has no `encoding` yet")
def test_exec_output_is_byte_exact(daemon: Daemon) -> None:
    ident = run_detached(daemon)
    data = bytes(range(256)) * 16 + random.randbytes(1 << 16)
    assert sandboxd(daemon, "exec", "-i", ident, "cat", input=data).stdout == data
    assert sandboxd(daemon, "exec", ident, "printf", "\\377\\000\\n").stdout == b"\xff\x00\n"


# -- stats -------------------------------------------------------------------------------------


def test_stats_once_as_a_table_and_as_json(daemon: Daemon) -> None:
    ident = run_detached(daemon, "--name", "cli-stats")
    assert "cli-stats" in ok(sandboxd(daemon, "stats"))
    [sample] = json.loads(ok(sandboxd(daemon, "stats", "--format", "json", "cli-stats")))
    assert sample["id"] == ident and sample["pids_current"] >= 1
    assert "memory_current_bytes" in sample and "cpu_seconds" in sample


# -- what a user sees when something is wrong ---------------------------------------------------


def test_an_unknown_sandbox_is_the_daemons_detail_in_one_line(daemon: Daemon) -> None:
    for args in (["exec", "nope", "true"], ["inspect", "nope"], ["rm", "-f", "nope"]):
        err = one_line_error(sandboxd(daemon, *args))
        assert "nope" in err, args


def test_an_unreachable_daemon_is_one_line(tmp_path: Path) -> None:
    gone = f"unix://{tmp_path}/absent.sock"
    err = one_line_error(sandboxd(None, "ps", env={"SANDBOXD_HOST": gone}))
    assert "cannot reach the daemon" in err and gone in err
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))  # bound, never listening: refused
    port = closed.getsockname()[1]
    try:
        err = one_line_error(sandboxd(None, "--host", f"tcp://127.0.0.1:{port}", "ps"))
    finally:
        closed.close()
    assert "cannot reach the daemon" in err
    err = one_line_error(sandboxd(None, "ps", env={"SANDBOXD_HOST": "ftp://x"}))
    assert "unix://" in err


def test_a_missing_or_wrong_token_is_one_line_and_tcp_works(daemons: Daemons) -> None:
    probe = socket.socket()
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    probe.close()
    guarded = daemons.new("--token", "s3cret", "--listen", f"tcp://127.0.0.1:{port}")
    guarded.client.headers["Authorization"] = "Bearer s3cret"  # for the module's cleanup
    tcp = f"tcp://127.0.0.1:{port}"
    err = one_line_error(sandboxd(None, "--host", tcp, "ps"))
    assert "refused" in err and "SANDBOXD_TOKEN" in err
    err = one_line_error(sandboxd(None, "--host", tcp, "ps", env={"SANDBOXD_TOKEN": "wrong"}))
    assert "token is wrong" in err
    right = {"SANDBOXD_TOKEN": "s3cret"}
    assert "NAME" in ok(sandboxd(None, "--host", tcp, "ps", env=right))
    # The attach WebSocket carries the token too.
    ident = ok(sandboxd(None, "--host", tcp, "run", "-d", env=right)).strip()
    piped = sandboxd(None, "--host", tcp, "exec", "-i", ident, "cat", input=b"ok\n", env=right)
    assert piped.stdout == b"ok\n"
    guarded.destroy_all()


# -- cp, logs, events, images: once the daemon has their routes ---------------------------------


@needs_route("/sandboxes/{ref}/archive")
def test_cp_a_binary_file_both_ways(daemon: Daemon, tmp_path: Path) -> None:
    ident = run_detached(daemon)
    data = bytes(range(256)) * 256 + random.randbytes(3 << 20)
    source = tmp_path / "blob.bin"
    source.write_bytes(data)
    ok(sandboxd(daemon, "cp", str(source), f"{ident}:/tmp/"))  # into a directory: its name
    ok(sandboxd(daemon, "cp", str(source), f"{ident}:/tmp/renamed.bin"))  # a new name
    sums = ok(sandboxd(daemon, "exec", ident, "sha256sum", "/tmp/blob.bin", "/tmp/renamed.bin"))
    assert [line.split()[0] for line in sums.splitlines()] == [hashlib.sha256(data).hexdigest()] * 2
    back = tmp_path / "back.bin"
    ok(sandboxd(daemon, "cp", f"{ident}:/tmp/renamed.bin", str(back)))
    assert back.read_bytes() == data
    assert back.stat().st_uid == os.getuid()


@needs_route("/sandboxes/{ref}/archive")
def test_cp_a_tree_both_ways(daemon: Daemon, tmp_path: Path) -> None:
    ident = run_detached(daemon)
    tree = tmp_path / "app"
    (tree / "lib" / "deep").mkdir(parents=True)
    (tree / "lib" / "deep" / "x.bin").write_bytes(b"\x00\xff" * 1000)
    (tree / "run.sh").write_text("#!/bin/sh\necho run\n")
    (tree / "run.sh").chmod(0o755)
    (tree / "link").symlink_to("run.sh")
    ok(sandboxd(daemon, "cp", str(tree), f"{ident}:/srv"))  # /srv exists: /srv/app
    assert ok(sandboxd(daemon, "exec", ident, "/srv/app/link")) == "run\n"
    out = tmp_path / "out"
    out.mkdir()
    ok(sandboxd(daemon, "cp", f"{ident}:/srv/app", str(out)))  # an existing directory: out/app
    copy = out / "app"
    assert (copy / "lib" / "deep" / "x.bin").read_bytes() == b"\x00\xff" * 1000
    assert stat.S_IMODE((copy / "run.sh").stat().st_mode) == 0o755
    assert os.readlink(copy / "link") == "run.sh"
    ok(sandboxd(daemon, "cp", f"{ident}:/srv/app", str(tmp_path / "named")))  # a new name
    assert (tmp_path / "named" / "run.sh").read_text() == "#!/bin/sh\necho run\n"
    # `-` is a tar on stdout.
    tarred = sandboxd(daemon, "cp", f"{ident}:/srv/app/run.sh", "-").stdout
    with tarfile.open(fileobj=io.BytesIO(tarred)) as archive:
        assert [m.name.rstrip("/") for m in archive.getmembers()] == ["run.sh"]


@needs_route("/sandboxes/{ref}/logs")
def test_logs_of_the_main_command(daemon: Daemon) -> None:
    ident = run_detached(daemon, "sh", "-c", "echo first; echo second >&2; sleep 1; echo third")
    followed = sandboxd(daemon, "logs", "-f", ident)
    assert followed.stdout == b"first\nthird\n" and followed.stderr == b"second\n"
    assert ok(sandboxd(daemon, "logs", "--stream", "stdout", ident)) == "first\nthird\n"


@needs_route("/events")
def test_events_as_json(daemon: Daemon) -> None:
    ident = run_detached(daemon)
    ok(sandboxd(daemon, "rm", "-f", ident))
    events = json.loads(ok(sandboxd(daemon, "events", "--no-follow", "--format", "json")))
    types = [e["type"] for e in events if e.get("sandbox_id") == ident]
    assert types[0] == "sandbox.created" and "sandbox.destroyed" in types


@needs_route("/images")
def test_images_as_json_and_an_unknown_image(daemon: Daemon) -> None:
    assert isinstance(json.loads(ok(sandboxd(daemon, "images", "--format", "json"))), list)
    assert "no-such" in one_line_error(sandboxd(daemon, "rmi", "no-such:1"))


@needs_route("/events")
def test_events_follow_as_json_lines(daemon: Daemon) -> None:
    follower = subprocess.Popen(
        [sys.executable, "-m", "api", "events", "--since", "0", "--format", "json"],
        cwd=ROOT, env=clean_env(SANDBOXD_HOST=host(daemon)), stdout=subprocess.PIPE,
    )  # fmt: skip
    try:
        ident = run_detached(daemon)
        assert follower.stdout is not None
        seen = []
        for line in follower.stdout:
            event = json.loads(line)
            if event.get("sandbox_id") == ident:
                seen.append(event["type"])
                break
        assert seen == ["sandbox.created"]
    finally:
        follower.terminate()
        follower.wait(30)


def test_stats_watch_redraws_with_cpu_percent_until_ctrl_c(daemon: Daemon, tmp_path: Path) -> None:
    run_detached(daemon, "--name", "cli-watched", "sh", "-c", "while :; do :; done")
    tmux = Tmux(tmp_path, rows=10, cols=120)
    try:
        tmux.start(command_line(daemon, "stats", "--watch", "--interval", "0.5", "cli-watched"))
        # A percentage needs two samples: the table has been drawn again.
        assert wait_for(lambda: re.search(r"cli-watched\s+\d+\.\d%", tmux.screen()), 60)
        tmux.send("C-c")
        assert tmux.dead_status() == 0
    finally:
        tmux.kill()


@needs_route("/sandboxes/{ref}/archive")
def test_cp_shows_bytes_and_rate_on_a_terminal(daemon: Daemon, tmp_path: Path) -> None:
    ident = run_detached(daemon)
    big = tmp_path / "big.bin"
    big.write_bytes(random.randbytes(32 << 20))
    tmux = Tmux(tmp_path, rows=10, cols=120)
    try:
        tmux.start(command_line(daemon, "cp", str(big), f"{ident}:/tmp/big.bin"))
        assert tmux.dead_status(timeout=120) == 0, tmux.screen()
        screen = tmux.screen()
    finally:
        tmux.kill()
    assert re.search(r"33\.\d/33\.\d MB", screen) and re.search(r"[\d.]+ [kMG]?B/s", screen), screen


@needs_route("/sandboxes/{ref}/logs")
def test_logs_are_the_bytes_written(daemon: Daemon) -> None:
    ident = run_detached(daemon, "printf", "\\377\\000\\n")
    assert sandboxd(daemon, "logs", "-f", ident).stdout == b"\xff\x00\n"
