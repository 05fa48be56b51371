"""The daemon's service: the sandboxes' lifecycle, from an HTTP request down to the kernel.

api/ calls SandboxManager (it implements daemon.shapes.SandboxService); it keeps records in
the store, builds sandboxes through the zygote, and talks to each supervisor over its link.
Files on the host, per sandbox:
    STATE/sandboxes/ID/layers/N/{upper,work}   the writable layers, on a tmpfs of its own
                                               mounted at STATE/sandboxes/ID (daemon/linux/disk.py)
    STATE/sandboxes/ID/sandbox.json            what rebuilds its record
    (daemon/lifecycle/recovery.py)
    RUN/sandboxes/ID/                          the supervisor's socket and mailbox
    CGROUP2/NAME/ID, and on v1 V1/*/NAME/ID    its cgroups (daemon.linux.cgroups,
    daemon.linux.limits)
and for a bridged one its host link and published ports (daemon/network/bridge.py,
daemon/network/ports.py),
removed before its address lease is released.
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import hashlib
import json
import logging
import os
import shutil
import signal
import socket
from collections.abc import AsyncIterator, Callable
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, NoReturn

from daemon import logs
from daemon.config import Config, ConfigError
from daemon.errors import (
    Conflict,
    Invalid,
    NotFound,
    SandboxError,
    SetupFailed,
    SupervisorUnresponsive,
)
from daemon.images.service import ImageService
from daemon.lifecycle import default_root, recovery
from daemon.lifecycle.execs import Execs
from daemon.lifecycle.mailbox import (
    finished_in_mailbox,
    killed_exec_fields,
    read_status,
    read_text,
)
from daemon.lifecycle.pool import Pool, poolable
from daemon.lifecycle.running import LiveSandbox, new_id, utcnow
from daemon.lifecycle.states import ExitReason, SandboxState
from daemon.lifecycle.supervisor_link import SupervisorLink, Zygote, open_pidfd, wait_readable
from daemon.lifecycle.views import sandbox_view
from daemon.linux import cgroups, disk, limits
from daemon.network.bridge import BridgeNetwork, NetworkError
from daemon.network.ports import PublishedPorts
from daemon.protocol import (
    INVALID_PREFIX,
    MAIN_EXEC,
    SETUP_ERROR_FILE,
    SOCKET_NAME,
    STAGING_DIR,
    SUPERVISOR_ERROR_FILE,
    BindMount,
    Layer,
    MessageType,
    SpawnRequest,
)
from daemon.sandbox import hardening
from daemon.shapes import (
    Exec,
    ExecCreate,
    ExecExit,
    ExecOutput,
    Info,
    PoolCounts,
    Sandbox,
    SandboxCounts,
    SandboxCreate,
    SandboxStats,
    hostname_from_name,
    kernel_release,
    stored_spec,
)
from daemon.store.database import SandboxRecord, Store

log = logging.getLogger(__name__)

ID_RANGE = 65536
_GONE_TIMEOUT = 10.0
_CONNECT_TIMEOUT = 30.0
# How long an Idempotency-Key of POST /sandboxes is remembered (Stripe's 24 hours).
IDEMPOTENCY_WINDOW = timedelta(hours=24)
_LOST_EXEC_MESSAGE = "sandboxd: the exec was lost: the daemon stopped before it could start\n"


class SandboxManager:
    def __init__(self, config: Config) -> None:
        # No sandbox without its seccomp filter: a host without libseccomp is refused here.
        try:
            hardening.check()
        except hardening.HardeningUnavailable as exc:
            raise ConfigError(str(exc)) from exc
        # One daemon (or recover) at a time on a state directory; and not on a database that
        # is not the one kept with the sandboxes on disk: the stray sweep would destroy them.
        self._lock: int | None = recovery.lock(config.state_dir)
        try:
            recovery.preflight(config)
        except BaseException:
            recovery.unlock(config.state_dir)
            raise
        self.config = config
        self.sandboxes_dir = config.state_dir / "sandboxes"
        self.runtime_dir = config.run_dir / "sandboxes"
        # Two zygotes: bridged sandboxes need netlink (pyroute2, 20 MB of a process); the
        # others are forked from one without it, so their supervisors fork their execs lean.
        self.zygote = Zygote(str(config.run_dir))
        self.net_zygote = Zygote(str(config.run_dir), net=True)
        self.tree = cgroups.ProcessTree(
            config.cgroup_name, config.run_dir, delegated=config.cgroup_parent == "delegated"
        )
        self.limits: limits.ResourceControl = limits.NoControllers(self.tree)
        self.expiring: set[str] = set()  # sandboxes whose ttl ran out, being torn down
        self.housekeeping: asyncio.Task[None] | None = None
        self.network = BridgeNetwork(config)
        self.live: dict[str, LiveSandbox] = {}
        self.timers: dict[str, asyncio.TimerHandle] = {}
        self._store: Store | None = None
        self.generation = ""  # the database's, once it is open
        self.base_dir = Path()
        self.pool = Pool(config.pool_size, self._fill_pool, self._drain_pool)
        self.execs = Execs(lambda: self.store, self.live, config.exec_retention, self.tree.path)
        self.keyed_creates: dict[str, asyncio.Event] = {}  # Idempotency-Keys being created with
        self.images = ImageService(config, lambda: self.store)

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
        self._store = Store(self.config.state_dir / recovery.DATABASE)
        self.generation = self.store.generation()
        recovery.claim(self.config.state_dir, self.generation)
        self.images.start()
        self.tree.start()
        self.limits = limits.for_layout(cgroups.detect_layout(), self.tree)
        self.limits.start()
        self.base_dir = default_root.prepare(self.config.state_dir / "bases")
        await self.network.start()
        await self.zygote.start()
        await self.net_zygote.start()
        adopted = ended = 0
        for record in self.store.live_sandboxes():
            with logs.bound(sandbox_id=record.id):
                await self._adopt(record)
                if record.id in self.live:
                    adopted += 1
                    log.info("adopted sandbox %s", record.id, extra={"pooled": record.pooled})
                else:
                    ended += 1
                    log.info("sandbox %s ended while no daemon watched it", record.id)
        log.info(
            "adoption done: %d sandboxes running, %d ended",
            adopted,
            ended,
            extra={"adopted": adopted, "ended": ended},
        )
        await self._remove_strays()
        await self.network.remove_stale(set(self.live))
        in_use = {r.base_dir for r in self.store.live_sandboxes() if r.base_dir}
        default_root.remove_unused(self.config.state_dir / "bases", in_use, self.base_dir)
        for record in self.store.list_sandboxes():
            if record.expires_at is not None:
                self._schedule_expiry(record.id, record.expires_at)
        self.housekeeping = asyncio.create_task(self.execs.forget_old())
        self.pool.start()

    async def stop(self) -> None:
        """Stop talking to supervisors; the sandboxes keep running for the next daemon (but
        the pooled ones, which nobody asked for, are destroyed)."""
        for timer in self.timers.values():
            timer.cancel()
        await self.pool.stop()
        if self.housekeeping is not None:
            self.housekeeping.cancel()
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
        await self.net_zygote.stop()
        self.limits.stop()
        self.tree.stop()
        if self._store is not None:
            self._store.close()
        if self._lock is not None:
            recovery.unlock(self.config.state_dir)
            self._lock = None

    # -- queries ------------------------------------------------------------------------------

    async def info(self) -> Info:
        running, total = self.store.count_sandboxes()
        return Info(
            version=_version(),
            kernel=kernel_release(),
            cgroup=self.limits.layout,
            sandboxes=SandboxCounts(running=running, total=total),
            pool=PoolCounts(size=self.pool.size, ready=len(self.pool.ready)),
            pid=os.getpid(),
            state_dir=str(self.config.state_dir),
            run_dir=str(self.config.run_dir),
            bridge_name=self.config.bridge_name,
            bridge_subnet=str(self.config.bridge_subnet),
            cgroup_name=self.config.cgroup_name,
            uid_base=self.config.uid_base,
            uid_last=self._uid_last(),
        )

    def _uid_last(self) -> int:
        slots = self.config.max_sandboxes + self.config.pool_size
        return self.config.uid_base + slots * ID_RANGE - 1

    async def list(
        self, states: builtins.list[SandboxState], labels: dict[str, str]
    ) -> builtins.list[Sandbox]:
        return [sandbox_view(r) for r in self.store.list_sandboxes(states, labels)]

    async def get(self, ref: str) -> Sandbox:
        return sandbox_view(self.store.get_sandbox(ref))

    async def list_execs(self, ref: str) -> builtins.list[Exec]:
        return await self.execs.list(ref)

    async def get_exec(self, ref: str, exec_id: str) -> Exec:
        return await self.execs.get(ref, exec_id)

    async def stats(self, ref: str) -> SandboxStats:
        """Read from its cgroups: a few small files, no waiting on the sandbox."""
        record = self.store.get_sandbox(ref)
        if record.state != SandboxState.RUNNING or record.id not in self.live:
            raise Conflict(f"sandbox {record.id} is {record.state}, not running")
        try:
            usage = self.limits.usage(record.id)
        except FileNotFoundError as exc:  # it ended meanwhile
            raise Conflict(f"sandbox {record.id} is no longer running") from exc
        return SandboxStats(
            memory_current_bytes=usage.memory_current,
            memory_peak_bytes=usage.memory_peak,
            cpu_seconds=None if usage.cpu_usec is None else usage.cpu_usec / 1e6,
            pids_current=usage.pids_current,
            pids_peak=usage.pids_peak,
            oom_kills=usage.oom_kills,
        )

    # -- create -------------------------------------------------------------------------------

    async def create(self, spec: SandboxCreate, idempotency_key: str | None = None) -> Sandbox:
        """A new sandbox; given an `idempotency_key`, at most one per key and body (below)."""
        if idempotency_key is not None:
            return await self._create_once(spec, idempotency_key)
        if poolable(spec):
            taken = self._take_pooled(self._applied(spec))
            if taken is not None:
                return taken
        return sandbox_view(await self._create(spec))

    async def _create_once(self, spec: SandboxCreate, key: str) -> Sandbox:
        """The sandbox that `key` made from this body within IDEMPOTENCY_WINDOW, as it stands
        now; else a new one, and the key is recorded once it is made (a create that fails
        leaves the key unused). The same key with another body is Invalid (422); when its
        sandbox has been deleted since, a Conflict (409): a retry must not make another."""
        # One create at a time per key: a second request waits for the first, then finds it.
        while (running := self.keyed_creates.get(key)) is not None:
            await running.wait()
        done = self.keyed_creates[key] = asyncio.Event()
        try:
            body_hash = spec_hash(spec)
            known = self.store.find_idempotency_key(key, utcnow() - IDEMPOTENCY_WINDOW)
            if known is None:
                sandbox = await self.create(spec)
                now = utcnow()
                self.store.record_idempotency_key(
                    key,
                    body_hash=body_hash,
                    sandbox_id=sandbox.id,
                    now=now,
                    since=now - IDEMPOTENCY_WINDOW,
                )
                return sandbox
            if known.body_hash != body_hash:
                raise Invalid(
                    f"the Idempotency-Key {key!r} was used with another body; "
                    "a new request needs a new key"
                )
            with contextlib.suppress(NotFound):
                record = self.store.get_sandbox(known.sandbox_id)
                if record.id == known.sandbox_id:  # not another one named after it
                    return sandbox_view(record)
            raise Conflict(
                f"sandbox {known.sandbox_id}, created with the Idempotency-Key {key!r}, "
                "has been deleted since"
            )
        finally:
            del self.keyed_creates[key]
            done.set()

    async def _create(self, spec: SandboxCreate, *, pooled: bool = False) -> SandboxRecord:
        # 1. validate what the schema cannot see: the host paths and controllers, what is
        #    not built yet
        self._check_host(spec)
        spec = self._applied(spec)
        image_id = None
        if spec.image is not None:  # its env under the request's; 422 if not in the store
            spec, image_id = self.images.for_create(spec)
        bridged = spec.network.mode == "bridge"
        sandbox_id = new_id("sb")
        logs.bind(sandbox_id=sandbox_id)  # the request's task, or the pool's (which unbinds)
        hostname = asked_hostname(spec, sandbox_id)
        if "uts" not in spec.namespaces:
            hostname = socket.gethostname()  # the host's, which it shares
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
                pooled=pooled,
                base_dir=str(self.base_dir) if spec.rootfs is None and spec.image is None else None,
                slots=self.config.max_sandboxes + self.config.pool_size,
                image_id=image_id,
            )
        except BaseException:
            if ports is not None:
                await ports.close()
            raise
        live = LiveSandbox(sandbox_id, self.runtime_dir / sandbox_id, ports=ports)
        self.live[sandbox_id] = live
        async with live.lock:
            try:
                # 4. its cgroups (limits set before a process is in them), writable layers
                #    and mailbox; 5. namespaces, network, mounts, supervisor
                self.tree.create(sandbox_id)
                placement = self.limits.create(sandbox_id, spec.limits)
                request = self._prepare_files(record, spec, placement)
                zygote = self.net_zygote if request.network else self.zygote
                pid, start_time = await zygote.spawn(request)
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
                self._keep(record)
                # 7. the published ports relay to its address
                if live.ports is not None and record.ip is not None:
                    await live.ports.start(record.ip)
            except Exception as exc:  # whatever failed, what was made is undone
                if expires_at is not None:  # a failed record goes at its time like any
                    self._schedule_expiry(sandbox_id, expires_at)
                await self._undo_create(live, exc)
        if record.expires_at is not None:  # as stored: POST …/ttl may have changed it meanwhile
            self._schedule_expiry(sandbox_id, record.expires_at)
        log.info("sandbox %s created", sandbox_id, extra={"pooled": pooled, "pid": record.pid})
        return record

    def _take_pooled(self, spec: SandboxCreate) -> Sandbox | None:
        """Serve a create from the pool: the oldest pooled sandbox becomes the asker's, with
        its name, host name, env, labels and ttl. None if the pool has none ready.

        What makes it the asker's (its host name, in its UTS namespace and /etc, and its env)
        is done before its record says so, and by every take afresh: a take refused (409, 503)
        or cut short by a crash leaves a pooled sandbox that the next take configures again.
        """
        while (sandbox_id := self.pool.next()) is not None:
            live = self.live.get(sandbox_id)
            if live is None or live.link is None or live.lock.locked():
                self.pool.taken(sandbox_id)  # dying: its retirement removes it
                continue
            hostname = asked_hostname(spec, sandbox_id)
            try:
                owner = self._uid_base(self.store.get_sandbox(sandbox_id, pooled_too=True))
                default_root.write_identity_files(self._upper(sandbox_id, 0), hostname, owner)
                # The supervisor reads the link in order: this comes before any exec of theirs.
                live.link.send(MessageType.CONFIGURE, hostname=hostname, env=spec.env)
            except (NotFound, OSError, ConnectionError, SupervisorUnresponsive) as exc:
                log.warning("pooled sandbox %s cannot be taken, destroying it: %s", sandbox_id, exc)
                self.pool.discard(sandbox_id)
                continue
            now = utcnow()
            ttl = spec.ttl_seconds
            try:
                record = self.store.take_pooled(
                    sandbox_id,
                    name=spec.name,
                    hostname=hostname,
                    spec=spec.model_dump(mode="json"),
                    max_live=self.config.max_sandboxes,
                    now=now,
                    expires_at=now + timedelta(seconds=ttl) if ttl else None,
                )
            except NotFound:  # not pooled after all (ended meanwhile): the next one
                self.pool.taken(sandbox_id)
                continue
            self.pool.taken(sandbox_id)
            self._keep(record)
            if record.expires_at is not None:
                self._schedule_expiry(sandbox_id, record.expires_at)
            logs.bind(sandbox_id=sandbox_id)  # the request's task
            log.info("sandbox %s created, taken from the pool", sandbox_id)
            return sandbox_view(record)
        return None

    async def _fill_pool(self) -> str:
        try:
            return (await self._create(SandboxCreate(), pooled=True)).id
        finally:
            logs.unbind("sandbox_id")

    async def _drain_pool(self, sandbox_id: str) -> None:
        with logs.bound(sandbox_id=sandbox_id):
            await self._destroy(self.store.get_sandbox(sandbox_id, pooled_too=True))

    async def _undo_create(self, live: LiveSandbox, exc: Exception) -> NoReturn:
        """Undo a create that failed: kill what started, remove what was made, and say why."""
        message = self._setup_error(live) or str(exc)
        log.warning("sandbox %s could not be set up: %s", live.id, message)
        await self._kill(live)
        record = self.store.get_sandbox(live.id, pooled_too=True)
        await self._unplug(live, record)
        self.live.pop(live.id, None)
        await self._remove_files(live.id)
        if record.pooled:  # nobody asked for it: forgotten (the pool tries again)
            self.store.delete_sandbox(live.id)
            raise SetupFailed(f"a pooled sandbox could not be set up: {message}") from exc
        if message.startswith(INVALID_PREFIX):  # its mounts were bad input after all
            self.store.delete_sandbox(live.id)
            raise Invalid(message.removeprefix(INVALID_PREFIX)) from exc
        self.store.transition(
            live.id,
            SandboxState.FAILED,
            finished_at=utcnow(),
            exit_reason=ExitReason.SETUP_FAILED,
            exit_message=message,
            uid_slot=None,
            ip=None,
        )
        raise SetupFailed(f"sandbox {live.id} could not be set up: {message}") from exc

    def _check_host(self, spec: SandboxCreate) -> None:
        """What a request asks of this host: limits it can enforce, and host paths that
        exist and do not expose the daemon's own."""
        self.limits.check(spec.limits)
        limits.check_cpus(spec.limits)
        private = [self.config.state_dir.resolve(), self.config.run_dir.resolve()]
        sources = [("rootfs", spec.rootfs)] if spec.rootfs else []
        sources += [("mount source", m.source) for m in spec.mounts]
        for what, source in sources:
            if not os.path.exists(source):
                raise Invalid(f"{what} {source} does not exist on the host")
            if what == "rootfs" and not os.path.isdir(source):
                raise Invalid(f"rootfs {source} is not a directory on the host")
            path = Path(source).resolve()
            if any(path == d or d in path.parents or path in d.parents for d in private):
                raise Invalid(f"{what} {source} holds or lies in the daemon's own directories")
        for mount in spec.mounts:
            top = "/" + mount.target.strip("/").split("/")[0]
            if top in ("/proc", "/sys", "/dev"):
                raise Invalid(f"mount target {mount.target}: nothing may be mounted under {top}")

    def _prepare_files(
        self, record: SandboxRecord, spec: SandboxCreate, placement: limits.Placement
    ) -> SpawnRequest:
        """Make the sandbox's directories on the host and the request that builds it."""
        uid_base = self._uid_base(record) if "user" in spec.namespaces else None
        owner = uid_base or 0
        run_dir = self.runtime_dir / record.id
        run_dir.mkdir(mode=0o700)
        (run_dir / "execs").mkdir(mode=0o700)
        (run_dir / STAGING_DIR).mkdir(mode=0o700)
        # Its disk: one tmpfs holding every writable layer (undone by _remove_files).
        disk_bytes = spec.limits.disk_bytes or self.config.default_disk_bytes
        sandbox_dir = self.sandboxes_dir / record.id
        sandbox_dir.mkdir(mode=0o700)
        disk.mount_layers_fs(sandbox_dir, disk_bytes)
        # An image's layers, top first: the top one is the overlay's `lower`, the rest `below`.
        image_layers = self.images.root_layers(record.image_id) if record.image_id else []
        if image_layers:
            sources = [(image_layers[0], "/")]
        elif spec.rootfs is None:
            sources = [(str(self.base_dir), "/"), *default_root.host_layers()]
        else:
            sources = [(spec.rootfs, "/")]
        layers = []
        for index, (lower, target) in enumerate(sources):
            upper = self._upper(record.id, index)
            work = upper.parent / "work"
            upper.mkdir(parents=True, mode=0o755)
            work.mkdir(mode=0o700)
            os.chmod(upper, os.stat(lower).st_mode & 0o7777)
            os.chown(upper, owner, owner)
            layers.append(Layer(lower, target, str(upper), str(work), spec.rootfs is not None))
        if image_layers:
            layers[0].below, layers[0].image = image_layers[1:], True
        hosts_ip, resolv = self.network.identity(record.ip) if record.ip else (None, "")
        default_root.write_identity_files(
            Path(layers[0].upper), record.hostname, owner, hosts_ip, resolv
        )
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
            cgroup=str(self.tree.path(record.id)),
            id_range=ID_RANGE,
            join=placement.join,
            memory_cgroup=placement.memory,
            memory_per_exec=placement.memory_per_exec,
            network=self.network.plan(record.id, record.ip) if record.ip else None,
            tmp_bytes=min(self.config.tmp_bytes, disk_bytes),
            shm_bytes=min(self.config.shm_bytes, disk_bytes),
        )

    def _applied(self, spec: SandboxCreate) -> SandboxCreate:
        """The request with the limits it gets: the daemon's default disk if it asks none."""
        applied = limits.with_disk(spec.limits, self.config.default_disk_bytes)
        return spec if applied is spec.limits else spec.model_copy(update={"limits": applied})

    def _keep(self, record: SandboxRecord) -> None:
        """Beside a running sandbox, what rebuilds its record should the database be lost."""
        if record.state == SandboxState.RUNNING:
            recovery.keep(self.sandboxes_dir / record.id, record, self.generation)

    def _uid_base(self, record: SandboxRecord) -> int:
        """The first host uid of the range its user namespace maps (its root inside)."""
        assert record.uid_slot is not None
        return self.config.uid_base + record.uid_slot * ID_RANGE

    def _upper(self, sandbox_id: str, layer: int) -> Path:
        """The writable layer over its `layer`th lower one (0: the root)."""
        return self.sandboxes_dir / sandbox_id / "layers" / str(layer) / "upper"

    async def _connect(self, live: LiveSandbox) -> dict[str, Any]:
        link = SupervisorLink(
            str(live.run_dir / SOCKET_NAME),
            lambda kind, message: self.execs.on_message(live, kind, message),
            lambda: self._on_gone(live),
            timeout=self.config.supervisor_timeout,
        )
        # The link's reader task, started by connect, lives as long as the sandbox: its lines
        # carry the sandbox's id, not the id of the request that happened to create it.
        connecting = asyncio.get_running_loop().create_task(
            link.connect(), context=logs.context_of(sandbox_id=live.id)
        )
        hello = await asyncio.wait_for(connecting, _CONNECT_TIMEOUT)
        live.link = link
        return hello

    def _setup_error(self, live: LiveSandbox) -> str:
        return read_text(live.run_dir / SETUP_ERROR_FILE)

    # -- destroy ------------------------------------------------------------------------------

    async def destroy(self, ref: str, *, expired: bool = False) -> None:
        await self._destroy(self.store.get_sandbox(ref), expired=expired)

    async def _destroy(self, record: SandboxRecord, *, expired: bool = False) -> None:
        logs.bind(sandbox_id=record.id)  # a request's task, the ttl's or the pool's
        live = self.live.get(record.id)
        if live is not None:
            async with live.lock:
                if expired and self.live.get(record.id) is live:
                    self._mark_expired(record.id)
                await self._kill(live)
                await self._unplug(live, record)
                live.release_waiters()
                self.live.pop(record.id, None)
        else:
            await self._unplug(None, record)  # ended already: only a crash could have left any
        await self._remove_files(record.id)
        self._cancel_expiry(record.id)
        # The record last, so that a 404 means everything is gone. Off the event loop:
        # deleting much stored output takes SQLite a while.
        await asyncio.to_thread(self.store.delete_sandbox, record.id)
        log.info("sandbox %s destroyed", record.id, extra={"expired": expired})

    async def _kill(self, live: LiveSandbox) -> None:
        """Kill every process of the sandbox at once through its cgroup, and wait for PID 1.

        The cgroup reaches what a pidfd cannot: a supervisor whose pid was never stored
        (the daemon died while creating it), and the first fork before the supervisor.
        """
        if live.link is not None:
            await live.link.aclose()
            live.link = None
        self.tree.kill(live.id)
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
            if live.pidfd is not None and not await wait_readable(live.pidfd, _GONE_TIMEOUT):
                log.warning("sandbox %s: link closed but supervisor alive; killing", live.id)
            await self._kill(live)
            await self._retire(live, self.store.get_sandbox(live.id, pooled_too=True))

    async def _retire(self, live: LiveSandbox, record: SandboxRecord) -> None:
        """Store what the dead supervisor left in its mailbox, end the record, clean up."""
        await self._unplug(live, record)
        for exec_id in finished_in_mailbox(live.run_dir):
            self.execs.collect(live, exec_id)
        for running in self.store.running_execs(record.id):
            self.store.finish_exec(running.id, **killed_exec_fields())
        main = read_status(live.run_dir, MAIN_EXEC)
        if main is not None:
            reason = ExitReason.EXITED if main.signal is None else ExitReason.SIGNALED
            reason = ExitReason.OOM if main.oom_killed else reason
            target = SandboxState.EXITED
        else:
            target, reason = SandboxState.FAILED, ExitReason.SUPERVISOR_LOST
        crash = read_text(live.run_dir / SUPERVISOR_ERROR_FILE)
        if crash:
            log.error("sandbox %s: its supervisor failed: %s", record.id, crash)
        _log_end(record.id, reason, main.exit_code if main else None, main.signal if main else None)
        # The record first: should the daemon die now, the files left are strays at start.
        if record.pooled:  # nobody asked for it: it is forgotten, and the pool makes another
            self.pool.taken(record.id)
            self.store.delete_sandbox(record.id)
        else:
            if record.state == SandboxState.CREATING and target == SandboxState.EXITED:
                self.store.transition(record.id, SandboxState.RUNNING, started_at=utcnow())
            self.store.transition(
                record.id,
                target,
                exit_reason=reason,
                exit_code=main.exit_code if main else None,
                exit_signal=main.signal if main else None,
                finished_at=utcnow(),
                uid_slot=None,
                ip=None,
                pid=None,
            )
        live.release_waiters()
        self.live.pop(record.id, None)
        await self._remove_files(record.id)

    async def _remove_files(self, sandbox_id: str) -> None:
        """Everything of a sandbox on the host but its record (the cgroup kills what is left)."""

        def remove_layers() -> None:
            # Its tmpfs first: unmounted, its pages are freed at once and nothing is left to
            # walk (should it fail, the walk empties the tmpfs and the directory stays).
            path = self.sandboxes_dir / sandbox_id
            try:
                disk.unmount(path)
            except OSError as exc:
                log.error("sandbox %s: its disk stays mounted: %s", sandbox_id, exc)
            shutil.rmtree(path, ignore_errors=True)

        def remove_cgroups(remove: Callable[[str], None]) -> None:
            try:
                remove(sandbox_id)
            except OSError as exc:
                log.error("sandbox %s: its cgroups stay: %s", sandbox_id, exc)

        # First its cgroup2 tree: that kills what is left and waits till it is gone. Then, side
        # by side and off the event loop (a writable layer may hold many files), the rest.
        await asyncio.to_thread(remove_cgroups, self.tree.remove)
        await asyncio.gather(
            asyncio.to_thread(remove_cgroups, self.limits.remove),
            asyncio.to_thread(shutil.rmtree, self.runtime_dir / sandbox_id, ignore_errors=True),
            asyncio.to_thread(remove_layers),
        )

    async def _remove_strays(self) -> None:
        """What is left of sandboxes that are not live (a crash mid-create, -delete, -retire).

        Only the files of this database's sandboxes: the preflight made sure that the state
        directory is this database's, and a sandbox marked by another database's generation
        is left alone (and logged)."""
        claimed = recovery.read_generation(self.config.state_dir)
        if claimed != self.generation:
            log.error("not removing strays: the state directory is not this database's")
            return
        stray = {p.name for d in (self.runtime_dir, self.sandboxes_dir) for p in d.iterdir()}
        stray |= {*self.tree.sandboxes(), *self.limits.sandboxes()}
        for sandbox_id in sorted(stray - set(self.live)):
            kept = recovery.read_kept(self.sandboxes_dir / sandbox_id)
            if kept is not None and kept.get("generation") != self.generation:
                log.error(
                    "sandbox %s was recorded by another database: left alone (remove its "
                    "files by hand if nobody wants it)",
                    sandbox_id,
                )
                continue
            await self._remove_files(sandbox_id)

    # -- restart ------------------------------------------------------------------------------

    async def _adopt(self, record: SandboxRecord) -> None:
        """A sandbox the last daemon left live: reconnect to it, or retire it."""
        live = LiveSandbox(record.id, self.runtime_dir / record.id)
        self.live[record.id] = live
        if record.pid is not None:
            live.pidfd = open_pidfd(record.pid, record.pid_start)
        if record.state == SandboxState.CREATING:
            await self._kill(live)  # its cgroup holds it, whether or not its pid was stored
            await self._unplug(live, record)
            self.live.pop(record.id, None)
            await self._remove_files(record.id)
            if record.pooled:
                self.store.delete_sandbox(record.id)
                return
            self.store.transition(
                record.id,
                SandboxState.FAILED,
                finished_at=utcnow(),
                exit_reason=ExitReason.SETUP_FAILED,
                exit_message="the daemon stopped while the sandbox was being created",
                uid_slot=None,
                ip=None,
            )
            return
        try:
            if live.pidfd is None:
                raise ConnectionError("the supervisor is gone")
            hello = await asyncio.wait_for(self._connect(live), self.config.supervisor_timeout)
        except (OSError, ConnectionError, TimeoutError, ValueError):
            await self._kill(live)
            await self._retire(live, record)
            return
        if record.pooled:
            self.pool.add(record.id)
        self._keep(record)  # marked with this database's generation, if it was not yet
        await self._publish_again(live, record)
        running: dict[str, int] = hello.get("running", {})
        for exec_id in hello.get("finished", []):
            if exec_id != MAIN_EXEC:
                self.execs.collect(live, exec_id)
        for unfinished in self.store.running_execs(record.id):
            if unfinished.id in running:  # its STARTED may have been lost with the last daemon
                self.store.set_exec_pid(unfinished.id, running[unfinished.id])
            else:
                lost = {"signal": None, "exit_code": 255, "stderr": _LOST_EXEC_MESSAGE}
                self.store.finish_exec(unfinished.id, **killed_exec_fields() | lost)

    async def _publish_again(self, live: LiveSandbox, record: SandboxRecord) -> None:
        """A running sandbox's published ports, bound again by this daemon."""
        spec = stored_spec(record.spec)
        if not spec.network.ports or record.ip is None:
            return
        try:
            live.ports = PublishedPorts.bind(spec.network.ports)
            await live.ports.start(record.ip)
        except (SandboxError, OSError) as exc:
            log.error("sandbox %s: cannot publish its ports again: %s", record.id, exc)

    # -- execs (daemon/lifecycle/execs.py) ----------------------------------------------------

    async def exec(self, ref: str, spec: ExecCreate) -> Exec:
        image_id = self.store.get_sandbox(ref).image_id
        if image_id is not None:  # the image's working_dir and user, where the exec names none
            spec = self.images.exec_defaults(image_id, spec)
        return await self.execs.exec(ref, spec)

    async def signal_exec(self, ref: str, exec_id: str, signal: int) -> Exec:
        return await self.execs.signal_exec(ref, exec_id, signal)

    async def send_input(self, ref: str, exec_id: str, data: bytes, *, eof: bool) -> None:
        await self.execs.send_input(ref, exec_id, data, eof=eof)

    async def resize(self, ref: str, exec_id: str, rows: int, cols: int) -> None:
        await self.execs.resize(ref, exec_id, rows, cols)

    def follow(
        self, ref: str, exec_id: str, *, follow: bool
    ) -> AsyncIterator[ExecOutput | ExecExit]:
        return self.execs.follow(ref, exec_id, follow=follow)

    # -- ttl ----------------------------------------------------------------------------------

    async def set_ttl(self, ref: str, ttl_seconds: float | None) -> Sandbox:
        """Expire `ttl_seconds` from now (earlier or later than before), or never (None)."""
        record = self.store.get_sandbox(ref)
        if record.id in self.expiring:
            raise Conflict(f"sandbox {record.id} has expired and is being destroyed")
        expires_at = utcnow() + timedelta(seconds=ttl_seconds) if ttl_seconds else None
        record = self.store.update_sandbox(record.id, expires_at=expires_at)
        self._keep(record)
        self._cancel_expiry(record.id)
        if expires_at is not None:
            self._schedule_expiry(record.id, expires_at)
        return sandbox_view(record)

    def _schedule_expiry(self, sandbox_id: str, expires_at: datetime) -> None:
        self._cancel_expiry(sandbox_id)
        delay = max(0.0, (expires_at - utcnow()).total_seconds())
        loop = asyncio.get_running_loop()
        self.timers[sandbox_id] = loop.call_later(
            delay, lambda: loop.create_task(self._expire(sandbox_id))
        )

    def _cancel_expiry(self, sandbox_id: str) -> None:
        timer = self.timers.pop(sandbox_id, None)
        if timer is not None:
            timer.cancel()

    async def _expire(self, sandbox_id: str) -> None:
        logs.only(sandbox_id=sandbox_id)  # the timer's own task: no request's id
        log.info("sandbox %s: its ttl ran out; destroying it", sandbox_id)
        self.timers.pop(sandbox_id, None)
        self.expiring.add(sandbox_id)
        try:
            with contextlib.suppress(SandboxError):
                await self.destroy(sandbox_id, expired=True)
        finally:
            self.expiring.discard(sandbox_id)

    def _mark_expired(self, sandbox_id: str) -> None:
        """A running sandbox whose ttl ran out shows so while it is torn down: `exited`,
        killed, reason `ttl_expired` (its record goes at the end of the teardown)."""
        if self.store.get_sandbox(sandbox_id).state == SandboxState.RUNNING:
            self.store.transition(
                sandbox_id,
                SandboxState.EXITED,
                exit_reason=ExitReason.TTL_EXPIRED,
                exit_signal="SIGKILL",
                finished_at=utcnow(),
            )


