"""The daemon's memory: sandboxes and execs as rows of one SQLite database, one transaction a step.

The store returns ORM rows (detached, fully loaded), never the public models: the service
converts them. Every lifecycle step is one short SQLite transaction; writers take the database
lock at BEGIN (BEGIN IMMEDIATE), so a check and the write it guards cannot be interleaved with
another writer's, even across processes. The schema changes only through Alembic (migrations/).
"""

from __future__ import annotations

import enum
import os
import sqlite3
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path
from typing import Any, TypeVar

import sqlalchemy as sa
from alembic import command
from alembic.config import Config
from sqlalchemy import Dialect, Engine, TypeDecorator, delete, event, func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker
from sqlalchemy.pool import ConnectionPoolEntry

import migrations
from daemon.errors import Conflict, LimitReached, NotFound
from daemon.lifecycle import LIVE_STATES, ExecState, ExitReason, SandboxState, check_transition

E = TypeVar("E", bound=enum.Enum)


class UTCDateTime(TypeDecorator[datetime]):
    """An aware UTC datetime. SQLite keeps no tzinfo, so it is stored naive in UTC and
    made aware again on the way out; a naive datetime is refused rather than guessed at."""

    impl = sa.DateTime
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError(f"naive datetime {value!r}: the store keeps aware UTC times only")
        return value.astimezone(UTC).replace(tzinfo=None)

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        return None if value is None else value.replace(tzinfo=UTC)


class StrEnumType(TypeDecorator[E]):
    """An enum stored as its string value, so rows read back as SandboxState, not str."""

    impl = sa.String
    cache_ok = True

    def __init__(self, enum_type: type[E]) -> None:
        super().__init__()
        self.enum_type = enum_type

    def process_bind_param(self, value: E | str | None, dialect: Dialect) -> str | None:
        return None if value is None else str(self.enum_type(value).value)

    def process_result_value(self, value: str | None, dialect: Dialect) -> E | None:
        return None if value is None else self.enum_type(value)


class Base(DeclarativeBase):
    # Named constraints, so that a later migration can drop or alter them by name.
    metadata = sa.MetaData(
        naming_convention={
            "ix": "ix_%(column_0_label)s",
            "uq": "uq_%(table_name)s_%(column_0_name)s",
            "ck": "ck_%(table_name)s_%(constraint_name)s",
            "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
            "pk": "pk_%(table_name)s",
        }
    )


class SandboxRecord(Base):
    __tablename__ = "sandboxes"

    id: Mapped[str] = mapped_column(sa.String, primary_key=True)
    # Order of creation, for "oldest first": max + 1, assigned under the write lock.
    seq: Mapped[int] = mapped_column(sa.Integer, unique=True)
    name: Mapped[str | None] = mapped_column(sa.String, unique=True)
    state: Mapped[SandboxState] = mapped_column(StrEnumType(SandboxState))
    hostname: Mapped[str] = mapped_column(sa.String)
    # The SandboxCreate as a dict (namespaces, rootfs, mounts, env, cmd, network, limits, ...).
    spec: Mapped[dict[str, Any]] = mapped_column(sa.JSON)
    # Which host uid range its user namespace maps; unique, so two sandboxes never share one.
    uid_slot: Mapped[int | None] = mapped_column(sa.Integer, unique=True)
    pid: Mapped[int | None] = mapped_column(sa.Integer)
    # The supervisor's start time (field 22 of /proc/PID/stat): a reused pid has another.
    pid_start: Mapped[int | None] = mapped_column(sa.Integer)
    base_dir: Mapped[str | None] = mapped_column(sa.String)
    # A bridged sandbox's address on the daemon's bridge, leased while it lives; unique (the
    # index below), so two sandboxes never hold one, also across restarts.
    ip: Mapped[str | None] = mapped_column(sa.String)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)
    started_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    expires_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    exit_code: Mapped[int | None] = mapped_column(sa.Integer)
    exit_signal: Mapped[str | None] = mapped_column(sa.String)
    exit_reason: Mapped[ExitReason | None] = mapped_column(StrEnumType(ExitReason))
    exit_message: Mapped[str | None] = mapped_column(sa.Text)
    # Started for the warm pool and not yet taken by a create: the API does not see it
    # (migration 0004).
    pooled: Mapped[bool] = mapped_column(default=False)

    __table_args__ = (sa.Index("ix_sandboxes_ip", "ip", unique=True),)


