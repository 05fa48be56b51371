"""Whether the database may be trusted with the sandboxes on disk, and `sandboxd recover` when not.

Runs in: the daemon process (the preflight, before it serves) and the `sandboxd recover`
command; both as root, in the host's namespaces.

At start the daemon removes what it finds of sandboxes it has no live record of (the stray
sweep). That is right only if its records are the ones kept with those files: a database that
was lost, emptied, damaged or brought from elsewhere would have the sweep kill every sandbox.
So each database has a generation, a random id made with it (migration 0005), and the state it
owns carries the same id:

    STATE/generation                      the generation of the database this directory keeps
    STATE/sandboxes/ID/sandbox.json       what rebuilds a running sandbox's record, with the
                                          generation of the database that recorded it

The daemon serves only if the database is the directory's (same generation, or no generation
file yet: a first start, or an upgrade from before migration 0005). Otherwise, with no sandbox
on disk, it sets the database aside and starts afresh; with sandboxes on disk it refuses, and
`sandboxd recover --adopt` (records rebuilt from sandbox.json for those whose supervisor is
alive) or `--remove` settles them. sandbox.json lies in the state directory, not the run
directory: a sandbox's PID 1 writes to its run directory, and must not be able to say which
uid range or address it holds.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from daemon.config import Config, ConfigError
from daemon.errors import Conflict
from daemon.lifecycle import claims
from daemon.lifecycle.teardown import Host, Outcome, teardown
from daemon.linux import cgroup_v1, cgroups, limits
from daemon.linux.syscalls import process_start_time
from daemon.network.bridge import BridgeNetwork
from daemon.store.database import DatabaseFound, SandboxRecord, Store, inspect_database

log = logging.getLogger(__name__)

DATABASE = "sandboxd.db"
GENERATION_FILE = "generation"
KEPT_FILE = "sandbox.json"
LOCK_FILE = "sandboxd.lock"
# Written to STATE/generation while `recover` rebuilds: matches no database, so a recover cut
# short is refused at the next start, and can be run again.
_RECOVERING = "recovering"
# What sandbox.json keeps of a record: enough to adopt it, nothing that changes per exec.
_KEPT_FIELDS = (
    "id", "name", "hostname", "spec", "uid_slot", "ip", "pid", "pid_start", "base_dir",
    "created_at", "started_at", "expires_at", "pooled", "image_id",
)  # fmt: skip
_NEWER_FIELDS = ("image_id",)  # absent from what an older version kept
_TIMES = ("created_at", "started_at", "expires_at")


class RecoveryNeeded(ConfigError):
    """The database cannot be trusted with the sandboxes on disk: the daemon will not serve."""


class RecoveryError(Exception):
    """`sandboxd recover` cannot run (a daemon serves, or there is nothing to recover)."""


@dataclass
class OnDisk:
    """One sandbox's files found on the host, and whether anything of it still runs."""

    id: str
    kept: dict[str, Any] | None = None  # its sandbox.json
    pids: set[int] = field(default_factory=set)  # the processes in its cgroup

    @property
    def supervisor(self) -> int | None:
        """Its supervisor's pid, if the one sandbox.json names still runs in its cgroup."""
        if not self.kept or self.kept.get("pid") is None:
            return None
        pid = int(self.kept["pid"])
        if pid not in self.pids or process_start_time(pid) != self.kept.get("pid_start"):
            return None
        return pid


# -- the lock ---------------------------------------------------------------------------------


def lock(state_dir: Path) -> int:
    """Hold the state directory for this process (the daemon, or recover) till it exits: an fd."""
    state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    return claims.lock_state_dir(state_dir)


def unlock(state_dir: Path) -> None:
    """Let the state directory go (the lock is one per process: claims.lock_state_dir)."""
    claims.unlock(state_dir)


# -- generations ------------------------------------------------------------------------------


def read_generation(state_dir: Path) -> str | None:
    try:
        return (state_dir / GENERATION_FILE).read_text().strip() or None
    except FileNotFoundError:
        return None


def write_generation(state_dir: Path, generation: str) -> None:
    """Atomically, and synced: it decides whether the sweep may run after a power loss too."""
    _write_atomically(state_dir / GENERATION_FILE, generation + "\n", sync=True)


def claim(state_dir: Path, generation: str) -> None:
    """Mark the state directory as kept by the database of `generation` (the daemon, once its
    store is open). The preflight has vouched for it; a mismatch now is another process's."""
    claimed = read_generation(state_dir)
    if claimed is None:
        write_generation(state_dir, generation)
    elif claimed != generation:
        raise RecoveryNeeded(
            f"{state_dir / GENERATION_FILE} says {claimed}, the database {generation}: "
            "another process changed them while the daemon started"
        )


