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
daemon/network/ports.py). Every path that ends a sandbox takes them down through the one
teardown (daemon/lifecycle/teardown.py); its record moves through the states of
daemon/lifecycle/states.py.
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import hashlib
import json
import logging
import os
import socket
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, NoReturn

from daemon import logs
from daemon.config import UID_RANGE, Config, ConfigError
from daemon.errors import (
    Conflict,
    Invalid,
    LeasesHeld,
    NotFound,
    SandboxError,
    SetupFailed,
    SupervisorUnresponsive,
)
from daemon.images.service import ImageService
from daemon.lifecycle import default_root, recovery
from daemon.lifecycle.cmd_logs import MainLogs
from daemon.lifecycle.events import Event, EventHub, Subscription
from daemon.lifecycle.execs import Execs
from daemon.lifecycle.files import Files
from daemon.lifecycle.mailbox import (
    finished_in_mailbox,
    killed_exec_fields,
    read_status,
    read_text,
)
from daemon.lifecycle.metrics import CONTENT_TYPE, Metrics, Sources
from daemon.lifecycle.pool import Pool, poolable
from daemon.lifecycle.rooted import SandboxRoot
from daemon.lifecycle.running import LiveSandbox, new_id, utcnow
from daemon.lifecycle.states import (
    DYING_STATES,
    ExitReason,
    LifecycleState,
    SandboxState,
    public_state,
    stored_states,
)
from daemon.lifecycle.supervisor_link import (
    SpawnError,
    SupervisorLink,
    Zygote,
    open_pidfd,
    wait_readable,
)
from daemon.lifecycle.teardown import HOLD_VARIABLE, Host, Outcome, Removals, teardown
from daemon.lifecycle.views import sandbox_view
from daemon.linux import cgroups, disk, limits
from daemon.linux import syscalls as sc
from daemon.network.bridge import BridgeNetwork
from daemon.network.ports import PublishedPorts
from daemon.protocol import (
    MAIN_EXEC,
    NATIVE,
    SOCKET_NAME,
    STAGING_DIR,
    SUPERVISOR_ERROR_FILE,
    BindMount,
    Configure,
    Hello,
    Layer,
    ProtocolError,
    SpawnRequest,
)
from daemon.sandbox import hardening, native
from daemon.shapes import (
    Exec,
    ExecCreate,
    ExecExit,
    ExecOutput,
    Info,
    LogLine,
    LogQuery,
    PoolCounts,
    Sandbox,
    SandboxCounts,
    SandboxCreate,
    SandboxStats,
    hostname_from_name,
    kernel_release,
    package_version,
    stored_spec,
)
from daemon.store.database import SandboxRecord, Store, migrate_apart

log = logging.getLogger(__name__)

_GONE_TIMEOUT = 10.0
_CONNECT_TIMEOUT = 30.0
# How long an Idempotency-Key of POST /sandboxes is remembered (Stripe's 24 hours).
IDEMPOTENCY_WINDOW = timedelta(hours=24)
_LOST_EXEC_MESSAGE = "sandboxd: the exec was lost: the daemon stopped before it could start\n"


# How often the daemon hands the free pages of its heap back to the kernel.
TRIM_INTERVAL = 30.0


async def give_back_memory() -> None:
    """Every TRIM_INTERVAL seconds, malloc_trim(0): glibc keeps what big buffers freed (an
    exec's output, a file's chunks) in its heap, and only the top of one arena goes back by
    itself; twenty execs of 1 MiB output left the daemon 27 MiB larger, 4 MiB after a trim.
    Off the event loop: a trim walks every arena. Not glibc (no malloc_trim): nothing to do.
    """
    if not sc.can_trim_heap():
        return
    while True:
        await asyncio.sleep(TRIM_INTERVAL)
        await asyncio.to_thread(sc.trim_heap)


