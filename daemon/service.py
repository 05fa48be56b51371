"""The daemon's service: the sandboxes' lifecycle, from an HTTP request down to the kernel.

api/ calls SandboxManager (it implements daemon.models.SandboxService); it keeps records in
the store, builds sandboxes through the zygote, and talks to each supervisor over its link.
Files on the host, per sandbox:
    STATE/sandboxes/ID/layers/N/{upper,work}   the writable layers (removed when it ends)
    RUN/sandboxes/ID/                          the supervisor's socket and mailbox
and for a bridged one its host link and published ports (daemon/network.py, daemon/ports.py),
removed before its address lease is released.
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import logging
import os
import secrets
import shutil
import signal
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from daemon import base, cgroups
from daemon.config import Config
from daemon.errors import Conflict, Invalid, SandboxError, SetupFailed
from daemon.lifecycle import ExecState, ExitReason, SandboxState
from daemon.models import (
    Exec,
    ExecCreate,
    ExitInfo,
    Info,
    Limits,
    MountSpec,
    NetworkView,
    Sandbox,
    SandboxCounts,
    SandboxCreate,
    hostname_from_name,
    kernel_release,
)
from daemon.network import BridgeNetwork, NetworkError
from daemon.parent import SpawnError, SupervisorLink, Zygote, open_pidfd, process_start_time
from daemon.ports import PublishedPorts
from daemon.protocol import (
    MAIN_EXEC,
    SOCKET_NAME,
    STAGING_DIR,
    STATUS_FILE,
    BindMount,
    ExitStatus,
    Layer,
    MessageType,
    SpawnRequest,
    exec_dir,
)
from daemon.store import ExecRecord, SandboxRecord, Store

log = logging.getLogger(__name__)

ID_RANGE = 65536
_GONE_TIMEOUT = 10.0
_CONNECT_TIMEOUT = 30.0
_LOST_EXEC_MESSAGE = "sandboxd: the exec was lost: the daemon stopped before it could start\n"


@dataclass
class LiveSandbox:
    """What the daemon holds for a sandbox whose supervisor runs."""

    id: str
    run_dir: Path
    pidfd: int | None = None
    link: SupervisorLink | None = None
    ports: PublishedPorts | None = None
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    started: dict[str, asyncio.Future[int | None]] = field(default_factory=dict)
    finished: dict[str, asyncio.Future[None]] = field(default_factory=dict)

    def release_waiters(self) -> None:
        for future in self.started.values():
            if not future.done():
                future.set_result(None)
        for done in self.finished.values():
            _resolve(done)
        self.started.clear()
        self.finished.clear()


class SandboxManager:
    def __init__(self, config: Config) -> None:
        self.config = config
        self.sandboxes_dir = config.state_dir / "sandboxes"
        self.runtime_dir = config.run_dir / "sandboxes"
        self.zygote = Zygote(str(config.run_dir))
        self.network = BridgeNetwork(config)
        self.live: dict[str, LiveSandbox] = {}
        self.timers: dict[str, asyncio.TimerHandle] = {}
        self._store: Store | None = None
        self.base_dir = Path()

    @property
    def store(self) -> Store:
        assert self._store is not None, "the service is not started"
        return self._store

    # -- start and stop -----------------------------------------------------------------------

    async def start(self) -> None:
        for path in (
            self.config.state_dir,
            self.config.run_dir,
            self.sandboxes_dir,
            self.runtime_dir,
        ):
            path.mkdir(mode=0o700, parents=True, exist_ok=True)
            os.chmod(path, 0o700)
        self._store = Store(self.config.state_dir / "sandboxd.db")
        self.base_dir = base.prepare(self.config.state_dir / "bases")
        await self.network.start()
        await self.zygote.start()
        for record in self.store.live_sandboxes():
            await self._adopt(record)
        self._remove_strays()
        await self.network.remove_stale(set(self.live))
        in_use = {r.base_dir for r in self.store.live_sandboxes() if r.base_dir}
        base.remove_unused(self.config.state_dir / "bases", in_use, self.base_dir)
        for record in self.store.list_sandboxes():
            if record.expires_at is not None:
                self._schedule_expiry(record.id, record.expires_at)

    async def stop(self) -> None:
        """Stop talking to supervisors; the sandboxes keep running for the next daemon."""
        for timer in self.timers.values():
            timer.cancel()
        for live in list(self.live.values()):
            if live.link is not None:
                await live.link.aclose()
            if live.pidfd is not None:
                os.close(live.pidfd)
            if live.ports is not None:
                await live.ports.close()
            live.release_waiters()
        self.live.clear()
        await self.zygote.stop()
        if self._store is not None:
            self._store.close()

    # -- queries ------------------------------------------------------------------------------

    async def info(self) -> Info:
        running, total = self.store.count_sandboxes()
        return Info(
            version=_version(),
            kernel=kernel_release(),
            cgroup=cgroups.detect_layout(),
            sandboxes=SandboxCounts(running=running, total=total),
            pid=os.getpid(),
            state_dir=str(self.config.state_dir),
            run_dir=str(self.config.run_dir),
        )

    async def list(
        self, states: builtins.list[SandboxState], labels: dict[str, str]
    ) -> builtins.list[Sandbox]:
        return [sandbox_view(r) for r in self.store.list_sandboxes(states, labels)]

    async def get(self, ref: str) -> Sandbox:
        return sandbox_view(self.store.get_sandbox(ref))

    async def list_execs(self, ref: str) -> builtins.list[Exec]:
        record = self.store.get_sandbox(ref)
        return [exec_view(e) for e in self.store.list_execs(record.id)]

    async def get_exec(self, ref: str, exec_id: str) -> Exec:
        record = self.store.get_sandbox(ref)
        return exec_view(self.store.get_exec(record.id, exec_id))

    # -- create -------------------------------------------------------------------------------

    async def create(self, spec: SandboxCreate) -> Sandbox:
        # 1. validate what the schema cannot see: the host paths, what is not built yet
        check_host_paths(spec)
        bridged = spec.network.mode == "bridge"
        sandbox_id = new_id("sb")
        hostname = spec.hostname or (hostname_from_name(spec.name) if spec.name else sandbox_id)
        now = utcnow()
        expires_at = now + timedelta(seconds=spec.ttl_seconds) if spec.ttl_seconds else None
        # 2. take the published ports: one in use is a 409 before anything is stored
        ports = PublishedPorts.bind(spec.network.ports) if spec.network.ports else None
        # 3. allocate: the record, its uid range, its address, its name (409 and 503 from here)
        try:
            record = self.store.create_sandbox(
                id=sandbox_id,
                name=spec.name,
                hostname=hostname,
                spec=spec.model_dump(mode="json"),
                max_live=self.config.max_sandboxes,
                now=now,
                expires_at=expires_at,
                subnet=self.network.subnet if bridged else None,
            )
        except BaseException:
            if ports is not None:
                await ports.close()
            raise
        live = LiveSandbox(sandbox_id, self.runtime_dir / sandbox_id, ports=ports)
        self.live[sandbox_id] = live
        async with live.lock:
            try:
                # 4. the writable layers and the mailbox; 5. namespaces, network, mounts,
                # supervisor
                request = self._prepare_files(record, spec)
                pid = await self.zygote.spawn(request)
                start_time = process_start_time(pid)
                live.pidfd = open_pidfd(pid, start_time)
                await self._connect(live)
                # 6. the record says running, with the supervisor's pid
                record = self.store.transition(
                    sandbox_id,
                    SandboxState.RUNNING,
                    pid=pid,
                    pid_start=start_time,
                    started_at=utcnow(),
                )
                # 7. the published ports relay to its address
                if live.ports is not None and record.ip is not None:
                    await live.ports.start(record.ip)
            except (OSError, SpawnError, ConnectionError, TimeoutError) as exc:
                message = self._setup_error(live) or str(exc)
                await self._kill(live)
                await self._unplug(live, record)
                self._remove_files(record.id)
                self.store.transition(
                    sandbox_id,
                    SandboxState.FAILED,
                    finished_at=utcnow(),
                    exit_reason=ExitReason.SETUP_FAILED,
                    exit_message=message,
                    uid_slot=None,
                    ip=None,
                )
                raise SetupFailed(f"sandbox {sandbox_id} could not be set up: {message}") from exc
        if expires_at is not None:
            self._schedule_expiry(sandbox_id, expires_at)
        return sandbox_view(record)

    def _prepare_files(self, record: SandboxRecord, spec: SandboxCreate) -> SpawnRequest:
        """Make the sandbox's directories on the host and the request that builds it."""
        uid_base = None
        if "user" in spec.namespaces:
            assert record.uid_slot is not None
            uid_base = self.config.uid_base + record.uid_slot * ID_RANGE
        owner = uid_base or 0
        run_dir = self.runtime_dir / record.id
        run_dir.mkdir(mode=0o700)
        (run_dir / "execs").mkdir(mode=0o700)
        (run_dir / STAGING_DIR).mkdir(mode=0o700)
        if spec.rootfs is None:
            sources = [(str(self.base_dir), "/"), *base.host_layers()]
            self.store.update_sandbox(record.id, base_dir=str(self.base_dir))
        else:
            sources = [(spec.rootfs, "/")]
        layers = []
        for index, (lower, target) in enumerate(sources):
            layer_dir = self.sandboxes_dir / record.id / "layers" / str(index)
            upper, work = layer_dir / "upper", layer_dir / "work"
            upper.mkdir(parents=True, mode=0o755)
            work.mkdir(mode=0o700)
            os.chmod(upper, os.stat(lower).st_mode & 0o7777)
            os.chown(upper, owner, owner)
            layers.append(Layer(lower, target, str(upper), str(work)))
        hosts_ip, resolv = self.network.identity(record.ip) if record.ip else (None, "")
        write_identity_files(Path(layers[0].upper), record.hostname, owner, hosts_ip, resolv)
        return SpawnRequest(
            sandbox_id=record.id,
            hostname=record.hostname,
            namespaces=list(spec.namespaces),
            uid_base=uid_base,
            run_dir=str(run_dir),
            layers=layers,
            mounts=[BindMount(m.source, m.target, m.read_only) for m in spec.mounts],
            env=spec.env,
            cmd=spec.cmd,
            output_limit=self.config.output_limit,
            id_range=ID_RANGE,
            network=self.network.plan(record.id, record.ip) if record.ip else None,
        )

    async def _connect(self, live: LiveSandbox) -> dict[str, Any]:
        link = SupervisorLink(
            str(live.run_dir / SOCKET_NAME),
            lambda kind, message: self._on_message(live, kind, message),
            lambda: self._on_gone(live),
        )
        hello = await asyncio.wait_for(link.connect(), _CONNECT_TIMEOUT)
        live.link = link
        return hello

    def _setup_error(self, live: LiveSandbox) -> str | None:
        with contextlib.suppress(OSError):
            return (live.run_dir / "setup_error").read_text().strip().splitlines()[0]
        return None

    # -- destroy ------------------------------------------------------------------------------

    async def destroy(self, ref: str) -> None:
        record = self.store.get_sandbox(ref)
        live = self.live.get(record.id)
        if live is not None:
            async with live.lock:
                await self._kill(live)
                await self._unplug(live, record)
                live.release_waiters()
                self.live.pop(record.id, None)
        else:
            await self._unplug(None, record)  # ended already: only a crash could have left any
        self._remove_files(record.id)
        timer = self.timers.pop(record.id, None)
        if timer is not None:
            timer.cancel()
        self.store.delete_sandbox(record.id)

    async def _kill(self, live: LiveSandbox) -> None:
        """SIGKILL the supervisor; as PID 1 its death takes every process of the sandbox."""
        if live.link is not None:
            await live.link.aclose()
            live.link = None
        if live.pidfd is None:
            return
        with contextlib.suppress(ProcessLookupError):
            signal.pidfd_send_signal(live.pidfd, signal.SIGKILL)
        await wait_readable(live.pidfd, _GONE_TIMEOUT)
        os.close(live.pidfd)
        live.pidfd = None

    async def _unplug(self, live: LiveSandbox | None, record: SandboxRecord) -> None:
        """Close its published ports and delete its link: before its address is released."""
        if live is not None and live.ports is not None:
            await live.ports.close()
            live.ports = None
        if record.spec.get("network", {}).get("mode") == "bridge":
            try:
                await self.network.unplug(record.id)
            except NetworkError as exc:
                log.error("sandbox %s: %s", record.id, exc)

    # -- the supervisor is gone ---------------------------------------------------------------

    async def _on_gone(self, live: LiveSandbox) -> None:
        """The link closed: the main cmd ended, or the supervisor died or was killed."""
        async with live.lock:
            if self.live.get(live.id) is not live:
                return  # destroyed meanwhile
            if live.pidfd is not None:
                if not await wait_readable(live.pidfd, _GONE_TIMEOUT):
                    log.warning("sandbox %s: link closed but supervisor alive; killing", live.id)
                await self._kill(live)
            await self._retire(live, self.store.get_sandbox(live.id))

    async def _retire(self, live: LiveSandbox, record: SandboxRecord) -> None:
        """Store what the dead supervisor left in its mailbox, end the record, clean up."""
        await self._unplug(live, record)
        for exec_id in finished_in_mailbox(live.run_dir):
            self._collect(live, exec_id)
        for running in self.store.running_execs(record.id):
            self.store.finish_exec(running.id, **killed_exec_fields())
        main = read_status(live.run_dir, MAIN_EXEC)
        if main is not None:
            reason = ExitReason.EXITED if main.signal is None else ExitReason.SIGNALED
            target, fields = (
                SandboxState.EXITED,
                {"exit_code": main.exit_code, "exit_signal": main.signal},
            )
        else:
            target, fields = SandboxState.FAILED, {"exit_code": None, "exit_signal": None}
            reason = ExitReason.SUPERVISOR_LOST
        if record.state == SandboxState.CREATING and target == SandboxState.EXITED:
            self.store.transition(record.id, SandboxState.RUNNING, started_at=utcnow())
        self._remove_files(record.id)
        self.store.transition(
            record.id,
            target,
            exit_reason=reason,
            finished_at=utcnow(),
            uid_slot=None,
            ip=None,
            pid=None,
            **fields,
        )
        live.release_waiters()
        self.live.pop(record.id, None)

    def _remove_files(self, sandbox_id: str) -> None:
        shutil.rmtree(self.runtime_dir / sandbox_id, ignore_errors=True)
        shutil.rmtree(self.sandboxes_dir / sandbox_id, ignore_errors=True)

    def _remove_strays(self) -> None:
        """Files of sandboxes that are not live (a crash mid-create, mid-delete or mid-retire)."""
        for parent in (self.runtime_dir, self.sandboxes_dir):
            for path in parent.iterdir():
                if path.name not in self.live:
                    shutil.rmtree(path, ignore_errors=True)

    # -- restart ------------------------------------------------------------------------------

    async def _adopt(self, record: SandboxRecord) -> None:
        """A sandbox the last daemon left live: reconnect to it, or retire it."""
        live = LiveSandbox(record.id, self.runtime_dir / record.id)
        self.live[record.id] = live
        if record.pid is not None:
            live.pidfd = open_pidfd(record.pid, record.pid_start)
        if record.state == SandboxState.CREATING or live.pidfd is None:
            await self._kill(live)
            if record.state == SandboxState.CREATING:
                await self._unplug(live, record)
                self._remove_files(record.id)
                self.store.transition(
                    record.id,
                    SandboxState.FAILED,
                    finished_at=utcnow(),
                    exit_reason=ExitReason.SETUP_FAILED,
                    exit_message="the daemon stopped while the sandbox was being created",
                    uid_slot=None,
                    ip=None,
                )
                self.live.pop(record.id, None)
            else:
                await self._retire(live, record)
            return
        try:
            hello = await self._connect(live)
        except (OSError, ConnectionError, TimeoutError, ValueError):
            await self._kill(live)
            await self._retire(live, record)
            return
        await self._publish_again(live, record)
        running = hello.get("running", {})
        for exec_id in hello.get("finished", []):
            if exec_id != MAIN_EXEC:
                self._collect(live, exec_id)
        for lost in self.store.running_execs(record.id):
            if lost.id not in running:
                lost_fields = {"signal": None, "exit_code": 255, "stderr": _LOST_EXEC_MESSAGE}
                self.store.finish_exec(lost.id, **killed_exec_fields() | lost_fields)

    async def _publish_again(self, live: LiveSandbox, record: SandboxRecord) -> None:
        """A running sandbox's published ports, bound again by this daemon."""
        spec = SandboxCreate.model_validate(record.spec)
        if not spec.network.ports or record.ip is None:
            return
        try:
            live.ports = PublishedPorts.bind(spec.network.ports)
            await live.ports.start(record.ip)
        except (SandboxError, OSError) as exc:
            log.error("sandbox %s: cannot publish its ports again: %s", record.id, exc)

    # -- exec ---------------------------------------------------------------------------------

    async def exec(self, ref: str, spec: ExecCreate) -> Exec:
        record = self.store.get_sandbox(ref)
        live = self.live.get(record.id)
        if spec.timeout_seconds is not None:
            raise Invalid("timeout_seconds is not implemented yet")
        if record.state != SandboxState.RUNNING or live is None or live.link is None:
            raise Conflict(f"sandbox {record.id} is {record.state}, not running")
        uid, _, gid = spec.user.partition(":")
        exec_id = new_id("ex")
        loop = asyncio.get_running_loop()
        started: asyncio.Future[int | None] = loop.create_future()
        finished: asyncio.Future[None] = loop.create_future()
        live.started[exec_id], live.finished[exec_id] = started, finished
        self.store.insert_exec(id=exec_id, sandbox_id=record.id, cmd=spec.cmd, now=utcnow())
        try:
            live.link.send(
                MessageType.EXEC,
                id=exec_id,
                cmd=spec.cmd,
                env=spec.env,
                cwd=spec.cwd or "/",
                uid=int(uid),
                gid=int(gid) if gid else None,
                stdin=spec.stdin,
            )
            await started
        except (ConnectionError, SandboxError):
            live.finished.pop(exec_id, None)
            self.store.finish_exec(exec_id, **killed_exec_fields())
            raise
        if spec.wait:
            await finished
        return exec_view(self.store.get_exec(record.id, exec_id))

    async def signal_exec(self, ref: str, exec_id: str, signal: int) -> Exec:
        record = self.store.get_sandbox(ref)
        found = self.store.get_exec(record.id, exec_id)
        live = self.live.get(record.id)
        if found.state != ExecState.RUNNING or live is None or live.link is None:
            raise Conflict(f"exec {exec_id} has already ended")
        live.link.send(MessageType.SIGNAL, id=exec_id, signal=signal)
        return exec_view(found)

    def _on_message(self, live: LiveSandbox, kind: MessageType, message: dict[str, Any]) -> None:
        exec_id = str(message.get("id"))
        if kind is MessageType.STARTED:
            if exec_id != MAIN_EXEC:
                self.store.set_exec_pid(exec_id, int(message["pid"]))
            future = live.started.pop(exec_id, None)
            if future is not None and not future.done():
                future.set_result(int(message["pid"]))
        elif kind is MessageType.EXITED and exec_id != MAIN_EXEC:
            self._collect(live, exec_id)
        elif kind is MessageType.ERROR:
            future = live.started.pop(exec_id, None)
            if future is not None and not future.done():
                future.set_exception(SandboxError(f"the supervisor refused the exec: {message}"))

    def _collect(self, live: LiveSandbox, exec_id: str) -> None:
        """Move a finished exec from the mailbox to the store, then empty its mailbox slot."""
        status = read_status(live.run_dir, exec_id)
        if status is None:
            return
        path = Path(exec_dir(str(live.run_dir), exec_id))
        with contextlib.suppress(SandboxError):
            self.store.finish_exec(
                exec_id,
                exit_code=status.exit_code,
                signal=status.signal,
                timed_out=status.timed_out,
                stdout=read_output(path / "stdout"),
                stderr=read_output(path / "stderr"),
                stdout_truncated=status.stdout_truncated,
                stderr_truncated=status.stderr_truncated,
                finished_at=datetime.fromtimestamp(status.finished_at, UTC),
            )
        shutil.rmtree(path, ignore_errors=True)
        future = live.finished.pop(exec_id, None)
        if future is not None and not future.done():
            future.set_result(None)

    # -- ttl ----------------------------------------------------------------------------------

    def _schedule_expiry(self, sandbox_id: str, expires_at: datetime) -> None:
        delay = max(0.0, (expires_at - utcnow()).total_seconds())
        loop = asyncio.get_running_loop()
        self.timers[sandbox_id] = loop.call_later(
            delay, lambda: loop.create_task(self._expire(sandbox_id))
        )

    async def _expire(self, sandbox_id: str) -> None:
        self.timers.pop(sandbox_id, None)
        with contextlib.suppress(SandboxError):
            await self.destroy(sandbox_id)