def keep(sandbox_dir: Path, record: SandboxRecord, generation: str) -> None:
    """Write what rebuilds the record of a running sandbox beside its layers. Not synced: a
    power loss, which could lose it, kills the sandbox too."""
    kept: dict[str, Any] = {name: getattr(record, name) for name in _KEPT_FIELDS}
    for name in _TIMES:
        kept[name] = None if kept[name] is None else kept[name].isoformat()
    kept["generation"] = generation
    try:
        _write_atomically(sandbox_dir / KEPT_FILE, json.dumps(kept) + "\n", sync=False)
    except OSError as exc:  # its files are gone: it is ending anyway
        log.warning("sandbox %s: cannot keep its record beside it: %s", record.id, exc)


def read_kept(sandbox_dir: Path) -> dict[str, Any] | None:
    try:
        kept = json.loads((sandbox_dir / KEPT_FILE).read_text())
    except (OSError, ValueError):
        return None
    return kept if isinstance(kept, dict) else None


def _write_atomically(path: Path, text: str, *, sync: bool) -> None:
    temporary = path.with_name(f".{path.name}.tmp")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        os.write(fd, text.encode())
        if sync:
            os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(temporary, path)
    if sync:
        directory = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(directory)
        finally:
            os.close(directory)


# -- the preflight ----------------------------------------------------------------------------


def trusted(found: DatabaseFound, claimed: str | None) -> bool:
    """Whether the database is the state directory's: the one its sandboxes' files were kept
    with. With no generation file the directory claims nothing (a first start, an upgrade from
    before migration 0005), and a readable database is believed as it always was."""
    if found.kind == "marked":
        return claimed in (None, found.generation)
    return found.kind == "unmarked" and claimed is None


def preflight(config: Config) -> None:
    """Before the daemon opens its database: serve on it, or start afresh if no sandbox is on
    disk (a damaged database set aside), or refuse (RecoveryNeeded) if any is."""
    database = config.state_dir / DATABASE
    found = inspect_database(database)
    claimed = read_generation(config.state_dir)
    if trusted(found, claimed):
        return
    on_disk = find_sandboxes(config)
    if on_disk:
        raise RecoveryNeeded(refusal(database, describe(found, claimed), on_disk))
    aside = set_aside(database)
    with contextlib.suppress(FileNotFoundError):
        (config.state_dir / GENERATION_FILE).unlink()
    if aside is not None:
        log.warning(
            "the database %s; no sandbox is on disk: starting with a new one (the old one is "
            "kept as %s)",
            describe(found, claimed),
            aside,
        )


def describe(found: DatabaseFound, claimed: str | None) -> str:
    """What is wrong with the database, as the end of "the database …"."""
    if found.kind == "missing":
        return "is missing"
    if found.kind == "empty":
        return "is empty" + (f" ({found.detail})" if found.detail else " (0 bytes)")
    if found.kind == "damaged":
        return f"cannot be read ({found.detail})"
    if found.kind == "unmarked":
        return f"has no generation, but this state directory's is {claimed}"
    return f"is of generation {found.generation}, but this state directory's is {claimed}"


def refusal(database: Path, what: str, on_disk: list[OnDisk]) -> str:
    alive = [s.id for s in on_disk if s.pids]
    ids = ", ".join(s.id for s in on_disk[:10]) + (", …" if len(on_disk) > 10 else "")
    return (
        f"the database {database} {what}, but {len(on_disk)} sandbox(es) "
        f"of this daemon are on disk ({ids}; {len(alive)} still running), which starting "
        "would destroy. Run `sandboxd recover --adopt` to take back those whose supervisor "
        "is alive (the rest are removed) or `sandboxd recover --remove` to remove them all, "
        "with the --config, --state-dir and --run-dir given to serve, then start again. The "
        "database is kept aside, never deleted; the execs' history it held is lost either way."
    )


def set_aside(database: Path) -> Path | None:
    """Rename the database and its WAL files to *.damaged-TIME; the new name, or None if there
    was nothing in them (a missing or empty file, which is simply reused)."""
    files = [database, database.with_name(database.name + "-wal")]
    if not any(p.exists() and p.stat().st_size > 0 for p in files):
        return None
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S.%fZ")
    aside = database.with_name(f"{database.name}.damaged-{stamp}")
    for suffix in ("", "-wal", "-shm"):
        source = database.with_name(database.name + suffix)
        if source.exists():
            source.rename(aside.with_name(aside.name + suffix))
    return aside


# -- what is on disk --------------------------------------------------------------------------


def find_sandboxes(config: Config) -> list[OnDisk]:
    """Every sandbox of this daemon that left anything on the host: files in the run or state
    directory, or cgroups (the daemon's cgroup2 tree, v1 hierarchies) under its cgroup name.
    Read only: nothing is made, not even the daemon's cgroup."""
    run, state = config.run_dir / "sandboxes", config.state_dir / "sandboxes"
    tree = _tree_root(config)
    v1 = cgroup_v1.find_hierarchies(Path("/proc/self/mountinfo").read_text())
    parents = [run, state] + ([tree] if tree is not None else [])
    parents += dict.fromkeys(mount / config.cgroup_name for mount in v1.values())
    ids = sorted({p.name for d in parents if d.is_dir() for p in d.iterdir() if p.is_dir()})
    return [
        OnDisk(
            sandbox_id,
            read_kept(state / sandbox_id),
            _cgroup_pids(tree / sandbox_id) if tree is not None else set(),
        )
        for sandbox_id in ids
    ]