class SandboxManager:
    def __init__(self, config: Config) -> None:
        # No sandbox without its seccomp filter: a host without libseccomp is refused here.
        try:
            hardening.check()
        except hardening.HardeningUnavailable as exc:
            raise ConfigError(str(exc)) from exc
        if config.supervisor == NATIVE and not os.access(native.BINARY, os.X_OK):
            raise ConfigError(
                f"supervisor = native, but {native.BINARY} is missing: it is built when the "
                "package is installed (needs gcc and a static libc), or set supervisor = python"
            )
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
        # The netlink one starts with the first bridged sandbox (Zygote.spawn starts a zygote
        # that is not running), and stops again once no bridged sandbox was made for a while.
        self.zygote = Zygote(str(config.run_dir))
        self.net_zygote = Zygote(str(config.run_dir), net=True)
        self.net_spawning = 0  # bridged spawns in flight: the netlink zygote is not idle
        self.net_idle: asyncio.TimerHandle | None = None
        self.net_stopping: asyncio.Task[None] | None = None
        self.tree = cgroups.ProcessTree(
            config.cgroup_name, config.run_dir, delegated=config.cgroup_parent == "delegated"
        )
        self.limits: limits.ResourceControl = limits.NoControllers(self.tree)
        self.housekeeping: asyncio.Task[None] | None = None
        self.trimming: asyncio.Task[None] | None = None
        self.network = BridgeNetwork(config)
        self.live: dict[str, LiveSandbox] = {}
        self.timers: dict[str, asyncio.TimerHandle] = {}
        # Steps 6 and 7 of the teardowns that answer before them (daemon/lifecycle/teardown.py).
        hold = os.environ.get(HOLD_VARIABLE)
        self.removals = Removals(hold=Path(hold) if hold else None)
        self._store: Store | None = None
        self.generation = ""  # the database's, once it is open
        self.base_dir = Path()
        self.pool = Pool(config.pool_size, self._fill_pool, self._drain_pool)
        self.execs = Execs(lambda: self.store, self.live, config.exec_retention, self.tree.path)
        self.main_logs = MainLogs(
            lambda: self.store, self.live, config.state_dir / "logs", config.log_limit
        )
        self.keyed_creates: dict[str, asyncio.Event] = {}  # Idempotency-Keys being created with
        self.events = EventHub(config.event_queue)
        self.metrics = Metrics(
            Sources(
                states=lambda: self.store.count_by_state(),
                pool_ready=lambda: len(self.pool.ready),
                running=self._running_names,
                usage=lambda sandbox_id: self.limits.usage(sandbox_id),
            ),
            self.events,
        )
        self.images = ImageService(config, lambda: self.store)

    @property
    def store(self) -> Store:
        assert self._store is not None, "the service is not started"
        return self._store

    @property
    def host(self) -> Host:
        """What a teardown undoes (its limits are known once started)."""
        return Host(self.tree, self.limits, self.network, self.runtime_dir, self.sandboxes_dir)

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
        self.events.start()
        database = self.config.state_dir / recovery.DATABASE
        await asyncio.to_thread(migrate_apart, database)  # so the Store need not check again
        self._store = Store(database, self.events.publish, migrated=True)
        self.generation = self.store.generation()
        recovery.claim(self.config.state_dir, self.generation)
        self.images.start()
        self.tree.start()
        self.limits = limits.for_layout(cgroups.detect_layout(), self.tree)
        self.limits.start()
        self.base_dir = default_root.prepare(self.config.state_dir / "bases")
        await self.network.start()
        await self.zygote.start()
        adopted = ended = 0
        # The sandboxes the last daemon left alive, or whose teardown it did not finish.
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
        for record in self.store.unreleased_sandboxes():
            with logs.bound(sandbox_id=record.id):
                await self._teardown(record, Outcome(record.state.value), None)
        await self._remove_strays()
        await self.main_logs.remove_strays()
        await self.network.remove_stale(set(self.live))
        in_use = {r.base_dir for r in self.store.live_sandboxes() if r.base_dir}
        default_root.remove_unused(self.config.state_dir / "bases", in_use, self.base_dir)
        for record in self.store.list_sandboxes():
            if record.expires_at is not None:
                self._schedule_expiry(record.id, record.expires_at)
        self.housekeeping = asyncio.create_task(self.execs.forget_old())
        self.trimming = asyncio.create_task(give_back_memory())
        self.pool.start()

    async def stop(self) -> None:
        """Stop talking to supervisors; the sandboxes keep running for the next daemon (but
        the pooled ones, which nobody asked for, are destroyed)."""
        for timer in self.timers.values():
            timer.cancel()
        await self.pool.stop()
        left = await self.removals.drain()
        if left:
            log.warning("%d sandboxes are left to be removed at the next start", left)
        if self.housekeeping is not None:
            self.housekeeping.cancel()
        if self.trimming is not None:
            self.trimming.cancel()
        for live in list(self.live.values()):
            if live.link is not None:
                await live.link.aclose()
            if live.pidfd is not None:
                os.close(live.pidfd)
            if live.ports is not None:
                await live.ports.close()
            live.release_waiters()
        self.live.clear()
        if self.net_idle is not None:
            self.net_idle.cancel()
        if self.net_stopping is not None:
            await self.net_stopping
        await asyncio.to_thread(self.execs.sweeper.stop)
        await self.zygote.stop()
        await self.net_zygote.stop()
        self.limits.stop()
        self.tree.stop()
        self.events.close()
        if self._store is not None:
            self._store.close()
        if self._lock is not None:
            recovery.unlock(self.config.state_dir)
            self._lock = None

    async def _spawn(self, request: SpawnRequest) -> tuple[int, int]:
        """Build a sandbox through its zygote: B's host pid and start time."""
        if request.network is None:
            return await self.zygote.spawn(request)
        if self.net_idle is not None:
            self.net_idle.cancel()
        self.net_spawning += 1
        try:
            return await self.net_zygote.spawn(request)
        finally:
            self.net_spawning -= 1
            if self.net_spawning == 0 and self.config.net_zygote_idle:
                self.net_idle = asyncio.get_running_loop().call_later(
                    self.config.net_zygote_idle, self._net_zygote_idle
                )

    def _net_zygote_idle(self) -> None:
        """No bridged sandbox for net_zygote_idle seconds: give its zygote's memory back."""
        self.net_idle = None
        if self.net_spawning or self.net_stopping is not None:
            return

        async def stop() -> None:
            try:
                async with self.net_zygote.lock:  # after a spawn that got in first
                    if not self.net_spawning:
                        await self.net_zygote.stop()
                        log.info("stopped the idle zygote of bridged sandboxes")
            finally:
                self.net_stopping = None

        self.net_stopping = asyncio.create_task(stop())

    # -- queries ------------------------------------------------------------------------------

    async def info(self) -> Info:
        running, total = self.store.count_sandboxes()
        return Info(
            version=package_version(),
            kernel=kernel_release(),
            cgroup=self.limits.layout,
            sandboxes=SandboxCounts(running=running, total=total, removing=len(self.removals)),
            pool=PoolCounts(size=self.pool.size, ready=len(self.pool.ready)),
            pid=os.getpid(),
            state_dir=str(self.config.state_dir),
            run_dir=str(self.config.run_dir),
            bridge_name=self.config.bridge_name,
            bridge_subnet=str(self.config.bridge_subnet),
            cgroup_name=self.config.cgroup_name,
            uid_base=self.config.uid_base,
            uid_last=self.config.uid_base + self.config.uid_count - 1,
        )

    async def list(
        self, states: builtins.list[SandboxState], labels: dict[str, str]
    ) -> builtins.list[Sandbox]:
        # Stored states are more than the public ones: those that may show as one asked for,
        # then the public state each shows.
        stored = sorted({s for wanted in states for s in stored_states(wanted)})
        records = self.store.list_sandboxes(stored, labels)
        views = [sandbox_view(r) for r in records]
        return [v for v in views if not states or v.state in states]

    async def get(self, ref: str) -> Sandbox:
        return sandbox_view(self.store.get_sandbox(ref))

    async def list_execs(self, ref: str) -> builtins.list[Exec]:
        return await self.execs.list(ref)

    async def get_exec(self, ref: str, exec_id: str) -> Exec:
        return await self.execs.get(ref, exec_id)

    async def stats(self, ref: str) -> SandboxStats:
        """Read from its cgroups: a few small files, no waiting on the sandbox."""
        record = self.store.get_sandbox(ref)
        if record.state != LifecycleState.RUNNING or record.id not in self.live:
            state = public_state(record.state, record.exit_reason, record.started_at is not None)
            raise Conflict(f"sandbox {record.id} is {state}, not running")
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

    def _running_names(self) -> builtins.list[tuple[str, str]]:
        running = self.store.list_sandboxes([LifecycleState.RUNNING])
        return [(r.id, r.name or "") for r in running if r.id in self.live]

    # -- events and metrics -------------------------------------------------------------------

    async def events_after(self, since: int) -> builtins.list[Event]:
        """Events kept with a seq above `since` (off the loop: up to 10,000 rows)."""
        return await asyncio.to_thread(self.store.events_after, since)

    def subscribe_events(self) -> Subscription:
        """Live events from now on, until the subscription is closed or dropped."""
        return self.events.subscribe()

    async def metrics_exposition(self) -> tuple[bytes, str]:
        """Off the loop: a scrape reads the store and a few files per running sandbox."""
        return await asyncio.to_thread(self.metrics.exposition), CONTENT_TYPE

    # -- create -------------------------------------------------------------------------------

    async def create(self, spec: SandboxCreate, idempotency_key: str | None = None) -> Sandbox:
        """A new sandbox; given an `idempotency_key`, at most one per key and body (below)."""
        if idempotency_key is not None:
            return await self._create_once(spec, idempotency_key)
        with self.metrics.creating() as outcome:
            if poolable(spec):
                taken = self._take_pooled(self._applied(spec))
                if taken is not None:
                    outcome.append("pooled")
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
            record = await self._allocate(
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
                slots=self.config.slots,
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
                pid, start_time = await self._spawn(request)
                live.pidfd = open_pidfd(pid, start_time)
                await self._connect(live)
                # 6. the record says running (pooled, for the pool), with the supervisor's pid
                record = self.store.transition(
                    sandbox_id,
                    LifecycleState.POOLED if pooled else LifecycleState.RUNNING,
                    pid=pid,
                    pid_start=start_time,
                    started_at=utcnow(),
                )
                self._keep(record)
                self._mark_live(live, record)
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

    async def _allocate(self, **fields: Any) -> SandboxRecord:
        """store.create_sandbox; when every uid range or address is held, after the removals
        under way: a deleted sandbox holds its leases till its removal is done, and a create
        right after a DELETE at the limit must not be refused for what that DELETE lets go."""
        while True:
            try:
                return self.store.create_sandbox(**fields)
            except LeasesHeld:
                if not self.removals:
                    raise
                log.info("every lease is held: waiting for a removal to let one go")
                await self.removals.one_done()

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
                live.link.send(Configure(hostname, spec.env))
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
            self._mark_live(live, record)
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
            record = self.store.get_sandbox(sandbox_id, pooled_too=True)
            await self._destroy(record, Outcome.SHUTDOWN)

    async def _undo_create(self, live: LiveSandbox, exc: Exception) -> NoReturn:
        """Undo a create that failed: tear down what was made, and say why."""
        error = exc.error if isinstance(exc, SpawnError) else None
        message = error.message if error is not None else str(exc)
        log.warning("sandbox %s could not be set up: %s", live.id, message)
        record = self.store.get_sandbox(live.id, pooled_too=True)
        # Its mounts were bad input after all: forgotten, as if refused before anything was made.
        invalid = error is not None and error.invalid
        await self._teardown(record, Outcome.FAILED, live, message=message, forget=invalid)
        if record.pooled:  # nobody asked for it: forgotten (the pool tries again)
            raise SetupFailed(f"a pooled sandbox could not be set up: {message}") from exc
        if invalid:
            raise Invalid(message) from exc
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
        disk.mount_run_fs(run_dir)  # undone by the teardown, as the disk below
        (run_dir / "execs").mkdir(mode=0o700)
        (run_dir / STAGING_DIR).mkdir(mode=0o700)
        # Its disk: one tmpfs holding every writable layer (undone by the teardown).
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
            next_uid_base=self._next_uid_base(record) if uid_base is not None else None,
            run_dir=str(run_dir),
            layers=layers,
            mounts=[BindMount(m.source, m.target, m.read_only) for m in spec.mounts],
            env=spec.env,
            cmd=spec.cmd,
            output_limit=self.config.output_limit,
            cgroup=str(self.tree.path(record.id)),
            id_range=UID_RANGE,
            join=placement.join,
            memory_cgroup=placement.memory,
            memory_per_exec=placement.memory_per_exec,
            network=self.network.plan(record.id, record.ip) if record.ip else None,
            tmp_bytes=min(self.config.tmp_bytes, disk_bytes),
            shm_bytes=min(self.config.shm_bytes, disk_bytes),
            log_dir=self.main_logs.prepare(record.id) if spec.cmd is not None else None,
            log_limit=self.config.log_limit,
            supervisor=self.config.supervisor,
        )

    def _applied(self, spec: SandboxCreate) -> SandboxCreate:
        """The request with the limits it gets: the daemon's default disk if it asks none."""
        applied = limits.with_disk(spec.limits, self.config.default_disk_bytes)
        return spec if applied is spec.limits else spec.model_copy(update={"limits": applied})

    def _keep(self, record: SandboxRecord) -> None:
        """Beside a running sandbox, what rebuilds its record should the database be lost."""
        if record.state in (LifecycleState.RUNNING, LifecycleState.POOLED):
            recovery.keep(self.sandboxes_dir / record.id, record, self.generation)

    @staticmethod
    def _mark_live(live: LiveSandbox, record: SandboxRecord) -> None:
        """What an exec needs of its sandbox, kept with its live state (Execs.running)."""
        live.running = record.state == LifecycleState.RUNNING
        live.image_id = record.image_id

    def _uid_base(self, record: SandboxRecord) -> int:
        """The first host uid of the range its user namespace maps (its root inside)."""
        assert record.uid_slot is not None
        return self.config.slot_uid_base(record.uid_slot)

    def _next_uid_base(self, record: SandboxRecord) -> int | None:
        """The uid base of the slot above this one's (the store hands out the lowest free
        slot, so in a run of creates the next one's), if the daemon has that slot."""
        assert record.uid_slot is not None
        following = record.uid_slot + 1
        return self.config.slot_uid_base(following) if following < self.config.slots else None

    def _upper(self, sandbox_id: str, layer: int) -> Path:
        """The writable layer over its `layer`th lower one (0: the root)."""
        return self.sandboxes_dir / sandbox_id / "layers" / str(layer) / "upper"

    async def _connect(self, live: LiveSandbox) -> Hello:
        link = SupervisorLink(
            str(live.run_dir / SOCKET_NAME),
            lambda message: self.execs.on_message(live, message),
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

    # -- destroy, and every other end: through the one teardown ------------------------------

    async def destroy(self, ref: str) -> None:
        await self._destroy(self.store.get_sandbox(ref), Outcome.DELETED)

    async def _destroy(self, record: SandboxRecord, outcome: Outcome) -> None:
        """Tear a sandbox down for DELETE, its ttl or the pool: after what holds it (a
        create, an exec being started, another teardown) is done with it. `record` was read
        by the caller with nothing awaited since."""
        logs.bind(sandbox_id=record.id)  # a request's task, the ttl's or the pool's
        live = self.live.get(record.id)
        if live is None:
            await self._teardown(record, outcome, None, background=True)
        else:
            waited = live.lock.locked()  # a free asyncio lock is taken without yielding
            async with live.lock:
                if waited:  # as it is now: it may have ended, or been destroyed, meanwhile
                    record = self.store.get_sandbox(record.id, pooled_too=True)
                await self._teardown(
                    record,
                    outcome,
                    live if self.live.get(record.id) is live else None,
                    background=True,
                )
        log.info("sandbox %s destroyed", record.id, extra={"expired": outcome == Outcome.EXPIRED})

    async def _teardown(
        self,
        record: SandboxRecord,
        outcome: Outcome,
        live: LiveSandbox | None,
        *,
        message: str = "",
        forget: bool = False,
        background: bool = False,
    ) -> None:
        """daemon/lifecycle/teardown.py's teardown, with this record's steps (RecordSteps).

        `background`: steps 6 and 7 are left to self.removals, for a sandbox the API asked
        for (the pool's are let go whole, so that a refill never waits on their leases)."""
        if live is not None:
            live.running = False  # no exec starts from memory in what is being torn down
        steps = RecordSteps(self, record, outcome, live, message=message, forget=forget)
        bridged = record.spec.get("network", {}).get("mode") == "bridge"
        removals = self.removals if background and not record.pooled else None
        await teardown(
            self.host,
            record.id,
            outcome,
            live=live,
            record=steps,
            bridged=bridged,
            removals=removals,
        )

    # -- the supervisor is gone ---------------------------------------------------------------

    async def _on_gone(self, live: LiveSandbox) -> None:
        """The link closed: the main cmd ended, or the supervisor died or was killed."""
        async with live.lock:
            if self.live.get(live.id) is not live:
                return  # destroyed meanwhile
            if live.pidfd is not None and not await wait_readable(live.pidfd, _GONE_TIMEOUT):
                log.warning("sandbox %s: link closed but supervisor alive; killing", live.id)
            record = self.store.get_sandbox(live.id, pooled_too=True)
            await self._teardown(record, Outcome.EXITED, live, background=True)

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
            # Its link, if any, goes with the bridge's stale ones (network.remove_stale).
            await teardown(self.host, sandbox_id, Outcome.REMOVED, bridged=False)

    # -- restart ------------------------------------------------------------------------------

    async def _adopt(self, record: SandboxRecord) -> None:
        """A sandbox the last daemon left live: reconnect to it, or retire it."""
        live = LiveSandbox(record.id, self.runtime_dir / record.id)
        self.live[record.id] = live
        if record.pid is not None:
            live.pidfd = open_pidfd(record.pid, record.pid_start)
        if record.state in DYING_STATES:  # its teardown was cut short: finished now
            outcome = (
                Outcome.EXPIRED if record.state == LifecycleState.EXPIRING else Outcome.DELETED
            )
            await self._teardown(record, outcome, live)
            return
        if record.state in (LifecycleState.CREATING, LifecycleState.WARMING):
            # Its cgroup holds it, whether or not its pid was stored.
            message = "the daemon stopped while the sandbox was being created"
            await self._teardown(record, Outcome.INTERRUPTED, live, message=message)
            return
        try:
            if live.pidfd is None:
                raise ConnectionError("the supervisor is gone")
            hello = await asyncio.wait_for(self._connect(live), self.config.supervisor_timeout)
        except (OSError, ConnectionError, TimeoutError, ValueError) as exc:
            if isinstance(exc, ProtocolError):  # another version's: see daemon/protocol.py
                log.error("sandbox %s: its supervisor is not adopted: %s", record.id, exc)
            await self._teardown(record, Outcome.EXITED, live)
            return
        if record.pooled:
            self.pool.add(record.id)
        self._keep(record)  # marked with this database's generation, if it was not yet
        self._mark_live(live, record)
        await self._publish_again(live, record)
        running = hello.running
        for exec_id in hello.finished:
            if exec_id != MAIN_EXEC:
                self.execs.collect(live, exec_id)
        for unfinished in self.store.running_execs(record.id):
            if unfinished.id in running:  # its STARTED may have been lost with the last daemon
                self.store.set_exec_pid(unfinished.id, running[unfinished.id])
            else:
                lost = {"signal": None, "exit_code": 255, "stderr": _LOST_EXEC_MESSAGE.encode()}
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
        live = self.execs.running(ref)
        if live.image_id is None:
            return await self.execs.exec(live, spec)
        # The image's working_dir and user, where the exec names none; the sandbox is looked
        # up again after, by its id (its name may have gone to another meanwhile): it may
        # have ended.
        spec = await self.images.exec_defaults(live.image_id, spec)
        return await self.execs.exec(self.execs.running(live.id), spec)

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

    def exec_output(self, ref: str, exec_id: str, stream: str) -> Iterator[bytes]:
        return self.execs.raw_output(ref, exec_id, stream)

    # -- main-command logs (daemon/lifecycle/cmd_logs.py) -------------------------------------

    def logs(self, ref: str, query: LogQuery) -> AsyncIterator[LogLine]:
        return self.main_logs.read(ref, query)

    # -- files (daemon/lifecycle/files.py) ----------------------------------------------------

    def files(self, ref: str) -> Files:
        """A running sandbox's files, through a handle on its root; the caller closes it."""
        record = self.store.get_sandbox(ref)
        live = self.live.get(record.id)
        if record.state != LifecycleState.RUNNING or live is None or live.pidfd is None:
            raise Conflict(f"sandbox {record.id} is {record.state}, not running")
        assert record.pid is not None
        user = "user" in stored_spec(record.spec).namespaces
        uid_base = self._uid_base(record) if user else None
        return Files(SandboxRoot.of_process(record.pid, live.pidfd, uid_base))

    # -- ttl ----------------------------------------------------------------------------------

    async def set_ttl(self, ref: str, ttl_seconds: float | None) -> Sandbox:
        """Expire `ttl_seconds` from now (earlier or later than before), or never (None)."""
        record = self.store.get_sandbox(ref)
        if record.state == LifecycleState.EXPIRING:
            raise Conflict(f"sandbox {record.id} has expired and is being destroyed")
        if record.state == LifecycleState.DESTROYING:
            raise Conflict(f"sandbox {record.id} is being destroyed")
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
        with contextlib.suppress(SandboxError):
            await self._destroy(self.store.get_sandbox(sandbox_id), Outcome.EXPIRED)


@dataclass
class RecordSteps:
    """What a teardown does to a sandbox's record (steps 1, 5 and 7 of
    daemon/lifecycle/teardown.py), by its outcome. It is forgotten when deleted, expired or
    let go by the pool, when it was the pool's (nobody asked for it), or when `forget` says
    so (a create refused late); else it is kept, ended as exited or failed."""

    manager: SandboxManager
    record: SandboxRecord
    outcome: Outcome
    live: LiveSandbox | None
    message: str = ""  # why a create failed
    forget: bool = False

    def __post_init__(self) -> None:
        self.forget = (
            self.forget
            or self.record.pooled
            or self.outcome in (Outcome.DELETED, Outcome.EXPIRED, Outcome.SHUTDOWN)
        )

    def mark(self) -> None:
        """1. One the API shows, to be forgotten: destroying, or expiring when its ttl ended
        it running (it shows `exited`, killed, reason `ttl_expired`, till it is gone)."""
        store, state = self.manager.store, self.record.state
        if self.record.pooled and self.outcome == Outcome.EXITED:
            self.manager.pool.taken(self.record.id)  # it died: the pool makes another
        if not self.forget or self.record.pooled or state in DYING_STATES:
            return
        if self.outcome == Outcome.EXPIRED and state == LifecycleState.RUNNING:
            self.record = store.transition(
                self.record.id,
                LifecycleState.EXPIRING,
                exit_reason=ExitReason.TTL_EXPIRED,
                exit_signal="SIGKILL",
                finished_at=utcnow(),
            )
        else:
            self.record = store.transition(self.record.id, LifecycleState.DESTROYING)

    def end(self) -> None:
        """5. One to be kept: how it ended, from what its dead supervisor left in its mailbox.
        One the API showed, to be forgotten: removing, a 404 from here on."""
        if self.live is not None:
            self.manager.live.pop(self.record.id, None)
        if self.forget:
            if self.record.state in (LifecycleState.DESTROYING, LifecycleState.EXPIRING):
                self.manager._cancel_expiry(self.record.id)
                expired = self.outcome == Outcome.EXPIRED
                self.record = self.manager.store.remove_sandbox(self.record.id, expired=expired)
            return
        if self.record.state in (LifecycleState.EXITED, LifecycleState.FAILED):
            return  # ended already (a teardown finished at start)
        if self.outcome == Outcome.EXITED:
            self._exited()
        else:  # failed, or interrupted by a restart: its setup did not finish
            self.record = self.manager.store.transition(
                self.record.id,
                LifecycleState.FAILED,
                finished_at=utcnow(),
                exit_reason=ExitReason.SETUP_FAILED,
                exit_message=self.message,
            )

    def _exited(self) -> None:
        store, record = self.manager.store, self.record
        if self.live is not None:
            for exec_id in finished_in_mailbox(self.live.run_dir):
                self.manager.execs.collect(self.live, exec_id)
        for running in store.running_execs(record.id):
            store.finish_exec(running.id, **killed_exec_fields())
        run_dir = self.manager.runtime_dir / record.id
        main = read_status(run_dir, MAIN_EXEC)
        if main is not None:
            reason = ExitReason.EXITED if main.signal is None else ExitReason.SIGNALED
            reason = ExitReason.OOM if main.oom_killed else reason
            target = LifecycleState.EXITED
        else:
            target, reason = LifecycleState.FAILED, ExitReason.SUPERVISOR_LOST
        crash = read_text(run_dir / SUPERVISOR_ERROR_FILE)
        if crash:
            log.error("sandbox %s: its supervisor failed: %s", record.id, crash)
        code, signal = (main.exit_code, main.signal) if main else (None, None)
        _log_end(record.id, reason, code, signal)
        if record.state == LifecycleState.CREATING and target == LifecycleState.EXITED:
            store.transition(record.id, LifecycleState.RUNNING, started_at=utcnow())
        self.record = store.transition(
            record.id,
            target,
            oom_kills=main.oom_kills if main else 0,
            exit_reason=reason,
            exit_code=code,
            exit_signal=signal,
            finished_at=utcnow(),
        )

    async def release(self) -> None:
        """7. Forgotten (its execs with it), or its uid range, address and pid let go."""
        if self.forget:
            self.manager._cancel_expiry(self.record.id)
            await self.manager.main_logs.remove(self.record.id)  # before: strays are swept
            # Off the event loop: deleting much stored output takes SQLite a while.
            await asyncio.to_thread(self.manager.store.delete_sandbox, self.record.id)
        else:
            self.manager.store.update_sandbox(self.record.id, uid_slot=None, ip=None, pid=None)


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
