"""The supervisor: PID 1 of a sandbox. It starts what it is asked to, reaps every process that
dies in the sandbox, kills an exec's whole tree at its deadline, and leaves each exec's output
and exit status in the runtime directory.

Runs in: B, PID 1 of the sandbox's PID namespace, in its mount, UTS, IPC and network
namespaces, but host root in the host's user namespace (so nothing inside can signal or
ptrace it). It is a fork of the warm zygote and imports nothing after pivot_root: the host's
Python installation is not visible from the sandbox's root. It never blocks: every fd is
non-blocking, and what the daemon is too slow to take waits in a bounded outbox.
"""

from __future__ import annotations

import base64
import contextlib
import errno
import fcntl
import heapq
import json
import os
import selectors
import signal
import socket
import struct
import termios
import time
from dataclasses import dataclass, field

from daemon.linux import cgroups, syscalls
from daemon.protocol import (
    EXECS_DIR,
    MAIN_EXEC,
    PROTOCOL_VERSION,
    STATUS_FILE,
    Configure,
    ErrorReply,
    ExecRequest,
    Exited,
    ExitStatus,
    Hello,
    Input,
    Message,
    Output,
    Resize,
    SendSignal,
    SpawnRequest,
    Started,
    Subscribe,
    Subscribed,
    Unsubscribe,
    decode,
    encode,
    signal_name,
    valid_exec_id,
)
from daemon.sandbox import spawn
from daemon.sandbox.logfile import LogWriter
from daemon.sandbox.spawn import EXIT_NOT_EXECUTABLE

_READ_CHUNK = 65536
_OUTBOX_LIMIT = 8 << 20  # past it, live output is dropped (never status messages)
_INBOX_LIMIT = 64 << 20
_INPUT_LIMIT = 1 << 20  # stdin bytes waiting for a process that does not read them
_DRAIN_POLL = 0.005
_TIOCSPTLCK = 0x40045431
_TIOCGPTPEER = 0x5441  # how often a killed exec's cgroup is checked for stragglers


@dataclass
class Stream:
    """One output of an exec: the first `limit` bytes go to a file, the rest nowhere."""

    name: str
    fd: int
    file_fd: int
    limit: int
    total: int = 0  # every byte read, kept or not: the offset of the next one
    truncated: bool = False
    log: LogWriter | None = None  # the main command's: its last bytes, with their times

    def keep(self, data: bytes) -> None:
        if self.file_fd < 0:
            return  # the exec has ended: later output of its children is not part of it
        room = self.limit - min(self.total, self.limit)
        if len(data) > room:
            self.truncated = True
        if room > 0:
            os.write(self.file_fd, data[:room])

    def close_file(self) -> None:
        if self.file_fd >= 0:
            os.close(self.file_fd)
            self.file_fd = -1
        if self.log is not None:
            self.log.close()
            self.log = None


@dataclass
class RunningExec:
    id: str
    pid: int
    streams: list[Stream]
    stdin_fd: int | None = None  # kept open for input: a pipe, or the pty's master
    tty: bool = False
    pending_input: bytearray = field(default_factory=bytearray)
    close_stdin_after_input: bool = False
    subscribed: bool = False
    timed_out: bool = False
    wait_status: int | None = None  # set once reaped, while its killed tree drains
    oom_kills_before: int = 0  # the OOM killer's count as it started (see finish)

    def stream(self, name: str) -> Stream:
        return next(s for s in self.streams if s.name == name)