def _tree_root(config: Config) -> Path | None:
    """Where the daemon's cgroup2 tree is (as cgroups.ProcessTree puts it), without making it."""
    mount = cgroups.find_cgroup2()
    if mount is None:
        own = config.run_dir / "cgroup2"
        mount = own if own.is_mount() else None
    return None if mount is None else mount / config.cgroup_name


def _cgroup_pids(path: Path) -> set[int]:
    pids: set[int] = set()
    for directory, _subdirs, files in os.walk(path):
        if "cgroup.procs" in files:
            with contextlib.suppress(OSError, ValueError):
                text = (Path(directory) / "cgroup.procs").read_text()
                pids.update(int(line) for line in text.split())
    return pids


# -- sandboxd recover -------------------------------------------------------------------------


async def recover(config: Config, *, adopt: bool) -> list[str]:
    """Settle the sandboxes on disk after the database was lost or damaged: with `adopt`,
    record again those whose supervisor is alive (and remove the rest); else remove them all.
    The database found is set aside and a new one made. Lines saying what was done."""
    held = lock(config.state_dir)
    try:
        database = config.state_dir / DATABASE
        found = inspect_database(database)
        claimed = read_generation(config.state_dir)
        if trusted(found, claimed):
            raise RecoveryError(
                f"the database {database} is sound and this state directory's: nothing to "
                "recover (the daemon adopts its sandboxes itself; delete them through the API)"
            )
        on_disk = find_sandboxes(config)
        # 1. no daemon may trust the state directory until this is done
        write_generation(config.state_dir, _RECOVERING)
        # 2. the database found is kept, a new one made
        aside = set_aside(database)
        store = Store(database)
        try:
            generation = store.generation()
            # 3. each sandbox adopted, or removed
            report = await _settle(config, store, generation, on_disk, adopt=adopt)
        finally:
            store.close()
        # 4. the state directory is the new database's
        write_generation(config.state_dir, generation)
    finally:
        os.close(held)
    if aside is not None:
        report.append(f"the database found is kept as {aside}")
    report.append(
        "the history of execs and of ended sandboxes was in the lost database and is gone"
    )
    return report


async def _settle(
    config: Config, store: Store, generation: str, on_disk: list[OnDisk], *, adopt: bool
) -> list[str]:
    tree = cgroups.ProcessTree(config.cgroup_name, config.run_dir)
    tree.start()
    controls = limits.for_layout(cgroups.detect_layout(), tree)
    controls.start()
    network = BridgeNetwork(config)
    report = []
    # Oldest first, so that the records keep the order of creation.
    for sandbox in sorted(on_disk, key=lambda s: str((s.kept or {}).get("created_at") or "")):
        why = "--remove" if not adopt else _unadoptable(sandbox)
        if why is None:
            assert sandbox.kept is not None
            try:
                record = store.restore_sandbox(**_fields(sandbox.kept))
            except (Conflict, ValueError, TypeError, KeyError) as exc:
                why = f"its record cannot be rebuilt: {exc}"
            else:
                keep(config.state_dir / "sandboxes" / record.id, record, generation)
                what = f"named {record.name}" if record.name else "unnamed"
                what = "pooled" if record.pooled else what
                report.append(f"adopted {record.id}: {what}, supervisor pid {record.pid}")
                continue
        await _remove(config, tree, controls, network, sandbox.id)
        report.append(f"removed {sandbox.id}: {why}")
    tree.stop()
    controls.stop()
    return report


def _unadoptable(sandbox: OnDisk) -> str | None:
    """Why the sandbox cannot be adopted; None if it can."""
    if sandbox.kept is None:
        return "nothing on disk says what it was (made before this version, or while created)"
    if sandbox.supervisor is None:
        return "its supervisor is gone" if not sandbox.pids else "its supervisor is not running"
    return None


def _fields(kept: dict[str, Any]) -> dict[str, Any]:
    fields = {
        name: kept.get(name) if name in _NEWER_FIELDS else kept[name] for name in _KEPT_FIELDS
    }
    for name in _TIMES:
        value = fields[name]
        fields[name] = None if value is None else datetime.fromisoformat(value)
    if not isinstance(fields["spec"], dict):
        raise ValueError("its spec is not an object")
    return fields


async def _remove(
    config: Config,
    tree: cgroups.ProcessTree,
    controls: limits.ResourceControl,
    network: BridgeNetwork,
    sandbox_id: str,
) -> None:
    """Everything of a sandbox on the host, by the daemon's own teardown (its processes by its
    cgroup, which nothing of it forks out of; link; cgroups, run and state files). Its mounts
    live in its own mount namespace and go with its last process."""
    host = Host(
        tree, controls, network, config.run_dir / "sandboxes", config.state_dir / "sandboxes"
    )
    await teardown(host, sandbox_id, Outcome.REMOVED)
    shutil.rmtree(config.state_dir / "logs" / sandbox_id, ignore_errors=True)  # its cmd's log