# -- helpers ----------------------------------------------------------------------------------


def check_host_paths(spec: SandboxCreate) -> None:
    if spec.limits != Limits():
        raise Invalid("resource limits are not implemented yet")
    if spec.rootfs is not None and not os.path.isdir(spec.rootfs):
        raise Invalid(f"rootfs {spec.rootfs} is not a directory on the host")
    for mount in spec.mounts:
        if not os.path.exists(mount.source):
            raise Invalid(f"mount source {mount.source} does not exist on the host")


def write_identity_files(
    upper: Path, hostname: str, owner: int, ip: str | None = None, resolv: str = ""
) -> None:
    """The sandbox's own /etc/hostname, /etc/hosts and /etc/resolv.conf, in its upper layer.

    Its host name stands for its bridge address if it has one, else for 127.0.1.1 (as on
    Debian). `resolv` names servers only when the sandbox can reach them (egress): with none,
    a lookup fails at once instead of waiting for a timeout.
    """
    etc = upper / "etc"
    etc.mkdir(mode=0o755, exist_ok=True)
    os.chown(etc, owner, owner)
    files = {
        "hostname": f"{hostname}\n",
        "hosts": f"127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n"
        f"{ip or '127.0.1.1'}\t{hostname}\n",
        "resolv.conf": resolv,
    }
    for name, content in files.items():
        path = etc / name
        path.write_text(content)
        os.chmod(path, 0o644)
        os.chown(path, owner, owner)


