"""Execs in running sandboxes: starting one through its supervisor, signalling, feeding and
following it, and storing how it ended; and forgetting old ones.

Runs in: the daemon, on its event loop. The supervisor runs each exec (daemon/sandbox/supervisor.py)
and reports over the link; what it reports lands here (on_message), and an ended exec moves
from the sandbox's mailbox to the store (collect).

What the supervisor owes at once (STARTED, SUBSCRIBED) is awaited `supervisor_timeout`
seconds at most; an exec's end is owed only when its process ends, so a waited-for exec waits
as long as it runs, or, with timeout_seconds, until that deadline plus the supervisor's time.
An exec whose supervisor does not answer in time ends `exited` 255 (abandon) and the request
answers 504 (docs/supervisor-deadlines.md).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import sqlite3
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from signal import SIGKILL
from typing import BinaryIO, Literal

from daemon import logs
from daemon.errors import Conflict, SandboxError, SupervisorUnresponsive
from daemon.lifecycle.following import (
    STREAMS,
    Follower,
    OutputCursor,
    Subscription,
    read_prefix,
)
from daemon.lifecycle.mailbox import Sweeper, killed_exec_fields, read_output, read_status
from daemon.lifecycle.running import LiveSandbox, new_id, utcnow
from daemon.lifecycle.states import ExecState, LifecycleState
from daemon.lifecycle.supervisor_link import SupervisorLink
from daemon.lifecycle.views import exec_view
from daemon.protocol import (
    MAIN_EXEC,
    ErrorReply,
    ExecRequest,
    Exited,
    ExitStatus,
    Input,
    Message,
    Output,
    Resize,
    SendSignal,
    Started,
    Subscribe,
    Subscribed,
    Unsubscribe,
    exec_dir,
    valid_exec_id,
)
from daemon.shapes import Exec, ExecCreate, ExecExit, ExecOutput
from daemon.store.database import ExecRecord, Store

log = logging.getLogger(__name__)

_PIECE = 64 * 1024  # raw output is read and sent this much at a time


class Execs:
    """The execs of the sandboxes in `live` (the service's own dict), stored in `store()`."""

    def __init__(
        self,
        store: Callable[[], Store],
        live: dict[str, LiveSandbox],
        retention: int,
        cgroup: Callable[[str], Path],
    ) -> None:
        self._get_store = store  # the service opens it at start
        self.live = live
        self.retention = retention
        self.cgroup = cgroup  # a sandbox's cgroup2 directory, which holds a leaf per exec
        self.sweeper = Sweeper()  # stored execs' mailbox slots, emptied off the event loop

    @property
    def store(self) -> Store:
        return self._get_store()

    async def list(self, ref: str) -> list[Exec]:
        record = self.store.get_sandbox(ref)
        return [exec_view(e) for e in self.store.list_execs(record.id)]

    async def get(self, ref: str, exec_id: str) -> Exec:
        record = self.store.get_sandbox(ref)
        return exec_view(self.store.get_exec(record.id, exec_id))

    def running(self, ref: str) -> LiveSandbox:
        """The running sandbox `ref` names, to start an exec in: from memory when `ref` is
        the id of one this daemon runs and nothing holds it (no create, no teardown, whose
        steps hold its lock); else as the store has it, which raises NotFound or Conflict."""
        live = self.live.get(ref)
        if live is not None and live.running and live.link is not None and not live.lock.locked():
            return live
        record = self.store.get_sandbox(ref)
        live = self.live.get(record.id)
        if record.state != LifecycleState.RUNNING or live is None or live.link is None:
            raise Conflict(f"sandbox {record.id} is {record.state}, not running")
        return live

    async def exec(self, live: LiveSandbox, spec: ExecCreate) -> Exec:
        """Start an exec in the sandbox `running` has just found (nothing awaited since)."""
        sandbox_id, link = live.id, live.link
        assert link is not None  # as `running` found it
        uid, _, gid = spec.user.partition(":")
        exec_id = new_id("ex")
        logs.bind(sandbox_id=sandbox_id, exec_id=exec_id)  # the request's task
        loop = asyncio.get_running_loop()
        started: asyncio.Future[int | None] = loop.create_future()
        finished: asyncio.Future[ExecRecord | None] = loop.create_future()
        live.started[exec_id], live.finished[exec_id] = started, finished
        if spec.wait:
            live.quiet.add(exec_id)
        self.store.insert_exec(
            id=exec_id, sandbox_id=sandbox_id, cmd=spec.cmd, now=utcnow(), encoding=spec.encoding
        )
        # Bytes that are not text reach stdin as INPUT once the process runs: an EXEC's stdin
        # is a string. Its pipe stays open until then, as for an interactive exec.
        raw_stdin = spec.stdin if spec.encoding == "base64" else None
        try:
            await link.post(
                ExecRequest(
                    id=exec_id,
                    cmd=spec.cmd,
                    env=spec.env,
                    cwd=spec.cwd or "/",
                    uid=int(uid),
                    gid=int(gid) if gid else None,
                    stdin=None if raw_stdin is not None else spec.stdin,
                    timeout=spec.timeout_seconds,
                    interactive=spec.interactive or spec.tty or raw_stdin is not None,
                    tty=spec.tty,
                    rows=spec.tty_size.rows if spec.tty_size else None,
                    cols=spec.tty_size.cols if spec.tty_size else None,
                )
            )
            pid = await link.answer(started, "the exec")
        except ConnectionError as exc:  # the supervisor went away meanwhile: nothing ran
            live.started.pop(exec_id, None)
            live.finished.pop(exec_id, None)
            self.store.delete_exec(exec_id)
            raise Conflict(f"sandbox {sandbox_id} is no longer running") from exc
        except SupervisorUnresponsive as exc:
            self._abandon(live, link, exec_id, exc)
            raise
        except SandboxError:
            live.finished.pop(exec_id, None)
            self.store.finish_exec(exec_id, **killed_exec_fields())
            raise
        log.info("exec %s started", exec_id, extra={"pid": pid})
        if raw_stdin is not None and pid is not None:
            # The sandbox may end meanwhile: the exec then ends as its sandbox did.
            with contextlib.suppress(ConnectionError, SupervisorUnresponsive):
                eof = not (spec.interactive or spec.tty)
                await link.post(Input(exec_id, raw_stdin, eof))
        if spec.wait:
            ended = await self._ended(live, link, exec_id, finished, spec)
            if ended is not None:
                return exec_view(ended)
        return exec_view(self.store.get_exec(sandbox_id, exec_id))

    async def _ended(
        self,
        live: LiveSandbox,
        link: SupervisorLink,
        exec_id: str,
        finished: asyncio.Future[ExecRecord | None],
        spec: ExecCreate,
    ) -> ExecRecord | None:
        """A waited-for exec as it ended (None if its sandbox ended first). Without a
        deadline it may run as long as it likes; with one, the supervisor kills it then, and
        owes its end report within its own timeout after that."""
        if spec.timeout_seconds is None:
            return await finished
        try:
            return await link.answer(finished, "with its end", after=spec.timeout_seconds)
        except SupervisorUnresponsive as exc:
            self._abandon(live, link, exec_id, exc)
            raise

    def _abandon(
        self, live: LiveSandbox, link: SupervisorLink, exec_id: str, why: SupervisorUnresponsive
    ) -> None:
        """An exec its supervisor did not answer for in time: it ends now, `exited` 255 with
        the reason on stderr, and its process (should it run, or start later) is killed."""
        live.started.pop(exec_id, None)
        live.finished.pop(exec_id, None)
        live.quiet.discard(exec_id)
        path = Path(exec_dir(str(live.run_dir), exec_id))
        with contextlib.suppress(SandboxError):  # first result stored wins, as always
            self.store.finish_exec(
                exec_id,
                pid=live.pids.pop(exec_id, None),
                exit_code=255,
                signal=None,
                timed_out=False,
                stdout=read_output(path / "stdout"),
                stderr=read_output(path / "stderr") + f"sandboxd: {why.detail}\n".encode(),
                stdout_truncated=False,
                stderr_truncated=False,
                finished_at=utcnow(),
            )
        # Killed now through its cgroup leaf if the supervisor made one (a stopped supervisor
        # cannot signal), and by the supervisor once it reads again: this comes after the EXEC.
        with contextlib.suppress(OSError):
            (self.cgroup(live.id) / exec_id / "cgroup.kill").write_text("1")
        with contextlib.suppress(ConnectionError, SupervisorUnresponsive):
            link.send(SendSignal(exec_id, int(SIGKILL)))
        live.end_followers(exec_id)

    async def signal_exec(self, ref: str, exec_id: str, signal: int) -> Exec:
        link, found = self._running(ref, exec_id)
        await link.post(SendSignal(exec_id, signal))
        return exec_view(found)

    async def send_input(self, ref: str, exec_id: str, data: bytes, *, eof: bool) -> None:
        link, _ = self._running(ref, exec_id)
        encoded = base64.b64encode(data).decode()
        await link.post(Input(exec_id, encoded, eof))

    async def resize(self, ref: str, exec_id: str, rows: int, cols: int) -> None:
        link, _ = self._running(ref, exec_id)
        await link.post(Resize(exec_id, rows, cols))

    def _running(self, ref: str, exec_id: str) -> tuple[SupervisorLink, ExecRecord]:
        record = self.store.get_sandbox(ref)
        found = self.store.get_exec(record.id, exec_id)
        live = self.live.get(record.id)
        if found.state != ExecState.RUNNING or live is None or live.link is None:
            raise Conflict(f"exec {exec_id} has already ended")
        return live.link, found

    async def follow(
        self, ref: str, exec_id: str, *, follow: bool
    ) -> AsyncIterator[ExecOutput | ExecExit]:
        record = self.store.get_sandbox(ref)
        found = self.store.get_exec(record.id, exec_id)
        cursor = OutputCursor(found.encoding)
        live = self.live.get(record.id)
        if found.state == ExecState.RUNNING and live is not None and live.link is not None:
            path = Path(exec_dir(str(live.run_dir), exec_id))
            if follow:
                async for chunk in self._follow_live(live, exec_id, path, cursor):
                    yield chunk
            else:
                for stream in STREAMS:
                    text = cursor.feed(stream, 0, read_prefix(path / stream))
                    if text:
                        yield ExecOutput(stream=stream, data=text)
                return
        found = self.store.get_exec(record.id, exec_id)
        for stream in STREAMS:
            if rest := cursor.rest(stream, getattr(found, stream)):
                yield ExecOutput(stream=stream, data=rest)
        if found.state == ExecState.EXITED:
            yield ExecExit(exit=exec_view(found))

    async def _follow_live(
        self, live: LiveSandbox, exec_id: str, path: Path, cursor: OutputCursor
    ) -> AsyncIterator[ExecOutput]:
        """Files up to the offsets of the subscription, then the live chunks after them."""
        follower = Follower()
        live.followers.setdefault(exec_id, set()).add(follower)
        try:
            link = live.link
            assert link is not None
            try:
                await link.room()
                link.send(Subscribe(exec_id))
                # SUBSCRIBED answers come in the order of the SUBSCRIBEs: so does the queue.
                live.subscribing.setdefault(exec_id, deque()).append(follower)
                subscription = await link.answer(follower.subscribed, "a subscription")
            except SupervisorUnresponsive as exc:  # no live output: what the files hold so far
                log.warning("sandbox %s: exec %s: %s", live.id, exec_id, exc)
                for stream in STREAMS:
                    if text := cursor.feed(stream, 0, read_prefix(path / stream)):
                        yield ExecOutput(stream=stream, data=text)
                return
            if subscription is None:
                return
            for stream in STREAMS:
                text = cursor.feed(stream, 0, subscription.prefix[stream])
                cursor.seen[stream] = subscription.offsets[stream]  # past the limit: gone
                if text:
                    yield ExecOutput(stream=stream, data=text)
            while (chunk := await follower.queue.get()) is not None:
                stream, offset, data = chunk
                if text := cursor.feed(stream, offset, data):
                    yield ExecOutput(stream=stream, data=text)
        finally:
            followers = live.followers.get(exec_id)
            if followers is not None:
                followers.discard(follower)
                if not followers and live.link is not None:
                    del live.followers[exec_id]
                    with contextlib.suppress(ConnectionError, SupervisorUnresponsive):
                        live.link.send(Unsubscribe(exec_id))

    def raw_output(self, ref: str, exec_id: str, stream: str) -> Iterator[bytes]:
        """The bytes kept of one stream of an exec, in pieces: a running one's from its file
        in the mailbox (what it has written so far), an ended one's from the store. NotFound
        now, before the first piece, for an unknown sandbox or exec."""
        record = self.store.get_sandbox(ref)
        found = self.store.get_exec(record.id, exec_id)
        name: Literal["stdout", "stderr"] = "stdout" if stream == "stdout" else "stderr"
        live = self.live.get(record.id)
        if found.state == ExecState.RUNNING and live is not None:
            path = Path(exec_dir(str(live.run_dir), exec_id)) / name
            with contextlib.suppress(FileNotFoundError):  # stored meanwhile: the store has it
                return _file_pieces(open(path, "rb"))  # the iterator closes it
        return self.store.exec_output(exec_id, name)

    def on_message(self, live: LiveSandbox, message: Message) -> None:
        if isinstance(message, Started):
            exec_id, pid = message.id, message.pid  # pid None: not forked (EXITED 126 follows)
            if exec_id in live.quiet and pid is not None:
                live.pids[exec_id] = pid
            elif exec_id != MAIN_EXEC and pid is not None:
                self.store.set_exec_pid(exec_id, pid)
            future = live.started.pop(exec_id, None)
            if future is not None and not future.done():
                future.set_result(pid)
        elif isinstance(message, Output):
            chunk = (message.stream, message.offset, base64.b64decode(message.data))
            for follower in live.followers.get(message.id, ()):
                follower.push(chunk)
        elif isinstance(message, Subscribed):
            waiting = live.subscribing.get(message.id)
            if waiting:
                follower = waiting.popleft()
                if not follower.subscribed.done():
                    # Read now: an EXITED right behind it would empty the files (following.py).
                    path = Path(exec_dir(str(live.run_dir), message.id))
                    follower.subscribed.set_result(Subscription.read(path, message.offsets))
        elif isinstance(message, Exited) and message.id != MAIN_EXEC:
            self.collect(live, message.id, message.status)
        elif isinstance(message, ErrorReply):
            future = live.started.pop(str(message.id), None)
            if future is not None and not future.done():
                refused = {"id": message.id, "message": message.message}
                future.set_exception(SandboxError(f"the supervisor refused the exec: {refused}"))
            else:  # about no exec of ours (a CONFIGURE, a bad line): the log must show it
                log.error("sandbox %s: its supervisor reports: %s", live.id, message.message)

    def collect(self, live: LiveSandbox, exec_id: str, status: ExitStatus | None = None) -> None:
        """Move a finished exec from the mailbox to the store, then empty its mailbox slot.

        `status` is the one its EXITED carried: the supervisor wrote the same to status.json
        before sending it, so the file is read only when there was no message to carry it (a
        HELLO's `finished`, a teardown). Its output is always read from the files."""
        if not valid_exec_id(exec_id):  # named by PID 1: never a path out of its mailbox
            log.error("a supervisor named an exec %r: ignored", exec_id[:80])
            return
        if status is None:
            status = read_status(live.run_dir, exec_id)
            if status is None:
                return
        path = Path(exec_dir(str(live.run_dir), exec_id))
        ended, stored = None, True
        try:
            ended = self.store.finish_exec(
                exec_id,
                pid=live.pids.pop(exec_id, None),
                exit_code=status.exit_code,
                signal=status.signal,
                timed_out=status.timed_out,
                stdout=read_output(path / "stdout"),
                stderr=read_output(path / "stderr"),
                stdout_truncated=status.stdout_truncated,
                stderr_truncated=status.stderr_truncated,
                finished_at=datetime.fromtimestamp(status.finished_at, UTC),
                oom_killed=status.oom_killed,
                oom_kills=status.oom_kills,
            )
        except SandboxError:  # not this daemon's exec (any more)
            pass
        except sqlite3.Error as exc:  # a full disk, a lock held past the busy timeout
            stored = False
            log.error("exec %s: its end is not stored (%s); its mailbox keeps it", exec_id, exc)
        with logs.bound(exec_id=exec_id):
            _log_end(exec_id, status)
        if stored:  # else the next start stores it from the mailbox
            self.sweeper.empty(path)
        live.quiet.discard(exec_id)
        future = live.finished.pop(exec_id, None)
        if future is not None and not future.done():
            future.set_result(ended)
        live.end_followers(exec_id)

    async def forget_old(self) -> None:
        """Finished execs are kept `exec_retention` seconds, then their records go."""
        retention = timedelta(seconds=self.retention)
        while True:
            cutoff = utcnow() - retention
            forgotten = await asyncio.to_thread(self.store.delete_execs_finished_before, cutoff)
            if forgotten:
                log.info("forgot %d execs finished more than %s ago", forgotten, retention)
            await asyncio.sleep(min(60.0, self.retention / 4))


def _file_pieces(file: BinaryIO) -> Iterator[bytes]:
    with file:
        while piece := file.read(_PIECE):
            yield piece


def _log_end(exec_id: str, status: ExitStatus) -> None:
    """The line for an ended exec: one the OOM killer ended is a warning."""
    fields = {
        "exit_code": status.exit_code,
        "exit_signal": status.signal,
        "timed_out": status.timed_out,
        "oom_killed": status.oom_killed,
    }
    if status.oom_killed:
        log.warning("exec %s: the OOM killer ended it", exec_id, extra=fields)
    else:
        log.info("exec %s ended", exec_id, extra=fields)