# -- helpers ----------------------------------------------------------------------------------


def _log_end(sandbox_id: str, reason: ExitReason, code: int | None, signal: str | None) -> None:
    """The line for a sandbox whose main cmd or supervisor ended: an OOM kill is a warning, a
    lost supervisor an error."""
    fields = {"exit_reason": str(reason), "exit_code": code, "exit_signal": signal}
    if reason == ExitReason.SUPERVISOR_LOST:
        log.error("sandbox %s failed: its supervisor was lost", sandbox_id, extra=fields)
    elif reason == ExitReason.OOM:
        log.warning("sandbox %s: the OOM killer ended its main cmd", sandbox_id, extra=fields)
    else:
        log.info("sandbox %s: its main cmd ended", sandbox_id, extra=fields)


def asked_hostname(spec: SandboxCreate, sandbox_id: str) -> str:
    """The host name a create asks for: its own, else its name made valid, else the id."""
    return spec.hostname or (hostname_from_name(spec.name) if spec.name else sandbox_id)


def spec_hash(spec: SandboxCreate) -> str:
    """The body of a create in canonical form (as validated, defaults filled in, keys sorted,
    compact JSON), hashed: two bodies that ask for the same sandbox hash alike."""
    canonical = json.dumps(spec.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("sandboxd")
    except PackageNotFoundError:
        return "0.1.0"
