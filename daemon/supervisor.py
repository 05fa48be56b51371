"""The supervisor: PID 1 of a sandbox. It starts what it is asked to, reaps every process that
dies in the sandbox, and leaves each exec's output and exit status in the runtime directory.

Runs in: B, PID 1 of the sandbox's PID namespace, in its mount, UTS, IPC and network
namespaces, but host root in the host's user namespace (so nothing inside can signal or
ptrace it). It is a fork of the warm zygote and imports nothing after pivot_root: the host's
Python installation is not visible from the sandbox's root.
"""

from __future__ import annotations

import contextlib
import json
import os
import selectors
import signal
import socket
import time
from dataclasses import dataclass, field

from daemon import execchild
from daemon.protocol import (
    EXECS_DIR,
    MAIN_EXEC,
    STATUS_FILE,
    ExecRequest,
    ExitStatus,
    MessageType,
    SpawnRequest,
    decode,
    encode,
    signal_name,
    valid_exec_id,
)

_READ_CHUNK = 65536
_SEND_TIMEOUT = 5.0


@dataclass
class Stream:
    """One of an exec's output pipes: the first `limit` bytes go to a file, the rest nowhere."""

    fd: int
    file_fd: int
    limit: int
    kept: int = 0
    truncated: bool = False

    def pump(self) -> bool:
        """Read what is there now; False at end of file."""
        while True:
            try:
                data = os.read(self.fd, _READ_CHUNK)
            except BlockingIOError:
                return True
            if not data:
                return False
            self.keep(data)

    def keep(self, data: bytes) -> None:
        if self.file_fd < 0:
            return  # the exec has ended: later output of its children is not part of it
        room = self.limit - self.kept
        if len(data) > room:
            self.truncated = True
            data = data[:room]
        if data:
            os.write(self.file_fd, data)
            self.kept += len(data)

    def close_file(self) -> None:
        if self.file_fd >= 0:
            os.close(self.file_fd)
            self.file_fd = -1


@dataclass
class RunningExec:
    id: str
    pid: int
    streams: list[Stream] = field(default_factory=list)