class ExecRecord(Base):
    __tablename__ = "execs"

    id: Mapped[str] = mapped_column(sa.String, primary_key=True)
    seq: Mapped[int] = mapped_column(sa.Integer, unique=True)
    # No ORM relationship: the database's ON DELETE CASCADE removes a sandbox's execs.
    sandbox_id: Mapped[str] = mapped_column(
        sa.ForeignKey("sandboxes.id", ondelete="CASCADE"), index=True
    )
    cmd: Mapped[list[str]] = mapped_column(sa.JSON)
    state: Mapped[ExecState] = mapped_column(StrEnumType(ExecState))
    pid: Mapped[int | None] = mapped_column(sa.Integer)
    exit_code: Mapped[int | None] = mapped_column(sa.Integer)
    signal: Mapped[str | None] = mapped_column(sa.String)
    timed_out: Mapped[bool] = mapped_column(default=False)
    stdout: Mapped[str] = mapped_column(sa.Text, default="")
    stderr: Mapped[str] = mapped_column(sa.Text, default="")
    stdout_truncated: Mapped[bool] = mapped_column(default=False)
    stderr_truncated: Mapped[bool] = mapped_column(default=False)
    oom_killed: Mapped[bool] = mapped_column(default=False)  # migration 0003
    started_at: Mapped[datetime] = mapped_column(UTCDateTime)
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime)


# Fields the callers may set; id, seq and created_at are fixed, state moves only by transition,
# and a sandbox leaves the pool only by take_pooled.
_FIXED = {"id", "seq", "state", "created_at", "pooled"}
_SETTABLE = frozenset(SandboxRecord.__table__.columns.keys()) - _FIXED
_ASKED_FOR = SandboxRecord.pooled.is_(False)


def _on_connect(dbapi_connection: sqlite3.Connection, _record: ConnectionPoolEntry) -> None:
    # sqlite3 must not open transactions on its own: its legacy mode skips BEGIN before a
    # SELECT, so a check and the write it guards would not share a transaction. _on_begin does it.
    dbapi_connection.isolation_level = None
    cursor = dbapi_connection.cursor()
    for pragma in (
        "journal_mode=WAL",  # readers never wait for the writer
        "foreign_keys=ON",  # off by default, per connection; the exec cascade needs it
        "synchronous=NORMAL",  # with WAL: durable up to the last checkpoint, never corrupt
        "busy_timeout=5000",  # wait for another writer's lock rather than fail at once
    ):
        cursor.execute(f"PRAGMA {pragma}")
    cursor.close()


def _on_begin(conn: Any) -> None:
    mode = conn.get_execution_options().get("sqlite_begin", "DEFERRED")
    conn.exec_driver_sql(f"BEGIN {mode}")


def _engine(database: Path) -> Engine:
    """An engine on `database`, created 0600 if missing (it holds every sandbox's env)."""
    database.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.close(os.open(database, os.O_RDWR | os.O_CREAT, 0o600))
    os.chmod(database, 0o600)
    engine = sa.create_engine(f"sqlite:///{database}")
    event.listen(engine, "connect", _on_connect)
    event.listen(engine, "begin", _on_begin)
    return engine


def migrate(database: Path) -> None:
    """Bring `database` to the newest schema (alembic upgrade head), creating it if missing."""
    engine = _engine(database)
    try:
        config = Config()  # no ini file: Alembic then leaves the daemon's logging alone
        config.set_main_option("script_location", str(Path(migrations.__file__).parent))
        with engine.begin() as connection:
            config.attributes["connection"] = connection
            command.upgrade(config, "head")
    finally:
        engine.dispose()