class Supervisor:
    def __init__(
        self,
        req: SpawnRequest,
        listener: socket.socket,
        run_fd: int,
        sandbox_cgroups: cgroups.SandboxCgroups,
        userns_fd: int | None,
        ptmx_fd: int,
        wakeup_r: int,
        log_fd: int | None = None,
    ) -> None:
        self.req = req
        self.log_fd = log_fd  # the main command's log directory (daemon/sandbox/logfile.py)
        self.listener = listener
        self.execs_fd = os.open(
            EXECS_DIR, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=run_fd
        )
        self.cgroups = sandbox_cgroups
        self.userns_fd = userns_fd
        self.ptmx_fd = ptmx_fd
        self.wakeup_r = wakeup_r
        self.selector = selectors.DefaultSelector()
        self.conn: socket.socket | None = None
        self.inbox = bytearray()
        self.outbox = bytearray()
        self.running: dict[str, RunningExec] = {}  # by exec id
        self.pids: dict[int, RunningExec] = {}  # by pid, until reaped
        self.streams: dict[int, tuple[RunningExec, Stream]] = {}
        self.deadlines: list[tuple[float, str]] = []
        self.lingering: set[str] = set()  # cgroups of ended execs whose children live on
        self.main_pid: int | None = None
        # OOM kills reported with execs other than the main cmd: where the count is the
        # sandbox's (no memory cgroup per exec), the main cmd's report leaves them out.
        self.oom_kills_reported = 0

    # -- the loop ---------------------------------------------------------------------------

    def run(self) -> None:
        self.selector.register(self.listener, selectors.EVENT_READ, self.accept)
        self.selector.register(self.wakeup_r, selectors.EVENT_READ, self.reap)
        while True:
            self.handle_round(self.selector.select(self.next_timeout()))

    def handle_round(self, ready: list[tuple[selectors.SelectorKey, int]]) -> None:
        for key, events in ready:
            # An earlier handler of this round may have closed (or reused) the fd.
            if self.selector.get_map().get(key.fd) == key:
                self.dispatch(key, events)
        self.expire_deadlines()
        self.finish_drained()

    def dispatch(self, key: selectors.SelectorKey, events: int) -> None:
        """One event; what goes wrong with it is reported, and the sandbox goes on."""
        try:
            key.data(key.fd, events)
        except (OSError, ValueError, KeyError, StopIteration) as exc:
            self.send(ErrorReply(None, f"{type(exc).__name__}: {exc}"))

    def next_timeout(self) -> float | None:
        if any(e.wait_status is not None for e in self.running.values()):
            return _DRAIN_POLL
        if self.deadlines:
            return max(0.0, self.deadlines[0][0] - time.monotonic())
        return None

    # -- the daemon's connection --------------------------------------------------------------

    def accept(self, fd: int, events: int) -> None:
        conn, _ = self.listener.accept()
        self.drop_connection()  # a restarted daemon: the new connection wins
        conn.setblocking(False)
        self.conn, self.inbox, self.outbox = conn, bytearray(), bytearray()
        self.selector.register(conn, selectors.EVENT_READ, self.on_conn)
        for running in self.running.values():
            running.subscribed = False
        live = {e.id: e.pid for e in self.running.values() if e.wait_status is None}
        self.send(Hello(PROTOCOL_VERSION, live, self.finished_ids()))
        if self.req.cmd is not None and self.main_pid is None:
            # Only now: a main cmd that ends at once must find the daemon listening.
            self.start(ExecRequest(MAIN_EXEC, self.req.cmd, {}, "/", 0, None))

    def send(self, message: Message) -> None:
        if self.conn is None:
            return
        if isinstance(message, Output) and len(self.outbox) > _OUTBOX_LIMIT:
            return  # a follower too slow for the output: it sees a gap in the offsets
        self.outbox += encode(message)
        self.flush()

    def flush(self) -> None:
        assert self.conn is not None
        try:
            sent = self.conn.send(self.outbox)
        except BlockingIOError:
            sent = 0
        except OSError:
            self.drop_connection()
            return
        del self.outbox[:sent]
        wanted = selectors.EVENT_READ | (selectors.EVENT_WRITE if self.outbox else 0)
        self.selector.modify(self.conn, wanted, self.on_conn)

    def drop_connection(self) -> None:
        if self.conn is not None:
            self.selector.unregister(self.conn)
            self.conn.close()
            self.conn = None

    def on_conn(self, fd: int, events: int) -> None:
        if events & selectors.EVENT_WRITE:
            self.flush()
        if events & selectors.EVENT_READ and self.conn is not None:
            try:
                data = self.conn.recv(_READ_CHUNK)
            except BlockingIOError:
                return
            except OSError:
                data = b""
            if not data or len(self.inbox) > _INBOX_LIMIT:
                self.drop_connection()
                return
            self.inbox += data
            while (end := self.inbox.find(b"\n")) >= 0:
                line = bytes(self.inbox[:end])
                del self.inbox[: end + 1]
                self.handle(line)

    def handle(self, line: bytes) -> None:
        try:
            message = decode(line)
            if isinstance(message, ExecRequest):
                self.start(message)
                return
            if isinstance(message, Configure):
                self.req.env = {str(k): str(v) for k, v in message.env.items()}
                # Host root in the UTS namespace's owner: root inside cannot, we can.
                socket.sethostname(message.hostname)
                return
            if not isinstance(message, SendSignal | Subscribe | Unsubscribe | Input | Resize):
                raise ValueError(f"unexpected message {message.TYPE}")
            running = self.running.get(message.id)
            if running is None:
                return  # it ended meanwhile: the daemon learns that from EXITED
            if isinstance(message, SendSignal):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(running.pid, message.signal)
            elif isinstance(message, Subscribe):
                running.subscribed = True
                offsets = {s.name: s.total for s in running.streams}
                self.send(Subscribed(running.id, offsets))
            elif isinstance(message, Unsubscribe):
                running.subscribed = False
            elif isinstance(message, Input):
                self.feed(running, base64.b64decode(message.data), message.eof)
            elif running.tty and running.stdin_fd is not None:
                set_window_size(running.stdin_fd, message.rows, message.cols)  # a Resize
        except (ValueError, TypeError, KeyError, OSError) as exc:
            self.send(ErrorReply(_message_id(line), str(exc)))

    # -- starting an exec ---------------------------------------------------------------------

    def start(self, req: ExecRequest) -> None:
        if not valid_exec_id(req.id) or req.id in self.running:
            raise ValueError(f"invalid or duplicate exec id {req.id!r}")
        os.mkdir(req.id, 0o700, dir_fd=self.execs_fd)
        self.cgroups.make_leaf(req.id)
        dir_fd = os.open(req.id, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=self.execs_fd)
        try:
            running, child_stdio = self.open_stdio(req, dir_fd)
        except OSError:
            self.cgroups.remove_leaf(req.id)
            raise
        finally:
            os.close(dir_fd)
        env = {**self.req.env, **req.env}
        child_req = ExecRequest(req.id, req.cmd, env, req.cwd, req.uid, req.gid, tty=req.tty)
        running.oom_kills_before = self.cgroups.oom_kills(req.id)
        try:
            pid, joined = self.cgroups.fork_into_leaf(req.id)
        except OSError as exc:  # at the pids limit (EAGAIN), or out of memory
            self.not_started(req, running, child_stdio, exc)
            return
        if pid == 0:  # Child, in the sandbox, host root: becomes the exec's process.
            spawn.become(
                child_req, child_stdio, self.cgroups, self.userns_fd, joined, self.req.id_range
            )
        for fd in set(child_stdio):
            os.close(fd)
        running.pid = pid
        self.running[req.id] = self.pids[pid] = running
        for stream in running.streams:
            if stream.fd >= 0:
                self.streams[stream.fd] = (running, stream)
                self.selector.register(stream.fd, selectors.EVENT_READ, self.on_output)
        if req.timeout is not None:
            heapq.heappush(self.deadlines, (time.monotonic() + req.timeout, req.id))
        if req.id == MAIN_EXEC:
            self.main_pid = pid
        self.send(Started(req.id, pid))
        if req.stdin and running.stdin_fd is not None:
            self.feed(running, req.stdin.encode(), eof=not req.interactive)

    def not_started(
        self, req: ExecRequest, running: RunningExec, child_stdio: tuple[int, ...], exc: OSError
    ) -> None:
        """No process could be forked: the exec ends at once with 126 and says why on
        stderr, as a shell does (and as `docker exec` exits 126), and the sandbox goes on."""
        for fd in {*child_stdio, *(s.fd for s in running.streams), running.stdin_fd}:
            if fd is not None and fd >= 0:
                os.close(fd)
        why = f"sandboxd: cannot start {req.cmd[0]}: fork: {exc.strerror}"
        if exc.errno == errno.EAGAIN:
            why += " (the sandbox is at its limit of processes, limits.pids)"
        out, err = running.streams
        os.write(err.file_fd if err.file_fd >= 0 else out.file_fd, why.encode() + b"\n")
        for stream in running.streams:
            stream.close_file()
        status = ExitStatus(EXIT_NOT_EXECUTABLE, None, finished_at=time.time())
        write_status(self.execs_fd, req.id, status)
        self.cgroups.remove_leaf(req.id)
        self.send(Started(req.id, None))
        self.send(Exited(req.id, status))
        if req.id == MAIN_EXEC:
            self.shut_down()

    def open_stdio(self, req: ExecRequest, dir_fd: int) -> tuple[RunningExec, tuple[int, int, int]]:
        """The exec's output files and the fds its process gets as 0, 1 and 2."""
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
        files = [os.open(name, flags, 0o600, dir_fd=dir_fd) for name in ("stdout", "stderr")]
        limit = self.req.output_limit
        if req.tty:
            master, slave = self.open_pty()
            set_window_size(master, req.rows or 24, req.cols or 80)
            if self.req.uid_base is not None:  # its terminal is the user's, group tty inside
                os.fchown(slave, self.req.uid_base + req.uid, self.req.uid_base + 5)
            os.close(files[1])  # a terminal has one output: stderr stays empty
            streams = [Stream("stdout", master, files[0], limit), Stream("stderr", -1, -1, limit)]
            return RunningExec(req.id, 0, streams, stdin_fd=master, tty=True), (slave, slave, slave)
        out_r, out_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        err_r, err_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        for fd in (out_w, err_w):
            os.set_blocking(fd, True)
        streams = [
            Stream("stdout", out_r, files[0], limit),
            Stream("stderr", err_r, files[1], limit),
        ]
        if req.id == MAIN_EXEC and self.log_fd is not None:
            for stream in streams:
                stream.log = LogWriter(self.log_fd, stream.name, self.req.log_limit)
        if req.interactive or req.stdin:
            in_r, in_w = os.pipe2(os.O_CLOEXEC)
            os.set_blocking(in_w, False)
            return RunningExec(req.id, 0, streams, stdin_fd=in_w), (in_r, out_w, err_w)
        # stdin is empty: an empty memfd reads as end of file at once.
        return RunningExec(req.id, 0, streams), (
            os.memfd_create("stdin", os.MFD_CLOEXEC),
            out_w,
            err_w,
        )

    def open_pty(self) -> tuple[int, int]:
        """A new terminal of the sandbox's devpts, without a path root inside could swap."""
        flags = os.O_RDWR | os.O_NOCTTY | os.O_CLOEXEC
        master = os.open(f"/proc/self/fd/{self.ptmx_fd}", flags | os.O_NONBLOCK)
        try:
            fcntl.ioctl(master, _TIOCSPTLCK, struct.pack("i", 0))  # unlockpt
            slave = fcntl.ioctl(master, _TIOCGPTPEER, flags)
        except OSError:
            os.close(master)
            raise
        return master, slave

    # -- input and output ---------------------------------------------------------------------

    def feed(self, running: RunningExec, data: bytes, eof: bool) -> None:
        """Queue input for the exec's stdin; it is written as the process reads it."""
        if running.stdin_fd is None:
            return
        if len(running.pending_input) + len(data) > _INPUT_LIMIT:
            raise ValueError("too much input waiting for a process that does not read it")
        running.pending_input += data
        running.close_stdin_after_input |= eof
        self.write_input(running)

    def write_input(self, running: RunningExec) -> None:
        fd = running.stdin_fd
        assert fd is not None
        while running.pending_input:
            try:
                written = os.write(fd, running.pending_input)
            except BlockingIOError:
                break
            except OSError:  # the reader is gone: drop what it will never read
                running.pending_input.clear()
                break
            del running.pending_input[:written]
        if running.tty:
            return  # the master is also the output: it stays registered for reading
        if running.pending_input:
            with contextlib.suppress(KeyError):  # KeyError: already waiting to be writable
                self.selector.register(fd, selectors.EVENT_WRITE, self.on_input_ready)
        elif running.close_stdin_after_input:
            os.close(fd)
            running.stdin_fd = None

    def on_input_ready(self, fd: int, events: int) -> None:
        self.selector.unregister(fd)
        running = next(e for e in self.running.values() if e.stdin_fd == fd)
        self.write_input(running)

    def on_output(self, fd: int, events: int) -> None:
        running, stream = self.streams[fd]
        while True:
            try:
                data = os.read(fd, _READ_CHUNK)
            except BlockingIOError:
                return
            except OSError as exc:  # a pty's master reads EIO once no slave is left
                if exc.errno != errno.EIO:
                    raise
                data = b""
            if not data:
                self.close_stream(fd)
                return
            self.deliver(running, stream, data)

    def deliver(self, running: RunningExec, stream: Stream, data: bytes) -> None:
        if stream.file_fd < 0:
            return
        stream.keep(data)
        if stream.log is not None:
            try:
                stream.log.write(data, time.time())
            except OSError:  # the state directory's disk is full: the command goes on unlogged
                stream.log.close()
                stream.log = None
        if running.subscribed:
            encoded = base64.b64encode(data).decode()
            self.send(Output(running.id, stream.name, stream.total, encoded))
        stream.total += len(data)

    def close_stream(self, fd: int) -> None:
        self.selector.unregister(fd)
        del self.streams[fd]
        running = next((e for e in self.running.values() if e.stdin_fd == fd), None)
        if running is not None:  # a pty master: output and input end together
            running.stdin_fd = None
        os.close(fd)

    # -- deadlines ----------------------------------------------------------------------------

    def expire_deadlines(self) -> None:
        now = time.monotonic()
        while self.deadlines and self.deadlines[0][0] <= now:
            _, exec_id = heapq.heappop(self.deadlines)
            running = self.running.get(exec_id)
            if running is not None and not running.timed_out:
                running.timed_out = True
                # The exec's whole cgroup: setsid'd, double-forked and orphaned ones too.
                cgroups.write_file(f"{exec_id}/cgroup.kill", b"1", dir_fd=self.cgroups.tree)

    # -- endings ------------------------------------------------------------------------------

    def reap(self, fd: int, events: int) -> None:
        with contextlib.suppress(BlockingIOError):
            while os.read(self.wakeup_r, 4096):
                pass
        for pid, wait_status in syscalls.exited_children():
            running = self.pids.pop(pid, None)
            if running is not None:  # an orphan needs nothing but the reaping
                running.wait_status = wait_status
        self.finish_drained()
        for leaf in list(self.lingering):
            self.remove_leaf(leaf)

    def finish_drained(self) -> None:
        for running in [e for e in self.running.values() if e.wait_status is not None]:
            # A killed exec ends when its whole tree is gone, so none of it outlives the answer.
            if not running.timed_out or not cgroups.populated(self.cgroups.tree, running.id):
                self.finish(running)

    def finish(self, running: RunningExec) -> None:
        """Store how an exec ended: drain its output, write status.json, tell the daemon."""
        wait_status = running.wait_status
        assert wait_status is not None
        del self.running[running.id]
        for stream in running.streams:
            if stream.fd in self.streams:
                self.on_output(stream.fd, selectors.EVENT_READ)
            stream.close_file()
        if running.stdin_fd is not None and not running.tty:
            with contextlib.suppress(KeyError):
                self.selector.unregister(running.stdin_fd)
            os.close(running.stdin_fd)
            running.stdin_fd = None
        if os.WIFSIGNALED(wait_status):
            code, sig = None, signal_name(os.WTERMSIG(wait_status))
        else:
            code, sig = os.waitstatus_to_exitcode(wait_status), None
        # The OOM killer's victim dies of SIGKILL, its memory cgroup having counted the kill
        # before the signal was sent. Killed so, while the count rose, and not by its
        # deadline: the OOM killer's. (The count is the exec's own on cgroup v2, the
        # sandbox's on v1: see the README's Limits.)
        counted = max(0, self.cgroups.oom_kills(running.id) - running.oom_kills_before)
        oom = sig == "SIGKILL" and not running.timed_out and counted > 0
        # Every kill the count saw is reported once: with the exec it ran under, or with the
        # main cmd (which, on a sandbox-wide count, leaves out those reported with execs).
        kills = counted
        if running.pid != self.main_pid:
            self.oom_kills_reported += counted
        elif not self.cgroups.memory_per_exec:
            kills = max(int(oom), counted - self.oom_kills_reported)
        out, err = running.streams
        status = ExitStatus(
            code, sig, running.timed_out, out.truncated, err.truncated, time.time(), oom, kills
        )
        write_status(self.execs_fd, running.id, status)
        self.send(Exited(running.id, status))
        self.remove_leaf(running.id)
        if running.pid == self.main_pid:
            self.shut_down()

    def remove_leaf(self, exec_id: str) -> None:
        """An ended exec's cgroup goes once its background processes are gone too."""
        if self.cgroups.remove_leaf(exec_id):
            self.lingering.discard(exec_id)
        else:
            self.lingering.add(exec_id)

    def shut_down(self) -> None:
        """The main cmd ended: kill every process of the sandbox, record them, and exit."""
        with contextlib.suppress(ProcessLookupError):
            os.kill(-1, signal.SIGKILL)
        while self.pids:
            try:
                pid, wait_status = os.waitpid(-1, 0)
            except ChildProcessError:
                break
            running = self.pids.pop(pid, None)
            if running is not None:
                running.wait_status = wait_status
        for running in list(self.running.values()):
            if running.wait_status is not None:
                self.finish(running)
        os._exit(0)

    def finished_ids(self) -> list[str]:
        finished = []
        for name in os.listdir(self.execs_fd):
            with contextlib.suppress(OSError):
                os.stat(os.path.join(name, STATUS_FILE), dir_fd=self.execs_fd)
                finished.append(name)
        return finished


def set_window_size(fd: int, rows: int, cols: int) -> None:
    fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))


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