def finished_in_mailbox(run_dir: Path) -> list[str]:
    """Execs (not the main cmd) whose status.json is in the mailbox, not yet stored."""
    execs = run_dir / "execs"
    if not execs.is_dir():
        return []
    return [p.name for p in execs.iterdir() if p.name != MAIN_EXEC and (p / STATUS_FILE).exists()]


def read_status(run_dir: Path, exec_id: str) -> ExitStatus | None:
    try:
        data = (Path(exec_dir(str(run_dir), exec_id)) / STATUS_FILE).read_bytes()
    except OSError:
        return None
    return ExitStatus.from_json(data)


def read_output(path: Path) -> str:
    try:
        return path.read_bytes().decode(errors="replace")
    except OSError:
        return ""


def killed_exec_fields() -> dict[str, Any]:
    return {
        "exit_code": None,
        "signal": "SIGKILL",
        "timed_out": False,
        "stdout": "",
        "stderr": "",
        "stdout_truncated": False,
        "stderr_truncated": False,
        "finished_at": utcnow(),
    }


async def wait_readable(fd: int, timeout: float) -> bool:
    """Wait until a pidfd says its process has exited; False on timeout."""
    loop = asyncio.get_running_loop()
    ready: asyncio.Future[None] = loop.create_future()
    loop.add_reader(fd, _resolve, ready)
    try:
        await asyncio.wait_for(ready, timeout)
        return True
    except TimeoutError:
        return False
    finally:
        loop.remove_reader(fd)