class Store:
    """Sandboxes and execs on disk; the only thing the service uses to remember anything."""

    def __init__(self, database: Path) -> None:
        migrate(database)
        self._engine = _engine(database)
        self._reader = sessionmaker(self._engine, expire_on_commit=False)
        # `self._writer.begin()`: one write transaction, committed on leaving the block and
        # rolled back, leaving the database unchanged, on an error.
        self._writer = sessionmaker(
            self._engine.execution_options(sqlite_begin="IMMEDIATE"), expire_on_commit=False
        )

    def close(self) -> None:
        self._engine.dispose()

    # Sandboxes.

    def create_sandbox(
        self,
        *,
        id: str,
        name: str | None,
        hostname: str,
        spec: dict[str, Any],
        max_live: int,
        now: datetime,
        expires_at: datetime | None,
        subnet: IPv4Network | None = None,
        pooled: bool = False,
    ) -> SandboxRecord:
        """Record a new sandbox in `creating`, with the lowest free uid slot and, given a
        `subnet`, the lowest free address in it (its first address is the bridge's). A pooled
        one does not count towards `max_live`."""
        try:
            with self._writer.begin() as session:
                if not pooled:
                    _check_room(session, name, max_live)
                seq = session.scalar(select(func.max(SandboxRecord.seq)))
                record = SandboxRecord(
                    id=id,
                    seq=(seq or 0) + 1,
                    name=name,
                    state=SandboxState.CREATING,
                    hostname=hostname,
                    spec=spec,
                    uid_slot=_lowest_free_slot(session),
                    ip=None if subnet is None else _lowest_free_address(session, subnet),
                    created_at=now,
                    expires_at=expires_at,
                    pooled=pooled,
                )
                session.add(record)
        except IntegrityError as exc:
            # A name taken between the check and the insert (the check ran in another process's
            # view, or someone bypassed it): the UNIQUE constraint has the last word.
            if "sandboxes.name" in str(exc.orig):
                raise Conflict(f"the name {name!r} is already in use") from exc
            raise
        return record

    def take_pooled(
        self,
        sandbox_id: str,
        *,
        name: str | None,
        hostname: str,
        spec: dict[str, Any],
        max_live: int,
        now: datetime,
        expires_at: datetime | None,
    ) -> SandboxRecord:
        """A pooled, running sandbox becomes the one a create asked for: its name, host name,
        spec and times are the request's, and it is the newest sandbox. Conflict, LimitReached
        (and nothing changes) as for create_sandbox."""
        try:
            with self._writer.begin() as session:
                _check_room(session, name, max_live)
                record = _load(session, sandbox_id)
                if not record.pooled or record.state != SandboxState.RUNNING:
                    raise NotFound(f"no pooled sandbox {sandbox_id!r}")
                seq = session.scalar(select(func.max(SandboxRecord.seq)))
                record.seq = (seq or 0) + 1
                record.pooled = False
                record.name, record.hostname, record.spec = name, hostname, spec
                record.created_at = record.started_at = now
                record.expires_at = expires_at
        except IntegrityError as exc:
            if "sandboxes.name" in str(exc.orig):
                raise Conflict(f"the name {name!r} is already in use") from exc
            raise
        return record

    def get_sandbox(self, ref: str, *, pooled_too: bool = False) -> SandboxRecord:
        """The sandbox whose id is `ref`, else whose name is `ref`; a pooled one only when
        asked for (by the service, never for the API)."""
        with self._reader() as session:
            record = session.get(SandboxRecord, ref) or session.scalar(
                select(SandboxRecord).where(SandboxRecord.name == ref)
            )
        if record is None or (record.pooled and not pooled_too):
            raise NotFound(f"no sandbox {ref!r}")
        return record

    def list_sandboxes(
        self,
        states: Sequence[SandboxState] = (),
        labels: Mapping[str, str] | None = None,
        *,
        pooled_too: bool = False,
    ) -> list[SandboxRecord]:
        """Sandboxes oldest first, in any of `states` (all if empty), carrying every label."""
        query = select(SandboxRecord).order_by(SandboxRecord.seq)
        if not pooled_too:
            query = query.where(_ASKED_FOR)
        if states:
            query = query.where(SandboxRecord.state.in_(states))
        with self._reader() as session:
            records = list(session.scalars(query))
        wanted = (labels or {}).items()
        return [r for r in records if wanted <= dict(r.spec.get("labels") or {}).items()]

    def live_sandboxes(self) -> list[SandboxRecord]:
        """Sandboxes in `creating` or `running`, oldest first: those a restart must adopt,
        pooled ones too."""
        return self.list_sandboxes(states=sorted(LIVE_STATES), pooled_too=True)

    def expired_sandboxes(self, now: datetime) -> list[SandboxRecord]:
        """Sandboxes whose ttl ran out by `now`, in any state, oldest first."""
        query = (
            select(SandboxRecord).where(SandboxRecord.expires_at <= now).order_by(SandboxRecord.seq)
        )
        with self._reader() as session:
            return list(session.scalars(query))

    def count_sandboxes(self) -> tuple[int, int]:
        """(running, total)."""
        running = func.sum(sa.case((SandboxRecord.state == SandboxState.RUNNING, 1), else_=0))
        with self._reader() as session:
            row = session.execute(
                select(running, func.count()).select_from(SandboxRecord).where(_ASKED_FOR)
            ).one()
        return int(row[0] or 0), int(row[1])

    def transition(self, sandbox_id: str, target: SandboxState, **fields: Any) -> SandboxRecord:
        """Move a sandbox to `target` if the lifecycle allows it (else InvalidTransition and
        nothing changes), setting `fields` (pid, exit_code, uid_slot=None, ...) in the same step."""
        _check_fields(fields)
        with self._writer.begin() as session:
            record = _load(session, sandbox_id)
            check_transition(record.state, target)
            record.state = target
            for key, value in fields.items():
                setattr(record, key, value)
        return record

    def update_sandbox(self, sandbox_id: str, **fields: Any) -> SandboxRecord:
        """Set fields other than the state (pid, base_dir, ip, ...)."""
        _check_fields(fields)
        with self._writer.begin() as session:
            record = _load(session, sandbox_id)
            for key, value in fields.items():
                setattr(record, key, value)
        return record

    def delete_sandbox(self, sandbox_id: str) -> None:
        """Forget a sandbox; its execs go with it (ON DELETE CASCADE)."""
        with self._writer.begin() as session:
            session.delete(_load(session, sandbox_id))

    # Execs.

    def insert_exec(
        self, *, id: str, sandbox_id: str, cmd: Sequence[str], now: datetime
    ) -> ExecRecord:
        """Record a new exec, `running`. NotFound if the sandbox is gone (the foreign key
        says so, without a query of its own)."""
        try:
            with self._writer.begin() as session:
                seq = session.scalar(select(func.max(ExecRecord.seq)))
                record = ExecRecord(
                    id=id,
                    seq=(seq or 0) + 1,
                    sandbox_id=sandbox_id,
                    cmd=list(cmd),
                    state=ExecState.RUNNING,
                    started_at=now,
                )
                session.add(record)
        except IntegrityError as exc:
            raise NotFound(f"no sandbox {sandbox_id}") from exc
        return record

    def set_exec_pid(self, exec_id: str, pid: int) -> None:
        with self._writer.begin() as session:
            _load_exec(session, exec_id).pid = pid

    def finish_exec(
        self,
        exec_id: str,
        *,
        exit_code: int | None,
        signal: str | None,
        timed_out: bool,
        stdout: str,
        stderr: str,
        stdout_truncated: bool,
        stderr_truncated: bool,
        finished_at: datetime,
        oom_killed: bool = False,
        pid: int | None = None,
    ) -> ExecRecord:
        """Record how an exec ended. The first result stored wins: the supervisor may report
        the same exit twice around a daemon restart, and the second report is ignored."""
        with self._writer.begin() as session:
            record = _load_exec(session, exec_id)
            if record.state == ExecState.RUNNING:
                record.pid = record.pid if pid is None else pid
                record.state = ExecState.EXITED
                record.exit_code = exit_code
                record.signal = signal
                record.timed_out = timed_out
                record.stdout = stdout
                record.stderr = stderr
                record.stdout_truncated = stdout_truncated
                record.stderr_truncated = stderr_truncated
                record.oom_killed = oom_killed
                record.finished_at = finished_at
        return record

    def get_exec(self, sandbox_id: str, exec_id: str) -> ExecRecord:
        with self._reader() as session:
            record = session.get(ExecRecord, exec_id)
        if record is None or record.sandbox_id != sandbox_id:
            raise NotFound(f"no exec {exec_id!r} in sandbox {sandbox_id!r}")
        return record

    def list_execs(self, sandbox_id: str) -> list[ExecRecord]:
        """A sandbox's execs, oldest first."""
        return self._execs(sandbox_id)

    def running_execs(self, sandbox_id: str) -> list[ExecRecord]:
        return self._execs(sandbox_id, ExecState.RUNNING)

    def delete_exec(self, exec_id: str) -> None:
        """Forget an exec that never ran (its sandbox ended before it could start)."""
        with self._writer.begin() as session:
            session.execute(delete(ExecRecord).where(ExecRecord.id == exec_id))

    def delete_execs_finished_before(self, cutoff: datetime) -> int:
        """Forget execs that ended before `cutoff`; how many there were."""
        with self._writer.begin() as session:
            result = session.execute(
                delete(ExecRecord).where(
                    ExecRecord.state == ExecState.EXITED, ExecRecord.finished_at < cutoff
                )
            )
            return int(getattr(result, "rowcount", 0) or 0)

    def _execs(self, sandbox_id: str, state: ExecState | None = None) -> list[ExecRecord]:
        query = select(ExecRecord).where(ExecRecord.sandbox_id == sandbox_id)
        if state is not None:
            query = query.where(ExecRecord.state == state)
        with self._reader() as session:
            return list(session.scalars(query.order_by(ExecRecord.seq)))


