"""The native PID 1's protocol, spoken to it directly from Python: sandboxd-init runs as PID 1
of a new PID namespace on the host (`unshare --pid --fork`), with a listening socket, a
mailbox, a cgroup2 directory and the seccomp program of its own, as B would hand them over;
the test is the daemon. Run with the static binary and with the ASan/UBSan one."""

from __future__ import annotations

import base64
import contextlib
import json
import os
import random
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from daemon.linux import cgroups
from daemon.sandbox import hardening, native
from tests.conftest import wait_for


class Init:
    """One sandboxd-init and the daemon's end of its socket."""

    def __init__(self, binary: Path, cmd: list[str] | None = None) -> None:
        mount = cgroups.find_cgroup2()
        assert mount is not None
        self.root = Path(tempfile.mkdtemp(prefix="sandboxd-init-test-"))
        self.cgroup = mount / f"sandboxd-init-test-{random.randrange(16**8):08x}"
        self.proc: subprocess.Popen[bytes] | None = None
        self.conn: socket.socket | None = None
        try:
            self.start(binary, cmd)
        except BaseException:
            self.close()
            raise

    def start(self, binary: Path, cmd: list[str] | None) -> None:
        self.cgroup.mkdir()
        (self.root / "execs").mkdir()
        (self.root / "log").mkdir()
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(str(self.root / "supervisor.sock"))
        self.listener.listen(8)
        fds = {
            "listener": self.listener.fileno(),
            "run": os.open(self.root, os.O_RDONLY | os.O_DIRECTORY),
            "tree": os.open(self.cgroup, os.O_RDONLY | os.O_DIRECTORY),
            "ptmx": os.open("/dev/pts/ptmx", os.O_PATH),
            "log": os.open(self.root / "log", os.O_RDONLY | os.O_DIRECTORY),
        }
        hardening.prepare()
        seccomp = os.memfd_create("seccomp-bpf", 0)
        os.write(seccomp, hardening.program_bytes())
        config = {
            **fds,
            "memory": None,
            "memory_per_exec": False,
            "userns": None,
            "seccomp": seccomp,
            "uid_base": None,
            "output_limit": 1000,
            "log_limit": 4096,
            "keep_caps": hardening.KEPT_MASK,
            "cap_last": hardening.last_capability(),
            "cmd": cmd,
            "env": {"FROM_SANDBOX": "1"},
        }
        config_fd = os.memfd_create("config", 0)
        os.write(config_fd, json.dumps(config).encode())
        passed = [*fds.values(), seccomp, config_fd]
        self.proc = subprocess.Popen(
            ["unshare", "--pid", "--fork", "--kill-child", str(binary), str(config_fd)],
            pass_fds=passed,
            env={"ASAN_OPTIONS": "detect_leaks=0", "UBSAN_OPTIONS": "halt_on_error=1"},
            stderr=subprocess.PIPE,
        )
        self.listener.detach()  # closed with the others: sandboxd-init holds it now
        for fd in passed:
            os.close(fd)
        self.conn = self.connect()

    @property
    def link(self) -> socket.socket:
        assert self.conn is not None
        return self.conn

    def connect(self) -> socket.socket:
        conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        conn.settimeout(20)
        conn.connect(str(self.root / "supervisor.sock"))
        self.reader = conn.makefile("rb")
        return conn

    def send(self, **message: Any) -> None:
        self.link.sendall(json.dumps(message).encode() + b"\n")

    def send_raw(self, line: bytes) -> None:
        self.link.sendall(line + b"\n")

    def receive(self) -> dict[str, Any]:
        line = self.reader.readline()
        assert line, "sandboxd-init closed the connection"
        message: dict[str, Any] = json.loads(line)
        return message

    def until(self, kind: str, exec_id: str | None = None) -> dict[str, Any]:
        """The next message of `kind` (for `exec_id`), skipping others."""
        while True:
            message = self.receive()
            if message["type"] == kind and (exec_id is None or message.get("id") == exec_id):
                return message

    def exec(self, exec_id: str, cmd: list[str], **extra: Any) -> None:
        body = {"id": exec_id, "cmd": cmd, "env": {}, "cwd": "/", "uid": 0, "gid": None}
        self.send(type="exec", **body | extra)

    def mailbox(self, exec_id: str) -> Path:
        return self.root / "execs" / exec_id

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()
        if self.proc is None:
            with contextlib.suppress(FileNotFoundError):
                self.cgroup.rmdir()
            shutil.rmtree(self.root)
            return
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)
        if self.proc.stderr is not None:
            errors = self.proc.stderr.read().decode(errors="replace")
            self.proc.stderr.close()
            assert "Sanitizer" not in errors and "runtime error" not in errors, errors
        cgroups.remove_when_empty(self.cgroup, timeout=5)
        shutil.rmtree(self.root)