def _resolve(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


def sandbox_view(record: SandboxRecord) -> Sandbox:
    spec = SandboxCreate.model_validate(record.spec)
    exit_info = None
    if record.exit_reason is not None:
        exit_info = ExitInfo(
            exit_code=record.exit_code,
            signal=record.exit_signal,
            reason=ExitReason(record.exit_reason),
            message=record.exit_message,
        )
    return Sandbox(
        id=record.id,
        name=record.name,
        state=SandboxState(record.state),
        hostname=record.hostname,
        namespaces=spec.namespaces,
        rootfs=spec.rootfs,
        mounts=[MountSpec.model_validate(m) for m in record.spec.get("mounts", [])],
        cmd=spec.cmd,
        env=spec.env,
        network=NetworkView(mode=spec.network.mode, ip=record.ip, ports=spec.network.ports),
        limits=spec.limits,
        labels=spec.labels,
        pid=record.pid if record.state == SandboxState.RUNNING else None,
        created_at=record.created_at,
        started_at=record.started_at,
        finished_at=record.finished_at,
        expires_at=record.expires_at,
        exit=exit_info,
    )


def exec_view(record: ExecRecord) -> Exec:
    return Exec(
        id=record.id,
        sandbox_id=record.sandbox_id,
        cmd=list(record.cmd),
        state=ExecState(record.state),
        pid=record.pid,
        exit_code=record.exit_code,
        signal=record.signal,
        timed_out=record.timed_out,
        stdout=record.stdout,
        stderr=record.stderr,
        stdout_truncated=record.stdout_truncated,
        stderr_truncated=record.stderr_truncated,
        started_at=record.started_at,
        finished_at=record.finished_at,
    )


def new_id(prefix: str) -> str:
    return f"{prefix}_{secrets.token_hex(8)}"


def utcnow() -> datetime:
    return datetime.now(UTC)


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("sandboxd")
    except PackageNotFoundError:
        return "0.1.0"
