"""The command line: where settings come from, refusing unsafe or bad ones, and the sockets."""

from __future__ import annotations

import os
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

import daemon.config
from api.sockets import ListenError, bind_listeners, bind_unix, close_listeners
from daemon.config import DEFAULT_SOCKET, Config, ConfigError, load_config

REPO = Path(__file__).resolve().parents[2]


def sandboxd() -> str:
    """The installed console script beside this interpreter (not a shim that may fork)."""
    script = Path(sys.executable).parent / "sandboxd"
    return str(script) if script.exists() else "sandboxd"


def test_console_script_is_installed() -> None:
    result = subprocess.run([sandboxd(), "--help"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and "serve" in result.stdout


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("SANDBOXD_")}
    # An empty config file, so that the machine's /etc/sandboxd/config.toml plays no part.
    # This checkout's code, whatever `sandboxd` is installed (a worktree's tests test it).
    return subprocess.run(
        [sys.executable, "-m", "api", *args],
        cwd=REPO,
        env={**clean, **(env or {})},
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.fixture
def no_default_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(daemon.config, "DEFAULT_CONFIG_FILE", tmp_path / "absent.toml")


# Where settings come from


def test_defaults_without_flags_environment_or_file(no_default_file: None) -> None:
    assert load_config({}, {}) == Config()
    assert Config().listen == [DEFAULT_SOCKET]


def test_flag_beats_environment_beats_file(tmp_path: Path, no_default_file: None) -> None:
    file = tmp_path / "config.toml"
    file.write_text('max_body = 111\noutput_limit = 111\nmax_sandboxes = 111\nstate_dir = "/f"\n')
    env = {"SANDBOXD_CONFIG": str(file), "SANDBOXD_MAX_BODY": "222", "SANDBOXD_OUTPUT_LIMIT": "222"}
    config = load_config({"max_body": "333", "state_dir": None}, env)
    assert config.max_body == 333  # flag over environment and file
    assert config.output_limit == 222  # environment over file
    assert config.max_sandboxes == 111  # file over default
    assert config.state_dir == Path("/f")
    assert config.run_dir == Config().run_dir  # default
    assert config.uid_base == Config().uid_base


def test_the_config_flag_beats_the_config_variable(tmp_path: Path) -> None:
    (tmp_path / "a.toml").write_text("max_body = 1\n")
    (tmp_path / "b.toml").write_text("max_body = 2\n")
    env = {"SANDBOXD_CONFIG": str(tmp_path / "a.toml")}
    assert load_config({"config": str(tmp_path / "b.toml")}, env).max_body == 2


def test_the_default_file_is_read_when_it_exists(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    file = tmp_path / "config.toml"
    file.write_text('listen = ["unix:///s/a.sock", "tcp://[::1]:8080"]\ntoken = "t0k"\n')
    monkeypatch.setattr(daemon.config, "DEFAULT_CONFIG_FILE", file)
    config = load_config({}, {})
    assert config.listen == ["unix:///s/a.sock", "tcp://[::1]:8080"]
    assert config.token == "t0k"


def test_listen_from_environment_is_comma_separated(no_default_file: None) -> None:
    env = {"SANDBOXD_LISTEN": "unix:///x/a.sock, tcp://127.0.0.1:1", "SANDBOXD_TOKEN": "t"}
    assert load_config({}, env).listen == ["unix:///x/a.sock", "tcp://127.0.0.1:1"]
    assert load_config({"listen": ["unix:///y.sock"]}, env).listen == ["unix:///y.sock"]


def test_the_default_socket_lives_in_the_run_dir(no_default_file: None) -> None:
    assert load_config({"run_dir": "/srv/rd"}, {}).listen == ["unix:///srv/rd/sandboxd.sock"]


def test_a_token_file_flag_beats_a_token_variable(tmp_path: Path, no_default_file: None) -> None:
    token_file = tmp_path / "token"
    token_file.write_text("from-file\n")
    env = {"SANDBOXD_TOKEN": "from-env"}
    assert load_config({"token_file": str(token_file)}, env).token == "from-file"
    assert load_config({}, env).token == "from-env"
    assert load_config({}, {"SANDBOXD_TOKEN": ""}).token is None


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("max_bodyy = 1\n", "unknown setting(s) max_bodyy"),
        ("max_body = 0\n", "at least 1"),
        ('max_body = "big"\n', "whole number"),
        ("max_body = true\n", "whole number"),
        ('state_dir = "relative"\n', "absolute path"),
        ('listen = "http://x"\n', "scheme"),
        ("listen = []\n", "listen URLs"),
        ('token = "a b"\n', "printable ASCII"),
        ('token = "a"\ntoken_file = "/t"\n', "not both"),
        ("uid_base = 1\n", "uid ranges"),
        ("max_body = \n", "not valid TOML"),
        ('bridge_name = "a-name-too-long0"\n', "interface name"),
        ('bridge_name = "br/0"\n', "interface name"),
        ('bridge_subnet = "10.1.2.3/16"\n', "host bits set"),
        ('bridge_subnet = "10.1.0.0/31"\n', "prefix from /8 to /30"),
        ('bridge_subnet = "127.0.0.0/8"\n', "not usable"),
        ("bridge_subnet = 10\n", "IPv4 network"),
        ('egress = "maybe"\n', "true or false"),
    ],
)
def test_a_bad_file_is_a_clear_error(
    tmp_path: Path, no_default_file: None, text: str, message: str
) -> None:
    file = tmp_path / "config.toml"
    file.write_text(text)
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_config({"config": str(file)}, {})


def test_bridge_settings_from_file_environment_and_flags(
    tmp_path: Path, no_default_file: None
) -> None:
    file = tmp_path / "config.toml"
    file.write_text('bridge_name = "br-file"\nbridge_subnet = "10.20.0.0/24"\negress = true\n')
    env = {"SANDBOXD_CONFIG": str(file), "SANDBOXD_BRIDGE_SUBNET": "10.30.0.0/24"}
    config = load_config({"egress": False}, env)
    assert config.bridge_name == "br-file"  # file over default
    assert str(config.bridge_subnet) == "10.30.0.0/24"  # environment over file
    assert config.egress is False  # flag (--no-egress) over file
    assert load_config({}, {"SANDBOXD_EGRESS": "yes"}).egress is True
    assert load_config({}, {}).bridge_subnet == Config().bridge_subnet


def test_the_pool_size_may_be_0_counts_in_the_uid_ranges_and_is_never_negative(
    no_default_file: None,
) -> None:
    assert load_config({}, {}).pool_size == 0
    assert load_config({"pool_size": "4"}, {"SANDBOXD_POOL_SIZE": "2"}).pool_size == 4
    assert load_config({}, {"SANDBOXD_POOL_SIZE": "0"}).pool_size == 0
    with pytest.raises(ConfigError, match="must be at least 0"):
        load_config({"pool_size": "-1"}, {})
    # The ranges of max_sandboxes + pool_size sandboxes must fit below 2**32.
    top = (2**32 - Config().uid_base) // 65536
    load_config({"max_sandboxes": str(top - 5), "pool_size": "5"}, {})
    with pytest.raises(ConfigError, match="pool_size 6"):
        load_config({"max_sandboxes": str(top - 5), "pool_size": "6"}, {})


def test_cleanup_is_a_command() -> None:
    result = run_cli("cleanup", "--help")
    assert result.returncode == 0 and "--bridge-name" in result.stdout
    result = run_cli("serve", "--help")
    assert "--bridge-subnet" in result.stdout and "--no-egress" in result.stdout


@pytest.mark.parametrize(
    "url", ["tcp://host", "tcp://:80", "tcp://h:99999", "unix://rel.sock", "unix:///", "udp://h:1"]
)
def test_a_bad_listen_url_is_a_clear_error(no_default_file: None, url: str) -> None:
    with pytest.raises(ConfigError, match="--listen"):
        load_config({"listen": [url]}, {})


def test_a_named_config_file_that_is_missing_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load_config({}, {"SANDBOXD_CONFIG": str(tmp_path / "missing.toml")})


# Refusing to start


def test_a_bad_value_exits_2_without_a_traceback(tmp_path: Path) -> None:
    config = tmp_path / "empty.toml"
    config.write_text("")
    result = run_cli("serve", "--config", str(config), "--max-body", "lots")
    assert result.returncode == 2
    assert "--max-body: expected a whole number" in result.stderr
    assert "Traceback" not in result.stderr
    result = run_cli("serve", "--config", str(config), env={"SANDBOXD_MAX_SANDBOXES": "-1"})
    assert result.returncode == 2
    assert "SANDBOXD_MAX_SANDBOXES: must be at least 1" in result.stderr


def test_a_tcp_listener_without_a_token_is_refused(tmp_path: Path) -> None:
    config = tmp_path / "empty.toml"
    config.write_text("")
    state = tmp_path / "state"
    run = Path(tempfile.mkdtemp(prefix="sbx-")) / "run"  # short: a socket path's limit
    result = run_cli(
        "serve",
        "--listen", "tcp://127.0.0.1:0",
        "--state-dir", str(state),
        "--run-dir", str(run),
        env={"SANDBOXD_CONFIG": str(config)},
    )  # fmt: skip
    assert result.returncode == 2, result.stderr
    assert "without a token" in result.stderr
    assert "Traceback" not in result.stderr
    # Refused before the first side effect.
    assert not state.exists()
    assert not run.exists()
    run.parent.rmdir()


# The unix socket binder


@pytest.fixture
def sockets() -> Iterator[list[socket.socket]]:
    opened: list[socket.socket] = []
    yield opened
    for sock in opened:
        sock.close()


def test_a_unix_socket_is_0660_whatever_the_umask(
    tmp_path: Path, sockets: list[socket.socket]
) -> None:
    path = tmp_path / "new" / "dir" / "sandboxd.sock"
    old = os.umask(0)
    try:
        sockets.append(bind_unix(path))
    finally:
        os.umask(old)
    assert stat.S_ISSOCK(path.stat().st_mode)
    assert stat.S_IMODE(path.stat().st_mode) == 0o660
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o755
    client = socket.socket(socket.AF_UNIX)
    client.connect(str(path))  # it listens
    client.close()


def test_a_socket_in_the_run_dir_gets_a_private_run_dir(
    tmp_path: Path, sockets: list[socket.socket]
) -> None:
    run_dir = tmp_path / "run"
    sockets.append(bind_unix(run_dir / "sandboxd.sock", run_dir=run_dir))
    assert stat.S_IMODE(run_dir.stat().st_mode) == 0o700


def test_a_live_socket_is_not_stolen(tmp_path: Path, sockets: list[socket.socket]) -> None:
    path = tmp_path / "sandboxd.sock"
    live = bind_unix(path)
    sockets.append(live)
    inode = path.stat().st_ino
    with pytest.raises(ListenError, match="already serving"):
        bind_unix(path)
    assert path.stat().st_ino == inode
    client = socket.socket(socket.AF_UNIX)
    client.connect(str(path))  # the first owner still answers
    client.close()


def test_a_stale_socket_is_replaced(tmp_path: Path, sockets: list[socket.socket]) -> None:
    path = tmp_path / "sandboxd.sock"
    dead = socket.socket(socket.AF_UNIX)
    dead.bind(str(path))
    dead.close()  # the file stays, nothing listens: a daemon that died
    sockets.append(bind_unix(path))
    assert stat.S_IMODE(path.stat().st_mode) == 0o660


def test_a_file_that_is_not_a_socket_is_left_alone(tmp_path: Path) -> None:
    path = tmp_path / "sandboxd.sock"
    path.write_text("precious")
    with pytest.raises(ListenError, match="not a socket"):
        bind_unix(path)
    assert path.read_text() == "precious"


def test_closing_removes_our_socket_but_not_a_successors(tmp_path: Path) -> None:
    ours, theirs = tmp_path / "a.sock", tmp_path / "b.sock"
    listeners = bind_listeners([f"unix://{ours}", f"unix://{theirs}"], run_dir=tmp_path)
    # A successor replaced b.sock: closing must not remove its socket.
    theirs.unlink()
    successor = bind_unix(theirs)
    close_listeners(listeners)
    assert not ours.exists()
    assert theirs.exists()
    successor.close()


def test_a_failed_bind_undoes_the_ones_before(tmp_path: Path) -> None:
    blocker = tmp_path / "blocker"
    blocker.write_text("")
    with pytest.raises(ListenError):
        bind_listeners([f"unix://{tmp_path}/a.sock", f"unix://{blocker}"], run_dir=tmp_path)
    assert not (tmp_path / "a.sock").exists()


# Serving for real: uvicorn on our socket, stopped by a signal

_SERVE = """
import sys
from pathlib import Path
from api.app import create_app
from api.serve import run
from api.sockets import bind_listeners
from tests.api.fakes import FakeService

path = Path(sys.argv[1])
listeners = bind_listeners([f"unix://{path}"], run_dir=path.parent)
raise SystemExit(run(create_app(FakeService(), token=None, max_body=1024), listeners))
"""


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_the_server_serves_on_the_socket_and_exits_0_on_a_signal(
    tmp_path: Path, sig: signal.Signals
) -> None:
    path = tmp_path / "sandboxd.sock"
    proc = subprocess.Popen(
        [sys.executable, "-c", _SERVE, str(path)],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        client = httpx.Client(transport=httpx.HTTPTransport(uds=str(path)), base_url="http://d")
        deadline = time.monotonic() + 20
        while True:
            try:
                if client.get("/healthz").status_code == 200:
                    break
            except httpx.TransportError:
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise
                time.sleep(0.05)
        assert stat.S_IMODE(path.stat().st_mode) == 0o660

        def chunks() -> Iterator[bytes]:
            yield b'{"labels": {"k": "'
            yield b"v" * 2048
            yield b'"}}'

        response = client.post(
            "/sandboxes", content=chunks(), headers={"Content-Type": "application/json"}
        )
        assert response.status_code == 413
        assert response.headers["content-type"] == "application/problem+json"
        client.close()
        proc.send_signal(sig)
        assert proc.wait(timeout=20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert not path.exists()


def test_the_example_config_and_the_reference_are_generated_from_the_declaration() -> None:
    assert (REPO / "deploy" / "config.example.toml").read_text() == daemon.config.example_toml()
    reference = (REPO / "docs" / "configuration.md").read_text()
    assert reference == daemon.config.reference_markdown()
    for name in daemon.config.Config.model_fields:
        assert f"`{name}" in reference or f"{name} (not" in reference


def test_the_example_config_shows_every_setting_and_loads(tmp_path: Path) -> None:
    example = daemon.config.example_toml()
    settings = [line[1:] for line in example.splitlines() if line[:2].strip("#").isalpha()]
    assert {line.split(" =")[0] for line in settings} == daemon.config.FILE_KEYS
    # Uncommented (one per key, the token's aside, which name no real token), the example
    # gives the defaults.
    first: dict[str, str] = {}
    for line in settings:
        first.setdefault(line.split(" =")[0], line)
    del first["token_file"], first["token"]
    file = tmp_path / "config.toml"
    file.write_text("\n".join(first.values()) + "\n")
    assert load_config({"config": str(file)}, {}) == Config()


def test_serve_has_a_flag_for_every_setting_but_the_file_only_ones() -> None:
    help_text = run_cli("serve", "--help").stdout
    for name, _, doc in daemon.config.settings():
        if daemon.config.Source.FLAG in doc.sources:
            assert doc.flag(name) in help_text, name
        if daemon.config.Source.ENV in doc.sources:
            assert doc.variable(name) in help_text.replace("\n", "").replace(" ", ""), name