@pytest.fixture(params=["static", "sanitized"])
def binary(request: pytest.FixtureRequest, sanitized: Path) -> Path:
    return native.BINARY if request.param == "static" else sanitized


@pytest.fixture
def init(binary: Path) -> Iterator[Init]:
    instance = Init(binary)
    yield instance
    instance.close()


def test_hello_then_an_exec_runs_and_its_status_is_in_the_mailbox(init: Init) -> None:
    hello = init.receive()
    assert hello == {"type": "hello", "version": 1, "running": {}, "finished": []}
    init.exec("e1", ["sh", "-c", 'echo "out $FROM_SANDBOX $HOME"; echo err >&2; exit 3'])
    started = init.receive()
    assert started["type"] == "started" and started["id"] == "e1" and started["pid"] > 1
    exited = init.until("exited", "e1")
    assert exited["status"]["exit_code"] == 3 and exited["status"]["signal"] is None
    on_disk = json.loads((init.mailbox("e1") / "status.json").read_text())
    assert on_disk == exited["status"]
    assert (init.mailbox("e1") / "stdout").read_bytes() == b"out 1 /root\n"
    assert (init.mailbox("e1") / "stderr").read_bytes() == b"err\n"


def test_not_found_is_127_and_not_executable_126(init: Init) -> None:
    init.receive()
    init.exec("missing", ["no-such-command"])
    assert init.until("exited", "missing")["status"]["exit_code"] == 127
    assert b"command not found" in (init.mailbox("missing") / "stderr").read_bytes()
    init.exec("dir", ["/etc"])
    assert init.until("exited", "dir")["status"]["exit_code"] == 126
    init.exec("cwd", ["true"], cwd="/no/such/dir")
    assert init.until("exited", "cwd")["status"]["exit_code"] == 126


def test_the_exec_is_hardened(init: Init) -> None:
    init.receive()
    script = "grep -E '^(CapBnd|CapEff|NoNewPrivs|Seccomp):' /proc/self/status; ls /proc/self/fd"
    init.exec("h", ["sh", "-c", script])
    init.until("exited", "h")
    fields = dict(
        line.split(":\t") for line in (init.mailbox("h") / "stdout").read_text().splitlines()[:4]
    )
    assert int(fields["CapBnd"], 16) == hardening.KEPT_MASK
    assert int(fields["CapEff"], 16) == hardening.KEPT_MASK
    assert fields["NoNewPrivs"] == "1" and fields["Seccomp"] == "2"


def test_errors_are_messages_and_the_loop_goes_on(init: Init) -> None:
    init.receive()
    init.send_raw(b"not json")
    assert init.receive() == {
        "type": "error",
        "id": None,
        "message": "not a JSON line: invalid literal",
    }
    init.send(type="signal", id="x", signal=9, extra=1)
    error = init.receive()
    assert error["type"] == "error" and error["id"] == "x"
    init.exec("../evil", ["true"])
    assert init.receive()["type"] == "error"
    init.exec("ok", ["true"])
    assert init.until("exited", "ok")["status"]["exit_code"] == 0
    init.exec("ok", ["true"])  # its directory is there: a duplicate
    assert init.receive()["type"] == "error"


