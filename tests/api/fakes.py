"""An in-memory SandboxService for testing the HTTP layer; the kernel is tested elsewhere.

It keeps the contract's observable rules (names unique, exec only into a running sandbox,
the sandbox limit, signals only to running execs) and records every call it gets.
"""

from __future__ import annotations

import builtins
import itertools
import signal as signal_module
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

from daemon.errors import Conflict, LimitReached, NotFound
from daemon.lifecycle.states import ExecState, ExitReason, SandboxState
from daemon.shapes import (
    Exec,
    ExecCreate,
    ExecExit,
    ExecOutput,
    ExitInfo,
    Info,
    LogLine,
    NetworkView,
    PoolCounts,
    Sandbox,
    SandboxCounts,
    SandboxCreate,
    SandboxStats,
    hostname_from_name,
)

MUTATING = frozenset({"create", "destroy", "exec", "signal_exec", "set_ttl"})


class FakeService:
    def __init__(self, max_sandboxes: int = 10) -> None:
        self.max_sandboxes = max_sandboxes
        self.sandboxes: dict[str, Sandbox] = {}
        self.execs: dict[str, dict[str, Exec]] = {}
        self.calls: list[str] = []
        self.started = False
        self.stopped = False
        self._ids = itertools.count(1)

    @property
    def mutations(self) -> list[str]:
        return [c for c in self.calls if c in MUTATING]

    async def start(self) -> None:
        self.started = True

    async def stop(self) -> None:
        self.stopped = True

    async def info(self) -> Info:
        self.calls.append("info")
        running = sum(s.state == SandboxState.RUNNING for s in self.sandboxes.values())
        return Info(
            version="0.1.0",
            kernel="6.0.0-fake",
            cgroup="v2",
            sandboxes=SandboxCounts(running=running, total=len(self.sandboxes)),
            pool=PoolCounts(size=0, ready=0),
            pid=1,
            state_dir="/var/lib/sandboxd",
            run_dir="/run/sandboxd",
            bridge_name="sandboxd0",
            bridge_subnet="10.42.0.0/22",
            cgroup_name="sandboxd",
            uid_base=1_000_000_000,
            uid_last=1_000_000_000 + 1000 * 65536 - 1,
        )

    async def create(self, spec: SandboxCreate, idempotency_key: str | None = None) -> Sandbox:
        self.calls.append("create")
        if spec.name is not None and any(s.name == spec.name for s in self.sandboxes.values()):
            raise Conflict(f"the name {spec.name!r} is in use")
        if len(self.sandboxes) >= self.max_sandboxes:
            raise LimitReached(f"the daemon holds its limit of {self.max_sandboxes} sandboxes")
        sandbox_id = f"sb{next(self._ids):04d}"
        now = datetime.now(UTC)
        sandbox = Sandbox(
            id=sandbox_id,
            name=spec.name,
            state=SandboxState.RUNNING,
            hostname=spec.hostname or hostname_from_name(spec.name or sandbox_id),
            namespaces=spec.namespaces,
            rootfs=spec.rootfs,
            mounts=spec.mounts,
            cmd=spec.cmd,
            env=spec.env,
            network=NetworkView(mode=spec.network.mode, ports=spec.network.ports),
            limits=spec.limits,
            labels=spec.labels,
            pid=4242,
            created_at=now,
            started_at=now,
            finished_at=None,
            expires_at=None,
            exit=None,
        )
        self.sandboxes[sandbox_id] = sandbox
        self.execs[sandbox_id] = {}
        return sandbox

    async def list(self, states: list[SandboxState], labels: dict[str, str]) -> list[Sandbox]:
        self.calls.append("list")
        return [
            s
            for s in self.sandboxes.values()
            if (not states or s.state in states)
            and all(s.labels.get(k) == v for k, v in labels.items())
        ]

    async def get(self, ref: str) -> Sandbox:
        self.calls.append("get")
        return self._find(ref)

    async def destroy(self, ref: str) -> None:
        self.calls.append("destroy")
        sandbox = self._find(ref)
        del self.sandboxes[sandbox.id]
        del self.execs[sandbox.id]

    async def stats(self, ref: str) -> SandboxStats:
        self.calls.append("stats")
        sandbox = self._find(ref)
        if sandbox.state != SandboxState.RUNNING:
            raise Conflict(f"sandbox {sandbox.id} is {sandbox.state}, not running")
        return SandboxStats(
            memory_current_bytes=1 << 20,
            memory_peak_bytes=2 << 20,
            cpu_seconds=0.5,
            pids_current=1,
            pids_peak=3,
            oom_kills=0,
        )

    async def set_ttl(self, ref: str, ttl_seconds: float | None) -> Sandbox:
        self.calls.append("set_ttl")
        sandbox = self._find(ref)
        expires_at = datetime.now(UTC) + timedelta(seconds=ttl_seconds) if ttl_seconds else None
        sandbox = sandbox.model_copy(update={"expires_at": expires_at})
        self.sandboxes[sandbox.id] = sandbox
        return sandbox

    async def exec(self, ref: str, spec: ExecCreate) -> Exec:
        self.calls.append("exec")
        sandbox = self._find(ref)
        if sandbox.state != SandboxState.RUNNING:
            raise Conflict(f"sandbox {sandbox.id} is {sandbox.state}, not running")
        execs = self.execs[sandbox.id]
        finished = spec.wait
        # `echo` prints its arguments; anything else prints nothing and exits 0.
        stdout = " ".join(spec.cmd[1:]) + "\n" if spec.cmd[0] == "echo" and finished else ""
        execution = Exec(
            id=f"ex{len(execs) + 1}",
            sandbox_id=sandbox.id,
            cmd=spec.cmd,
            state=ExecState.EXITED if finished else ExecState.RUNNING,
            pid=7,
            exit_code=0 if finished else None,
            signal=None,
            timed_out=False,
            stdout=stdout,
            stderr="warning\n" if finished and spec.cmd[0] == "echo" else "",
            stdout_truncated=False,
            stderr_truncated=False,
            oom_killed=False,
            started_at=datetime.now(UTC),
            finished_at=datetime.now(UTC) if finished else None,
        )
        execs[execution.id] = execution
        return execution

    async def follow(
        self, ref: str, exec_id: str, *, follow: bool
    ) -> AsyncIterator[ExecOutput | ExecExit]:
        """As if the exec ran to its end now: `echo` prints its arguments, then exits 0."""
        execution = self._find_exec(ref, exec_id)
        if execution.state == ExecState.RUNNING:
            cmd = execution.cmd
            stdout = " ".join(cmd[1:]) + "\n" if cmd[0] == "echo" else ""
            finished = {"state": ExecState.EXITED, "exit_code": 0, "stdout": stdout}
            execution = execution.model_copy(update=finished | {"finished_at": datetime.now(UTC)})
            self.execs[execution.sandbox_id][exec_id] = execution
        if execution.stdout:
            yield ExecOutput(stream="stdout", data=execution.stdout)
        yield ExecExit(exit=execution)

    def exec_output(self, ref: str, exec_id: str, stream: str) -> Iterator[bytes]:
        execution = self._find_exec(ref, exec_id)
        return iter([getattr(execution, stream).encode()])

    def logs(self, ref: str, **query: Any) -> AsyncIterator[LogLine]:
        """The main command's log: `cmd`'s arguments as one stdout line."""
        sandbox = self._find(ref)

        async def lines() -> AsyncIterator[LogLine]:
            if sandbox.cmd:
                data = " ".join(sandbox.cmd[1:]) + "\n"
                yield LogLine(stream="stdout", data=data, time=sandbox.created_at)

        return lines()

    async def send_input(self, ref: str, exec_id: str, data: bytes, *, eof: bool) -> None:
        self.calls.append("send_input")

    async def resize(self, ref: str, exec_id: str, rows: int, cols: int) -> None:
        self.calls.append("resize")

    async def list_execs(self, ref: str) -> builtins.list[Exec]:
        self.calls.append("list_execs")
        return list(self.execs[self._find(ref).id].values())

    async def get_exec(self, ref: str, exec_id: str) -> Exec:
        self.calls.append("get_exec")
        return self._find_exec(ref, exec_id)

    async def signal_exec(self, ref: str, exec_id: str, signal: int) -> Exec:
        self.calls.append("signal_exec")
        execution = self._find_exec(ref, exec_id)
        if execution.state == ExecState.EXITED:
            raise Conflict(f"exec {exec_id} has already ended")
        signalled = execution.model_copy(
            update={
                "state": ExecState.EXITED,
                "signal": signal_module.Signals(signal).name,
                "finished_at": datetime.now(UTC),
            }
        )
        self.execs[execution.sandbox_id][exec_id] = signalled
        return signalled

    def stop_sandbox(self, ref: str) -> None:
        """Make a sandbox `exited`, as if its cmd had ended (a test helper, not the protocol)."""
        sandbox = self._find(ref)
        exit_info = ExitInfo(exit_code=0, signal=None, reason=ExitReason.EXITED)
        self.sandboxes[sandbox.id] = sandbox.model_copy(
            update={"state": SandboxState.EXITED, "pid": None, "exit": exit_info}
        )

    def _find(self, ref: str) -> Sandbox:
        for sandbox in self.sandboxes.values():
            if ref in (sandbox.id, sandbox.name):
                return sandbox
        raise NotFound(f"no sandbox {ref!r}")

    def _find_exec(self, ref: str, exec_id: str) -> Exec:
        execution = self.execs[self._find(ref).id].get(exec_id)
        if execution is None:
            raise NotFound(f"no exec {exec_id!r} in sandbox {ref!r}")
        return execution