def _load(session: Session, sandbox_id: str) -> SandboxRecord:
    record = session.get(SandboxRecord, sandbox_id)
    if record is None:
        raise NotFound(f"no sandbox {sandbox_id!r}")
    return record


def _load_exec(session: Session, exec_id: str) -> ExecRecord:
    record = session.get(ExecRecord, exec_id)
    if record is None:
        raise NotFound(f"no exec {exec_id!r}")
    return record


def _check_room(session: Session, name: str | None, max_live: int) -> None:
    """LimitReached at `max_live` live sandboxes (pooled ones aside), Conflict on a taken name."""
    live = session.scalar(
        select(func.count())
        .select_from(SandboxRecord)
        .where(SandboxRecord.state.in_(LIVE_STATES), _ASKED_FOR)
    )
    if (live or 0) >= max_live:
        raise LimitReached(f"the daemon is at its limit of {max_live} live sandboxes")
    if name is not None and _name_taken(session, name):
        raise Conflict(f"the name {name!r} is already in use")


def _name_taken(session: Session, name: str) -> bool:
    return session.scalar(select(SandboxRecord.id).where(SandboxRecord.name == name)) is not None


def _lowest_free_slot(session: Session) -> int:
    """The lowest uid slot no record holds (a dead sandbox keeps its slot until released)."""
    used = session.scalars(
        select(SandboxRecord.uid_slot)
        .where(SandboxRecord.uid_slot.is_not(None))
        .order_by(SandboxRecord.uid_slot)
    )
    slot = 0
    for taken in used:
        if taken != slot:
            break
        slot += 1
    return slot


def _lowest_free_address(session: Session, subnet: IPv4Network) -> str:
    """The lowest address of `subnet` that no record holds, past the network's own address
    and the bridge's (the first host); LimitReached when every one is taken."""
    held = set(session.scalars(select(SandboxRecord.ip).where(SandboxRecord.ip.is_not(None))))
    first, last = int(subnet.network_address) + 2, int(subnet.broadcast_address) - 1
    for number in range(first, last + 1):
        address = str(IPv4Address(number))
        if address not in held:
            return address
    raise LimitReached(f"every address of the bridge's subnet {subnet} is in use")


def _check_fields(fields: Mapping[str, Any]) -> None:
    unknown = set(fields) - _SETTABLE
    if unknown:
        raise TypeError(f"cannot set {', '.join(sorted(unknown))} of a sandbox this way")