def test_signal_input_and_live_output(init: Init) -> None:
    init.receive()
    init.exec("cat", ["cat"], interactive=True)
    init.until("started", "cat")
    init.send(type="subscribe", id="cat")
    assert init.until("subscribed", "cat")["offsets"] == {"stdout": 0, "stderr": 0}
    init.send(type="input", id="cat", data=base64.b64encode(b"hello\n").decode())
    output = init.until("output", "cat")
    assert base64.b64decode(output["data"]) == b"hello\n" and output["offset"] == 0
    init.send(type="input", id="cat", data="", eof=True)
    assert init.until("exited", "cat")["status"]["exit_code"] == 0
    init.exec("sleep", ["sleep", "60"])
    init.until("started", "sleep")
    init.send(type="signal", id="sleep", signal=15)
    assert init.until("exited", "sleep")["status"]["signal"] == "SIGTERM"


def test_stdin_text_reaches_the_process_whole(init: Init) -> None:
    init.receive()
    init.exec("in", ["cat"], stdin="a\x00b ☃\n")
    init.until("exited", "in")
    assert (init.mailbox("in") / "stdout").read_bytes() == "a\x00b ☃\n".encode()


def test_output_past_the_limit_is_truncated(init: Init) -> None:
    init.receive()
    init.exec("big", ["sh", "-c", "head -c 5000 /dev/zero"])
    assert init.until("exited", "big")["status"]["stdout_truncated"] is True
    assert (init.mailbox("big") / "stdout").stat().st_size == 1000


def test_a_deadline_kills_the_whole_tree(init: Init) -> None:
    init.receive()
    init.exec("slow", ["sh", "-c", "setsid sleep 60 & sleep 60"], timeout=0.2)
    status = init.until("exited", "slow")["status"]
    assert status["timed_out"] is True and status["signal"] == "SIGKILL"
    assert (
        not (init.cgroup / "slow").exists()
        or cgroups.read_key(init.cgroup / "slow" / "cgroup.events", "populated") == 0
    )


def test_a_terminal_with_its_size_and_a_resize(init: Init) -> None:
    init.receive()
    script = "stty size; read line; stty size"
    init.exec("t", ["sh", "-c", script], tty=True, interactive=True, rows=30, cols=100)
    init.until("started", "t")
    # Its first answer is in the mailbox (it may come before any SUBSCRIBE could).
    stdout = init.mailbox("t") / "stdout"
    assert wait_for(lambda: b"30 100" in stdout.read_bytes())
    init.send(type="resize", id="t", rows=40, cols=120)
    init.send(type="input", id="t", data=base64.b64encode(b"go\n").decode())
    init.until("exited", "t")
    assert b"40 120" in (init.mailbox("t") / "stdout").read_bytes()


def test_configure_sets_the_env_of_later_execs(init: Init) -> None:
    init.receive()
    init.send(type="configure", hostname=socket.gethostname(), env={"TAKEN": "yes"})
    init.exec("env", ["sh", "-c", 'echo "$TAKEN-$FROM_SANDBOX"'])
    init.until("exited", "env")
    assert (init.mailbox("env") / "stdout").read_text() == "yes-\n"


def test_a_new_connection_gets_a_hello_with_what_runs_and_what_finished(init: Init) -> None:
    init.receive()
    init.exec("done", ["true"])
    init.until("exited", "done")
    init.exec("long", ["sleep", "60"])
    pid = init.until("started", "long")["pid"]
    init.link.close()
    init.conn = init.connect()
    hello = init.receive()
    assert hello["running"] == {"long": pid} and hello["finished"] == ["done"]


def test_the_main_command_ending_ends_everything(binary: Path) -> None:
    init = Init(binary, cmd=["sh", "-c", "sleep 60 & echo main; exit 7"])
    try:
        assert init.receive()["type"] == "hello"
        init.until("started", "main")
        assert init.until("exited", "main")["status"]["exit_code"] == 7
        assert init.proc is not None
        assert init.proc.wait(10) == 0  # PID 1 exits, its namespace's processes killed
        assert (init.mailbox("main") / "stdout").read_bytes() == b"main\n"
        assert (init.root / "log" / "stdout").stat().st_size == 12 + len(b"main\n")
    finally:
        init.close()