class Supervisor:
    def __init__(
        self,
        req: SpawnRequest,
        listener: socket.socket,
        run_fd: int,
        userns_fd: int | None,
        wakeup_r: int,
    ) -> None:
        self.req = req
        self.listener = listener
        self.run_fd = run_fd
        self.execs_fd = os.open(
            EXECS_DIR, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=run_fd
        )
        self.userns_fd = userns_fd
        self.wakeup_r = wakeup_r
        self.selector = selectors.DefaultSelector()
        self.conn: socket.socket | None = None
        self.inbox = b""
        self.running: dict[int, RunningExec] = {}
        self.streams: dict[int, Stream] = {}
        self.main_pid: int | None = None

    # -- the loop ---------------------------------------------------------------------------

    def run(self) -> None:
        self.selector.register(self.listener, selectors.EVENT_READ, "accept")
        self.selector.register(self.wakeup_r, selectors.EVENT_READ, "reap")
        if self.req.cmd is not None:
            self.start(ExecRequest(MAIN_EXEC, self.req.cmd, {}, "/", 0, None))
        while True:
            for key, _ in self.selector.select():
                if self.selector.get_map().get(key.fd) != key:
                    continue  # an earlier handler of this round closed (or reused) the fd
                if key.data == "accept":
                    self.accept()
                elif key.data == "reap":
                    self.reap()
                elif key.data == "conn":
                    self.receive()
                else:
                    self.pump(key.fd)

    def accept(self) -> None:
        conn, _ = self.listener.accept()
        if self.conn is not None:  # a restarted daemon: the new connection wins
            self.selector.unregister(self.conn)
            self.conn.close()
        conn.settimeout(_SEND_TIMEOUT)
        conn.set_inheritable(False)
        self.conn, self.inbox = conn, b""
        self.selector.register(conn, selectors.EVENT_READ, "conn")
        running = {e.id: e.pid for e in self.running.values()}
        self.send(MessageType.HELLO, running=running, finished=self.finished_ids())

    def send(self, kind: MessageType, **fields: object) -> None:
        if self.conn is None:
            return
        try:
            self.conn.sendall(encode(kind, **fields))
        except OSError:
            self.drop_connection()

    def drop_connection(self) -> None:
        if self.conn is not None:
            self.selector.unregister(self.conn)
            self.conn.close()
            self.conn = None

    def receive(self) -> None:
        assert self.conn is not None
        try:
            data = self.conn.recv(_READ_CHUNK)
        except OSError:
            data = b""
        if not data:
            self.drop_connection()
            return
        self.inbox += data
        while b"\n" in self.inbox:
            line, self.inbox = self.inbox.split(b"\n", 1)
            self.handle(line)

    def handle(self, line: bytes) -> None:
        try:
            kind, message = decode(line)
            if kind is MessageType.EXEC:
                self.start(ExecRequest(**message))
            elif kind is MessageType.SIGNAL:
                self.signal(message["id"], int(message["signal"]))
            else:
                raise ValueError(f"unexpected message {kind}")
        except (ValueError, TypeError, KeyError, OSError) as exc:
            self.send(MessageType.ERROR, id=_message_id(line), message=str(exc))

    # -- execs --------------------------------------------------------------------------------

    def start(self, req: ExecRequest) -> None:
        if not valid_exec_id(req.id):
            raise ValueError(f"invalid exec id {req.id!r}")
        os.mkdir(req.id, 0o700, dir_fd=self.execs_fd)
        dir_fd = os.open(req.id, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=self.execs_fd)
        try:
            streams, child_ends = self.open_streams(dir_fd)
            stdin = os.memfd_create("stdin", os.MFD_CLOEXEC)
            if req.stdin:
                os.write(stdin, req.stdin.encode())
                os.lseek(stdin, 0, os.SEEK_SET)
            env = {**self.req.env, **req.env}
            req = ExecRequest(req.id, req.cmd, env, req.cwd, req.uid, req.gid, None)
            pid = os.fork()
            if pid == 0:  # Child, in the sandbox, host root: becomes the exec's process.
                execchild.become(req, (stdin, child_ends[0], child_ends[1]), self.userns_fd)
            for fd in (stdin, *child_ends):
                os.close(fd)
        finally:
            os.close(dir_fd)
        self.running[pid] = RunningExec(req.id, pid, streams)
        for stream in streams:
            self.streams[stream.fd] = stream
            self.selector.register(stream.fd, selectors.EVENT_READ, "stream")
        if req.id == MAIN_EXEC:
            self.main_pid = pid
        self.send(MessageType.STARTED, id=req.id, pid=pid)

    def open_streams(self, dir_fd: int) -> tuple[list[Stream], list[int]]:
        streams, child_ends = [], []
        for name in ("stdout", "stderr"):
            read_end, write_end = os.pipe2(os.O_CLOEXEC)
            os.set_blocking(read_end, False)
            flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
            file_fd = os.open(name, flags, 0o600, dir_fd=dir_fd)
            streams.append(Stream(read_end, file_fd, self.req.output_limit))
            child_ends.append(write_end)
        return streams, child_ends

    def signal(self, exec_id: str, signum: int) -> None:
        for running in self.running.values():
            if running.id == exec_id:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(running.pid, signum)
                return

    def pump(self, fd: int) -> None:
        if not self.streams[fd].pump():
            self.close_stream(fd)

    def close_stream(self, fd: int) -> None:
        self.selector.unregister(fd)
        os.close(fd)
        del self.streams[fd]

    def reap(self) -> None:
        with contextlib.suppress(BlockingIOError):
            while os.read(self.wakeup_r, 4096):
                pass
        while True:
            try:
                pid, wait_status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            running = self.running.pop(pid, None)
            if running is not None:  # an orphan needs nothing but the reaping
                self.finish(running, wait_status)

    def finish(self, running: RunningExec, wait_status: int) -> None:
        """Store how an exec ended: drain its pipes, write status.json, tell the daemon."""
        for stream in running.streams:
            if stream.fd in self.streams and not stream.pump():
                self.close_stream(stream.fd)
            stream.close_file()
        if os.WIFSIGNALED(wait_status):
            code, sig = None, signal_name(os.WTERMSIG(wait_status))
        else:
            code, sig = os.waitstatus_to_exitcode(wait_status), None
        out, err = running.streams
        status = ExitStatus(code, sig, False, out.truncated, err.truncated, time.time())
        write_status(self.execs_fd, running.id, status)
        self.send(MessageType.EXITED, id=running.id, **json.loads(status.to_json()))
        if running.pid == self.main_pid:
            self.shut_down()

    def shut_down(self) -> None:
        """The main cmd ended: kill every process of the sandbox, record them, and exit."""
        with contextlib.suppress(ProcessLookupError):
            os.kill(-1, signal.SIGKILL)
        while self.running:
            try:
                pid, wait_status = os.waitpid(-1, 0)
            except ChildProcessError:
                break
            running = self.running.pop(pid, None)
            if running is not None:
                self.finish(running, wait_status)
        os._exit(0)

    def finished_ids(self) -> list[str]:
        finished = []
        for name in os.listdir(self.execs_fd):
            with contextlib.suppress(OSError):
                os.stat(os.path.join(name, STATUS_FILE), dir_fd=self.execs_fd)
                finished.append(name)
        return finished


def write_status(execs_fd: int, exec_id: str, status: ExitStatus) -> None:
    """status.json appears whole or not at all: written aside, then renamed into place."""
    tmp = os.path.join(exec_id, STATUS_FILE + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600, dir_fd=execs_fd)
    try:
        os.write(fd, status.to_json())
    finally:
        os.close(fd)
    os.rename(tmp, os.path.join(exec_id, STATUS_FILE), src_dir_fd=execs_fd, dst_dir_fd=execs_fd)


def _message_id(line: bytes) -> str | None:
    with contextlib.suppress(ValueError, AttributeError):
        value = json.loads(line).get("id")
        return value if isinstance(value, str) else None
    return None


def install_signal_handlers() -> int:
    """SIGCHLD wakes the loop through a pipe; SIGINT (Python's default handler) is dropped.

    As PID 1 of its namespace, the supervisor gets from outside only the signals it handles
    (and SIGKILL): ignoring the rest keeps a stray signal from the host from ending it.
    """
    wakeup_r, wakeup_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
    signal.set_wakeup_fd(wakeup_w, warn_on_full_buffer=False)
    signal.signal(signal.SIGCHLD, lambda signum, frame: None)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGPIPE, signal.SIG_IGN)
    return wakeup_r
