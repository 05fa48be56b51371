"""The daemon's memory: sandboxes and execs as rows of one SQLite database, one transaction a step.

The store returns ORM rows (detached, fully loaded), never the public models: the service
converts them. Every lifecycle step is one short SQLite transaction; writers take the database
lock at BEGIN (BEGIN IMMEDIATE), so a check and the write it guards cannot be interleaved with
another writer's, even across processes. The schema changes only through Alembic (migrations/).

The steps are SQLAlchemy Core statements on a Connection, built once at import; the ORM classes
give the schema and the records' shape, but no Session is used: its identity map and unit
of work cost more than the SQL itself (each step took two to three times as long).

The two steps every exec takes (recorded started, recorded ended) go straight to sqlite3 on a
connection of their own (_ExecLane): SQLAlchemy's statement execution, result and type
processing cost three times the SQL there (tests/perf/store_calls.py). They write the same
values SQLAlchemy would (tests/daemon/test_exec_lane.py reads them back through it).
"""

from __future__ import annotations

import contextlib
import enum
import functools
import json
import os
import re
import sqlite3
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path
from typing import Any, Literal, TypeVar, cast

import sqlalchemy as sa
from sqlalchemy import (
    Connection,
    Dialect,
    Engine,
    TypeDecorator,
    bindparam,
    delete,
    event,
    func,
    insert,
    select,
    update,
)
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import (
    DeclarativeBase,
    Mapped,
    configure_mappers,
    make_transient_to_detached,
    mapped_column,
)
from sqlalchemy.pool import ConnectionPoolEntry

import migrations
from daemon.config import ConfigError
from daemon.errors import Conflict, Invalid, LeasesHeld, LimitReached, NotFound
from daemon.lifecycle.events import Event, EventType
from daemon.lifecycle.states import (
    HIDDEN_STATES,
    POOL_STATES,
    UNFINISHED_STATES,
    ExecState,
    ExitReason,
    LifecycleState,
    SandboxState,
    check_transition,
    public_state,
)

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
    """An enum stored as its string value, so rows read back as LifecycleState, not str."""

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
    # Every write of it is checked against the lifecycle's table (daemon/lifecycle/states.py).
    state: Mapped[LifecycleState] = mapped_column(StrEnumType(LifecycleState))
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
    # The image it was made from (its config digest), or None (migration 0010): while a
    # record names it, the image cannot be deleted.
    image_id: Mapped[str | None] = mapped_column(sa.String, index=True)

    __table_args__ = (sa.Index("ix_sandboxes_ip", "ip", unique=True),)

    @property
    def pooled(self) -> bool:
        """Started for the warm pool and not yet taken by a create: the API does not see it.
        A state since migration 0007 (a column from 0004 till then)."""
        return self.state in POOL_STATES


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
    # The bytes kept, exactly (migration 0007); `encoding` says how clients see them.
    stdout: Mapped[bytes] = mapped_column(sa.LargeBinary, default=b"")
    stderr: Mapped[bytes] = mapped_column(sa.LargeBinary, default=b"")
    encoding: Mapped[str] = mapped_column(sa.String, default="utf-8", server_default="utf-8")
    stdout_truncated: Mapped[bool] = mapped_column(default=False)
    stderr_truncated: Mapped[bool] = mapped_column(default=False)
    oom_killed: Mapped[bool] = mapped_column(default=False)  # migration 0003
    started_at: Mapped[datetime] = mapped_column(UTCDateTime)
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime)


class MetaRecord(Base):
    """One row: the database's generation, a random id made with it (migration 0005). The
    files the daemon keeps beside it carry it too, so that a database put in place of
    another is told apart from the one kept with them (daemon/lifecycle/recovery.py)."""

    __tablename__ = "meta"

    id: Mapped[int] = mapped_column(sa.Integer, primary_key=True)
    generation: Mapped[str] = mapped_column(sa.String)


class IdempotencyKeyRecord(Base):
    """The Idempotency-Key of a create that succeeded: the sandbox it made, and a hash of the
    body it came with (migration 0006). No foreign key: the key outlives its sandbox."""

    __tablename__ = "idempotency_keys"

    key: Mapped[str] = mapped_column(sa.String, primary_key=True)
    body_hash: Mapped[str] = mapped_column(sa.String)
    sandbox_id: Mapped[str] = mapped_column(sa.String)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, index=True)


class EventRecord(Base):
    """What happened, numbered (migration 0009). AUTOINCREMENT: a seq is never used again,
    even after the newest rows are deleted, so a follower's last id stays meaningful across
    restarts. No foreign keys: an event outlives its sandbox, exec or image."""

    __tablename__ = "events"
    __table_args__ = ({"sqlite_autoincrement": True},)

    seq: Mapped[int] = mapped_column(sa.Integer, primary_key=True)
    time: Mapped[datetime] = mapped_column(UTCDateTime)
    type: Mapped[str] = mapped_column(sa.String)
    sandbox_id: Mapped[str | None] = mapped_column(sa.String)
    exec_id: Mapped[str | None] = mapped_column(sa.String)
    image_id: Mapped[str | None] = mapped_column(sa.String)
    data: Mapped[dict[str, Any]] = mapped_column(sa.JSON)


class ImageRecord(Base):
    """An image in the store (migration 0010): its layers' files are under STATE/images
    (daemon/images/store.py). `names` are name:tag references, each held by one image."""

    __tablename__ = "images"

    id: Mapped[str] = mapped_column(sa.String, primary_key=True)  # the config's digest
    digest: Mapped[str] = mapped_column(sa.String, index=True)  # the manifest's
    names: Mapped[list[str]] = mapped_column(sa.JSON)
    # Bottom first: [{"digest", "diff_id", "size", "media_type"}]
    layers: Mapped[list[dict[str, Any]]] = mapped_column(sa.JSON)
    size: Mapped[int] = mapped_column(sa.Integer)
    # What a sandbox takes from it: env, cmd, entrypoint, working_dir, user
    config: Mapped[dict[str, Any]] = mapped_column(sa.JSON)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)


R = TypeVar("R", SandboxRecord, ExecRecord, IdempotencyKeyRecord, MetaRecord, ImageRecord)

# Set up the mappers now rather than at their first use: _record builds instances without the
# constructor, which is what would otherwise trigger it.
configure_mappers()

# Fields the callers may set; id, seq and created_at are fixed, state moves only by transition,
# and a sandbox leaves the pool only by take_pooled.
_FIXED = {"id", "seq", "state", "created_at"}
_SETTABLE = frozenset(SandboxRecord.__table__.columns.keys()) - _FIXED


def _on_connect(dbapi_connection: sqlite3.Connection, _record: ConnectionPoolEntry) -> None:
    # sqlite3 must not open transactions on its own: its legacy mode skips BEGIN before a
    # SELECT, so a check and the write it guards would not share a transaction. _on_begin does it.
    dbapi_connection.isolation_level = None
    cursor = dbapi_connection.cursor()
    for pragma in (
        "journal_mode=WAL",  # readers never wait for the writer
        "foreign_keys=ON",  # off by default, per connection; the exec cascade needs it
        # With WAL: a commit is not fsynced, only each checkpoint. A daemon killed loses
        # nothing (the kernel holds the write); a power loss can lose the last commits, never
        # the database's consistency, and kills every sandbox anyway (docs/recovery.md).
        "synchronous=NORMAL",
        "busy_timeout=5000",  # wait for another writer's lock rather than fail at once
    ):
        cursor.execute(f"PRAGMA {pragma}")
    cursor.close()


def _on_begin(conn: Connection) -> None:
    mode = conn.get_execution_options().get("sqlite_begin", "DEFERRED")
    statement = f"BEGIN {mode}"
    # Straight to sqlite3: conn.exec_driver_sql, with its events, cursor wrapper and result,
    # added some 20 µs to every transaction, a tenth of a short step.
    driver = cast(sqlite3.Connection, conn.connection.driver_connection)
    try:
        driver.execute(statement)
    except sqlite3.Error as exc:  # e.g. no lock within busy_timeout: raised as SQLAlchemy would
        raise sa.exc.DBAPIError.instance(statement, None, exc, sqlite3.Error) from exc


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
        if _revisions(engine) == [newest_revision()]:
            return  # nothing to do: and Alembic (9 MiB of a process) is not even loaded
        # Imported here: a daemon whose database is current never needs it.
        from alembic import command
        from alembic.config import Config

        config = Config()  # no ini file: Alembic then leaves the daemon's logging alone
        config.set_main_option("script_location", str(Path(migrations.__file__).parent))
        with engine.begin() as connection:
            config.attributes["connection"] = connection
            command.upgrade(config, "head")
    finally:
        engine.dispose()


def migrate_apart(database: Path) -> None:
    """migrate() in a short-lived process of its own, if there is anything to migrate: the
    daemon then never loads Alembic (9 MiB it would hold for the rest of its life)."""
    if database.exists():
        engine = _engine(database)
        try:
            if _revisions(engine) == [newest_revision()]:
                return
        finally:
            engine.dispose()
    # This package's directory first on the child's path: it migrates with this code.
    root = str(Path(__file__).resolve().parents[2])
    path = os.pathsep.join(filter(None, (root, os.environ.get("PYTHONPATH"))))
    code = "import sys, pathlib, daemon.store.database as d; d.migrate(pathlib.Path(sys.argv[1]))"
    done = subprocess.run(  # -P: not the daemon's working directory first on its path
        [sys.executable, "-P", "-c", code, str(database)],
        env={"PATH": os.environ.get("PATH", os.defpath), "PYTHONPATH": path, "LANG": "C.UTF-8"},
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        lines = done.stderr.strip().splitlines() or [f"exit status {done.returncode}"]
        raise MigrationFailed(f"cannot migrate {database}: {lines[-1]}")


class MigrationFailed(Exception):
    """The database could not be brought to the newest schema (the last line says why)."""


_REVISION = re.compile(r"""^(down_)?revision(?:: [^=]+)? = (?:"([^"]+)"|'([^']+)'|None)$""", re.M)


@functools.cache  # the files do not change while a process runs
def newest_revision() -> str | None:
    """The head of migrations/versions, read from the files as text (not by Alembic): the
    revision that no other names as its down_revision; None if that is not exactly one."""
    revisions: set[str] = set()
    downs: set[str] = set()
    for path in (Path(migrations.__file__).parent / "versions").glob("[!_]*.py"):
        found = {m[1] or "": m[2] or m[3] for m in _REVISION.finditer(path.read_text())}
        if not found.get(""):
            return None  # not a migration we can read: let Alembic decide
        revisions.add(found[""])
        if found.get("down_"):
            downs.add(found["down_"])
    heads = revisions - downs
    return heads.pop() if len(heads) == 1 else None


def _revisions(engine: Engine) -> list[str]:
    """The revisions the database is at (Alembic's table), none when it has no schema yet."""
    with engine.connect() as conn:
        try:
            rows = conn.exec_driver_sql("SELECT version_num FROM alembic_version").all()
        except sa.exc.OperationalError:  # no such table: a new database
            return []
    return [str(row[0]) for row in rows]


@dataclass(frozen=True)
class DatabaseFound:
    """What a database file is, as read before the daemon trusts it (daemon/lifecycle/recovery.py).

    `kind`: missing; empty (0 bytes); damaged (SQLite cannot read it, `detail` says why);
    unmarked (readable, made before migration 0005: no generation yet); marked (readable,
    with its `generation`).
    """

    kind: Literal["missing", "empty", "damaged", "unmarked", "marked"]
    generation: str | None = None
    detail: str = ""


def inspect_database(database: Path) -> DatabaseFound:
    """What `database` is, read only: its file is not changed, nor migrated."""
    try:
        size = database.stat().st_size
    except FileNotFoundError:
        return DatabaseFound("missing")
    if size == 0:
        return DatabaseFound("empty")
    try:
        conn = sqlite3.connect(f"file:{database}?mode=ro", uri=True)
    except sqlite3.Error as exc:
        return DatabaseFound("damaged", detail=str(exc))
    try:
        tables = {row[0] for row in conn.execute("SELECT name FROM sqlite_master")}
        if "sandboxes" not in tables:  # made, never migrated: nothing was ever stored
            return DatabaseFound("empty", detail="no tables")
        if "meta" not in tables:
            return DatabaseFound("unmarked")
        row = conn.execute("SELECT generation FROM meta WHERE id = 1").fetchone()
        if row is None:
            return DatabaseFound("damaged", detail="its generation is missing")
        return DatabaseFound("marked", generation=str(row[0]))
    except sqlite3.Error as exc:  # e.g. "file is not a database"
        return DatabaseFound("damaged", detail=str(exc))
    finally:
        conn.close()


# The statements, built once. SQLAlchemy caches each one's compiled SQL by its structure; an
# UPDATE whose SET comes from the parameters is cached once per set of column names.
_SANDBOXES = Base.metadata.tables["sandboxes"]
_EXECS = Base.metadata.tables["execs"]
_S, _X = _SANDBOXES.c, _EXECS.c
# The states are ORed, not IN (...): a list is an expanding parameter, which SQLAlchemy
# renders again at every execution.
_ASKED_FOR = sa.and_(*(_S.state != state for state in sorted(HIDDEN_STATES)))

# By id, else by name: both match at most one row each, and the id's match sorts first.
_FIND_SANDBOX = (
    select(_SANDBOXES)
    .where(sa.or_(_S.id == bindparam("ref"), _S.name == bindparam("ref")))
    .order_by((_S.id == bindparam("ref")).desc())
    .limit(1)
)
_GET_SANDBOX = select(_SANDBOXES).where(_S.id == bindparam("sandbox_id"))
_SANDBOX_STATE = select(_S.state).where(_S.id == bindparam("sandbox_id"))
_UNRELEASED = (
    select(_SANDBOXES)
    .where(
        sa.or_(_S.state == LifecycleState.EXITED, _S.state == LifecycleState.FAILED),
        sa.or_(_S.uid_slot.is_not(None), _S.ip.is_not(None)),
    )
    .order_by(_S.seq)
)
# Whether there is room for one more asked-for sandbox: how many are live (pooled ones aside),
# and whether its name is held (a NULL name matches none).
_ROOM = select(
    select(func.count())
    .where(sa.or_(_S.state == LifecycleState.CREATING, _S.state == LifecycleState.RUNNING))
    .scalar_subquery(),
    sa.exists().where(_S.name == bindparam("name")),
)
_HELD_ADDRESSES = select(_S.ip).where(_S.ip.is_not(None))

# The lowest uid slot no record holds (a dead sandbox keeps its slot until released): 0 if
# free, else one past the lowest held slot whose successor is free. Both walk the slot's
# unique index, the second only up to the first gap.
_held, _next = _SANDBOXES.alias("held"), _SANDBOXES.alias("next")
_LOWEST_FREE_SLOT = sa.case(
    (~sa.exists().where(_S.uid_slot == 0), 0),
    else_=select(_held.c.uid_slot + 1)
    .where(
        _held.c.uid_slot.is_not(None),
        ~sa.exists().where(_next.c.uid_slot == _held.c.uid_slot + 1),
    )
    .order_by(_held.c.uid_slot)
    .limit(1)
    .scalar_subquery(),
)

# seq (max + 1) and the uid slot are computed by the INSERT itself: one statement, not three.
_NEXT_SEQ = select(func.coalesce(func.max(_S.seq), 0) + 1).scalar_subquery()
_INSERT_SANDBOX = (
    insert(_SANDBOXES).values(seq=_NEXT_SEQ, uid_slot=_LOWEST_FREE_SLOT).returning(*_SANDBOXES.c)
)
_RESTORE_SANDBOX = insert(_SANDBOXES).values(seq=_NEXT_SEQ).returning(*_SANDBOXES.c)
# A pooled, running sandbox becomes the newest, asked for; any other matches no row.
_TAKE_POOLED = (
    update(_SANDBOXES)
    .where(
        _S.id == bindparam("sandbox_id"),
        _S.state == LifecycleState.POOLED,
    )
    .values(seq=_NEXT_SEQ, state=LifecycleState.RUNNING)
    .returning(*_SANDBOXES.c)
)
_UPDATE_SANDBOX = (
    update(_SANDBOXES).where(_S.id == bindparam("sandbox_id")).returning(*_SANDBOXES.c)
)
_DELETE_SANDBOX = delete(_SANDBOXES).where(_S.id == bindparam("sandbox_id"))

_GET_EXEC = select(_EXECS).where(_X.id == bindparam("exec_id"))
_SET_EXEC_PID = update(_EXECS).where(_X.id == bindparam("exec_id"))
_DELETE_EXEC = delete(_EXECS).where(_X.id == bindparam("exec_id"))
_EXEC_ROWID: sa.Select[Any] = (
    select(sa.literal_column("rowid")).select_from(_EXECS).where(_X.id == bindparam("exec_id"))
)
_OUTPUT_PIECE = 64 * 1024
_GENERATION = select(MetaRecord.__table__.c.generation).where(MetaRecord.__table__.c.id == 1)

_KEYS = Base.metadata.tables["idempotency_keys"]
_K = _KEYS.c
# A key recorded before `since` is forgotten: never found, and deleted at the next write.
_FIND_KEY = select(_KEYS).where(_K.key == bindparam("key"), _K.created_at >= bindparam("since"))
_FORGET_KEYS = delete(_KEYS).where(_K.created_at < bindparam("since"))
_INSERT_KEY = insert(_KEYS)

_EVENTS = Base.metadata.tables["events"]
_V = _EVENTS.c
_INSERT_EVENT = insert(_EVENTS).returning(_V.seq)
# The last EVENTS_KEPT are kept; older ones are deleted every TRIM_EVERY inserts, in the
# inserting transaction (a range delete on the primary key: a few pages).
EVENTS_KEPT = 10_000
TRIM_EVERY = 128
_TRIM_EVENTS = delete(_EVENTS).where(_V.seq <= bindparam("below"))
_EVENTS_AFTER = select(_EVENTS).where(_V.seq > bindparam("since")).order_by(_V.seq)
_PENDING = "sandboxd_events"  # conn.info key: the events of the open transaction
_IMAGES = Base.metadata.tables["images"]
_I = _IMAGES.c
_IMAGE_EXISTS = select(_I.id).where(_I.id == bindparam("image_id"))
_IMAGE_USERS = select(_S.id).where(_S.image_id == bindparam("image_id")).limit(1)


_SQLITE_NEEDED = (3, 35, 0)


# -- the exec lane: an exec's two steps in plain sqlite3 ------------------------------------

_EXEC_COLUMNS = tuple(_EXECS.c.keys())
_LANE_RETURNING = ", ".join(_EXEC_COLUMNS)
# The values SQLAlchemy would write for a new exec: its defaults (false, empty) spelled out.
_LANE_INSERT_EXEC = f"""
INSERT INTO execs (id, seq, sandbox_id, cmd, state, timed_out, stdout, stderr, encoding,
                   stdout_truncated, stderr_truncated, oom_killed, started_at)
VALUES (:id, (SELECT coalesce(max(seq), 0) + 1 FROM execs), :sandbox_id, :cmd,
        '{ExecState.RUNNING.value}', 0, X'', X'', :encoding, 0, 0, 0, :started_at)
RETURNING {_LANE_RETURNING}"""
# Only a running exec takes a result: a second report of the same exit matches no row.
_LANE_FINISH_EXEC = f"""
UPDATE execs SET pid = coalesce(:new_pid, pid), state = '{ExecState.EXITED.value}',
    exit_code = :exit_code, signal = :signal, timed_out = :timed_out, stdout = :stdout,
    stderr = :stderr, stdout_truncated = :stdout_truncated,
    stderr_truncated = :stderr_truncated, oom_killed = :oom_killed, finished_at = :finished_at
WHERE id = :exec_id AND state = '{ExecState.RUNNING.value}'
RETURNING {_LANE_RETURNING}"""
_LANE_GET_EXEC = f"SELECT {_LANE_RETURNING} FROM execs WHERE id = :exec_id"
# What an exec's events say of its sandbox, read in the exec's own transaction.
_LANE_FACTS = "SELECT name, json_extract(spec, '$.labels') FROM sandboxes WHERE id = ?"
_LANE_INSERT_EVENT = (
    "INSERT INTO events (time, type, sandbox_id, exec_id, image_id, data) "
    "VALUES (?, ?, ?, ?, NULL, ?) RETURNING seq"
)
_LANE_TRIM_EVENTS = "DELETE FROM events WHERE seq <= ?"
# The exec columns SQLite keeps as 0/1, read back as bools.
_BOOLEANS = frozenset(c.name for c in _EXECS.c if isinstance(c.type, sa.Boolean))


class _ExecLane:
    """A plain sqlite3 connection for the exec's steps, set up as the engine's are
    (_on_connect). sqlite3 keeps each statement prepared (its statement cache), so a step
    costs its SQL and little else. Used under Store._ordered, from any thread."""

    def __init__(self, database: Path) -> None:
        self.db = sqlite3.connect(database, check_same_thread=False, isolation_level=None)
        _on_connect(self.db, None)  # type: ignore[arg-type]

    @contextlib.contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """BEGIN IMMEDIATE … COMMIT, rolled back on an error (the database unchanged)."""
        self.db.execute("BEGIN IMMEDIATE")
        try:
            yield self.db
            self.db.execute("COMMIT")
        except BaseException:
            # A failed COMMIT (a full disk) leaves the transaction open, holding the write
            # lock every other writer waits for: rolled back like any other failure.
            if self.db.in_transaction:
                self.db.execute("ROLLBACK")
            raise

    def close(self) -> None:
        self.db.close()


def _stored_time(value: datetime) -> str:
    """An aware datetime as UTCDateTime stores it: naive UTC in SQLAlchemy's SQLite format."""
    if value.tzinfo is None:
        raise ValueError(f"naive datetime {value!r}: the store keeps aware UTC times only")
    return value.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S.%f")


def _read_time(value: str | None) -> datetime | None:
    return None if value is None else datetime.fromisoformat(value).replace(tzinfo=UTC)


def _lane_exec(row: tuple[Any, ...]) -> ExecRecord:
    """A row of _LANE_RETURNING as the record _record would make of SQLAlchemy's."""
    values = dict(zip(_EXEC_COLUMNS, row, strict=True))
    values["cmd"] = json.loads(values["cmd"])
    values["state"] = ExecState(values["state"])
    values["started_at"] = _read_time(values["started_at"])
    values["finished_at"] = _read_time(values["finished_at"])
    for name in _BOOLEANS:
        values[name] = bool(values[name])
    record = sa.inspect(ExecRecord).class_manager.new_instance()
    record.__dict__.update(values)
    make_transient_to_detached(record)
    return record


def _lane_facts(db: sqlite3.Connection, sandbox_id: str) -> dict[str, Any]:
    """The sandbox's name and labels, which its execs' events carry (for the filters)."""
    found = db.execute(_LANE_FACTS, (sandbox_id,)).fetchone()
    if found is None:
        return {"name": None, "labels": {}}
    return {"name": found[0], "labels": json.loads(found[1]) if found[1] else {}}


def _lane_emit(
    db: sqlite3.Connection,
    events: list[Event],
    type: EventType,
    sandbox_id: str,
    exec_id: str,
    data: dict[str, Any],
) -> None:
    """_emit on the lane: one event of an exec, trimming as _emit does."""
    now = datetime.now(UTC)
    values = (_stored_time(now), str(type), sandbox_id, exec_id, json.dumps(data))
    seq = db.execute(_LANE_INSERT_EVENT, values).fetchone()[0]
    if seq % TRIM_EVERY == 0:
        db.execute(_LANE_TRIM_EVENTS, (seq - EVENTS_KEPT,))
    events.append(Event(seq, now, type, sandbox_id, exec_id, None, data))


def _lane_exec_end(
    db: sqlite3.Connection, events: list[Event], ended: ExecRecord, oom_kills: int
) -> None:
    """_emit_exec_end on the lane."""
    facts = _lane_facts(db, ended.sandbox_id)
    for _ in range(min(oom_kills, _OOM_EVENTS_MAX)):
        data = {**facts, "victim": "exec"}
        _lane_emit(db, events, EventType.SANDBOX_OOM, ended.sandbox_id, ended.id, data)
    seconds = (ended.finished_at - ended.started_at).total_seconds() if ended.finished_at else None
    data = {
        **facts,
        "exit_code": ended.exit_code,
        "signal": ended.signal,
        "timed_out": ended.timed_out,
        "oom_killed": ended.oom_killed,
        "duration_seconds": seconds,
    }
    _lane_emit(db, events, EventType.EXEC_EXITED, ended.sandbox_id, ended.id, data)


class Store:
    """Sandboxes and execs on disk; the only thing the service uses to remember anything."""

    def __init__(
        self,
        database: Path,
        publish: Callable[[Sequence[Event]], None] | None = None,
        *,
        migrated: bool = False,
    ) -> None:
        """`migrated`: the caller has brought the database to the newest schema already
        (migrate_apart), so it is not checked again."""
        if sqlite3.sqlite_version_info < _SQLITE_NEEDED:  # INSERT/UPDATE … RETURNING
            raise ConfigError(
                f"SQLite {sqlite3.sqlite_version} is too old: sandboxd needs "
                f"{'.'.join(map(str, _SQLITE_NEEDED))} or later (the library Python links to)"
            )
        if not migrated:
            migrate(database)
        self._engine = _engine(database)
        # `with self._writer.begin() as conn`: one write transaction, holding the lock from
        # BEGIN, committed on leaving the block and rolled back, leaving the database
        # unchanged, on an error. Reads use `self._engine.connect()`: BEGIN DEFERRED.
        self._writer = self._engine.execution_options(sqlite_begin="IMMEDIATE")
        # `publish` gets each transaction's events once it has committed. The lock keeps the
        # commits of this process's threads and their publishing in one order (seq order).
        self.publish = publish
        self._ordered = threading.Lock()
        self._lane = _ExecLane(database)

    @contextlib.contextmanager
    def _write(self) -> Iterator[Connection]:
        """A write transaction (as self._writer.begin()) whose events (_emit) are published
        after it commits; none if it rolls back."""
        with self._ordered:
            with self._writer.begin() as conn:
                conn.info[_PENDING] = []
                yield conn
                events: list[Event] = conn.info.pop(_PENDING)
            if events and self.publish is not None:
                self.publish(events)

    @contextlib.contextmanager
    def _write_lane(self) -> Iterator[tuple[sqlite3.Connection, list[Event]]]:
        """A write transaction on the exec lane, as _write: its events published once it
        has committed, in the same order as every other write's."""
        with self._ordered:
            with self._lane.transaction() as db:
                events: list[Event] = []
                yield db, events
            if events and self.publish is not None:
                self.publish(events)

    def emit(
        self,
        type: EventType,
        *,
        sandbox_id: str | None = None,
        exec_id: str | None = None,
        image_id: str | None = None,
        data: Mapping[str, Any] | None = None,
    ) -> None:
        """Record an event in a transaction of its own: for a change not stored here (an
        image pulled, imported or removed). A change stored here calls _emit in its own."""
        with self._write() as conn:
            _emit(conn, type, sandbox_id=sandbox_id, exec_id=exec_id, image_id=image_id, data=data)

    def events_after(self, since: int) -> list[Event]:
        """Events kept with a seq above `since`, oldest first."""
        with self._engine.connect() as conn:
            rows = conn.execute(_EVENTS_AFTER, {"since": since}).all()
        return [
            Event(r.seq, r.time, EventType(r.type), r.sandbox_id, r.exec_id, r.image_id, r.data)
            for r in rows
        ]

    def count_by_state(self) -> dict[SandboxState, int]:
        """How many asked-for sandboxes are in each state."""
        started = _S.started_at.is_not(None)
        query = (
            select(_S.state, _S.exit_reason, started, func.count())
            .where(_ASKED_FOR)
            .group_by(_S.state, _S.exit_reason, started)
        )
        counts: dict[SandboxState, int] = {}
        with self._engine.connect() as conn:
            for state, reason, was_started, n in conn.execute(query).all():
                reason = None if reason is None else ExitReason(reason)
                shown = public_state(LifecycleState(state), reason, bool(was_started))
                counts[shown] = counts.get(shown, 0) + int(n)
        return counts

    def close(self) -> None:
        self._lane.close()
        self._engine.dispose()

    def generation(self) -> str:
        """The database's generation (migration 0005): the mark of the files it keeps."""
        with self._engine.connect() as conn:
            return str(conn.execute(_GENERATION).scalar_one())

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
        base_dir: str | None = None,
        slots: int | None = None,
        image_id: str | None = None,
    ) -> SandboxRecord:
        """Record a new sandbox in `creating`, with the lowest free uid slot and, given a
        `subnet`, the lowest free address in it (its first address is the bridge's). A pooled
        one does not count towards `max_live`. `base_dir`: the default base it is built on.
        `slots`: how many uid slots there are (LimitReached when all are held, also by dying
        sandboxes not yet released). `image_id`: the image it is made from, Invalid if it
        has been deleted meanwhile (checked in the same transaction as the delete's check)."""
        with _unique_name(name), self._writer.begin() as conn:
            if not pooled:
                _check_room(conn, name, max_live)
            state = LifecycleState.WARMING if pooled else LifecycleState.CREATING
            check_transition(None, state)
            found = image_id is None or conn.execute(_IMAGE_EXISTS, {"image_id": image_id}).first()
            if not found:
                raise Invalid(f"image {image_id} is not in the store (deleted meanwhile)")
            values = {
                "id": id,
                "name": name,
                "state": state,
                "hostname": hostname,
                "spec": spec,
                "ip": None if subnet is None else _lowest_free_address(conn, subnet),
                "created_at": now,
                "expires_at": expires_at,
                "base_dir": base_dir,
                "image_id": image_id,
            }
            row = conn.execute(_INSERT_SANDBOX, values).one()
            if slots is not None and row.uid_slot >= slots:  # rolled back with the insert
                raise LeasesHeld(f"all {slots} uid ranges are held, some by ending sandboxes")
        return _record(SandboxRecord, row)

    def restore_sandbox(self, **fields: Any) -> SandboxRecord:
        """Record a running sandbox found alive on the host, as kept beside it when it was
        created (daemon/lifecycle/recovery.py): its uid slot and address as they are, the newest
        sandbox. Conflict if its name, uid slot or address is held by another record."""
        pooled = bool(fields.pop("pooled", False))
        _check_fields({k: v for k, v in fields.items() if k not in ("id", "created_at")})
        state = LifecycleState.POOLED if pooled else LifecycleState.RUNNING
        check_transition(None, state)
        try:
            with self._writer.begin() as conn:
                values = {**fields, "state": state}
                row = conn.execute(_RESTORE_SANDBOX, values).one()
        except IntegrityError as exc:
            raise Conflict(f"sandbox {fields['id']} collides with another: {exc.orig}") from exc
        return _record(SandboxRecord, row)

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
        asked = {
            "sandbox_id": sandbox_id,
            "name": name,
            "hostname": hostname,
            "spec": spec,
            "created_at": now,
            "started_at": now,
            "expires_at": expires_at,
        }
        check_transition(LifecycleState.POOLED, LifecycleState.RUNNING)  # the one it can take
        with _unique_name(name), self._write() as conn:
            _check_room(conn, name, max_live)
            row = conn.execute(_TAKE_POOLED, asked).one_or_none()
            if row is None:  # gone, not pooled (taken already), or not running
                raise NotFound(f"no pooled sandbox {sandbox_id!r}")
            _emit_sandbox(conn, EventType.SANDBOX_CREATED, row)
        return _record(SandboxRecord, row)

    def get_sandbox(self, ref: str, *, pooled_too: bool = False) -> SandboxRecord:
        """The sandbox whose id is `ref`, else whose name is `ref`; a pooled one only when
        asked for (by the service, never for the API)."""
        with self._engine.connect() as conn:
            row = conn.execute(_FIND_SANDBOX, {"ref": ref}).one_or_none()
        if row is None or (row.state in POOL_STATES and not pooled_too):
            raise NotFound(f"no sandbox {ref!r}")
        if row.state == LifecycleState.REMOVING:  # deleted: only its leases are left
            raise NotFound(f"no sandbox {ref!r}")
        return _record(SandboxRecord, row)

    def list_sandboxes(
        self,
        states: Sequence[LifecycleState] = (),
        labels: Mapping[str, str] | None = None,
        *,
        pooled_too: bool = False,
    ) -> list[SandboxRecord]:
        """Sandboxes oldest first, in any of `states` (all if empty), carrying every label."""
        query = select(_SANDBOXES).order_by(_S.seq)
        if not pooled_too:
            query = query.where(_ASKED_FOR)
        if states:
            query = query.where(_S.state.in_(states))
        records = self._read(SandboxRecord, query)
        wanted = (labels or {}).items()
        return [r for r in records if wanted <= dict(r.spec.get("labels") or {}).items()]

    def live_sandboxes(self) -> list[SandboxRecord]:
        """Sandboxes a restart must adopt, or finish tearing down (all but the ended), oldest
        first, pooled ones too."""
        return self.list_sandboxes(states=sorted(UNFINISHED_STATES), pooled_too=True)

    def unreleased_sandboxes(self) -> list[SandboxRecord]:
        """Ended sandboxes that still hold a uid slot or an address: a teardown that a
        stopped daemon left unfinished, oldest first."""
        return self._read(SandboxRecord, _UNRELEASED)

    def count_sandboxes(self) -> tuple[int, int]:
        """(running, total)."""
        running = func.sum(sa.case((_S.state == LifecycleState.RUNNING, 1), else_=0))
        with self._engine.connect() as conn:
            row = conn.execute(
                select(running, func.count()).select_from(_SANDBOXES).where(_ASKED_FOR)
            ).one()
        return int(row[0] or 0), int(row[1])

    def transition(
        self, sandbox_id: str, target: LifecycleState, *, oom_kills: int = 0, **fields: Any
    ) -> SandboxRecord:
        """Move a sandbox to `target` if the lifecycle allows it (else InvalidTransition and
        nothing changes), setting `fields` (pid, exit_code, uid_slot=None, ...) in the same step,
        with its event. `oom_kills`: OOM kills its main cmd's tree saw (sandbox.oom each)."""
        _check_fields(fields)
        with self._write() as conn:
            state = conn.execute(_SANDBOX_STATE, {"sandbox_id": sandbox_id}).scalar_one_or_none()
            if state is None:
                raise NotFound(f"no sandbox {sandbox_id!r}")
            check_transition(state, target)
            params = {"sandbox_id": sandbox_id, "state": target, **fields}
            row = conn.execute(_UPDATE_SANDBOX, params).one()
            _emit_transition(conn, row, oom_kills)
        return _record(SandboxRecord, row)

    def update_sandbox(self, sandbox_id: str, **fields: Any) -> SandboxRecord:
        """Set fields other than the state (pid, base_dir, ip, ...)."""
        _check_fields(fields)
        with self._writer.begin() as conn:
            # An UPDATE with nothing to SET is not SQL: then the record is only read.
            statement = _UPDATE_SANDBOX if fields else _GET_SANDBOX
            row = conn.execute(statement, {"sandbox_id": sandbox_id, **fields}).one_or_none()
        if row is None:
            raise NotFound(f"no sandbox {sandbox_id!r}")
        return _record(SandboxRecord, row)

    def remove_sandbox(self, sandbox_id: str, *, expired: bool = False) -> SandboxRecord:
        """A sandbox being torn down is forgotten by the API (removing): a 404 from now on, its
        name free for another and its image deletable (nothing of it runs to use it), its uid
        slot and address held till delete_sandbox lets them go. It is told destroyed now (and
        expired first, given `expired`, unless its end said so)."""
        with self._write() as conn:
            state = conn.execute(_SANDBOX_STATE, {"sandbox_id": sandbox_id}).scalar_one_or_none()
            if state is None:
                raise NotFound(f"no sandbox {sandbox_id!r}")
            check_transition(state, LifecycleState.REMOVING)
            before = conn.execute(_GET_SANDBOX, {"sandbox_id": sandbox_id}).one()
            params = {
                "sandbox_id": sandbox_id,
                "state": LifecycleState.REMOVING,
                "name": None,
                "image_id": None,
            }
            row = conn.execute(_UPDATE_SANDBOX, params).one()
            # One never announced (forgotten while creating: bad input found in its setup)
            # leaves no trace.
            if _announced(before):
                data = {"name": before.name, "labels": before.spec.get("labels") or {}}
                if expired and before.exit_reason != ExitReason.TTL_EXPIRED:
                    _emit(conn, EventType.SANDBOX_EXPIRED, sandbox_id=sandbox_id, data=data)
                _emit(conn, EventType.SANDBOX_DESTROYED, sandbox_id=sandbox_id, data=data)
        return _record(SandboxRecord, row)

    def delete_sandbox(self, sandbox_id: str) -> None:
        """Forget a sandbox, if the lifecycle allows it in its state (else InvalidTransition:
        one the API showed is removing first, and was told destroyed then); its execs go with
        it (ON DELETE CASCADE), and its uid slot and address are free."""
        with self._write() as conn:
            state = conn.execute(_SANDBOX_STATE, {"sandbox_id": sandbox_id}).scalar_one_or_none()
            if state is None:
                raise NotFound(f"no sandbox {sandbox_id!r}")
            check_transition(state, None)
            conn.execute(_DELETE_SANDBOX, {"sandbox_id": sandbox_id})

    # Execs.

    def insert_exec(
        self,
        *,
        id: str,
        sandbox_id: str,
        cmd: Sequence[str],
        now: datetime,
        encoding: str = "utf-8",
    ) -> ExecRecord:
        """Record a new exec, `running`. NotFound if the sandbox is gone (the foreign key
        says so, without a query of its own)."""
        values = {
            "id": id,
            "sandbox_id": sandbox_id,
            "cmd": json.dumps(list(cmd)),
            "started_at": _stored_time(now),
            "encoding": encoding,
        }
        try:
            with self._write_lane() as (db, events):
                row = db.execute(_LANE_INSERT_EXEC, values).fetchone()
                facts = _lane_facts(db, sandbox_id)
                data = {**facts, "cmd": list(cmd)}
                _lane_emit(db, events, EventType.EXEC_STARTED, sandbox_id, id, data)
        except sqlite3.IntegrityError as exc:
            raise NotFound(f"no sandbox {sandbox_id}") from exc
        return _lane_exec(row)

    def set_exec_pid(self, exec_id: str, pid: int) -> None:
        with self._writer.begin() as conn:
            if conn.execute(_SET_EXEC_PID, {"exec_id": exec_id, "pid": pid}).rowcount == 0:
                raise NotFound(f"no exec {exec_id!r}")

    def finish_exec(
        self,
        exec_id: str,
        *,
        exit_code: int | None,
        signal: str | None,
        timed_out: bool,
        stdout: bytes,
        stderr: bytes,
        stdout_truncated: bool,
        stderr_truncated: bool,
        finished_at: datetime,
        oom_killed: bool = False,
        pid: int | None = None,
        oom_kills: int = 0,
    ) -> ExecRecord:
        """Record how an exec ended, with its event. The first result stored wins: the
        supervisor may report the same exit twice around a daemon restart, and the second
        report is ignored. `oom_kills`: OOM kills its tree saw (sandbox.oom each)."""
        result = {
            "exec_id": exec_id,
            "new_pid": pid,  # None keeps the pid already stored
            "exit_code": exit_code,
            "signal": signal,
            "timed_out": timed_out,
            "stdout": stdout,
            "stderr": stderr,
            "stdout_truncated": stdout_truncated,
            "stderr_truncated": stderr_truncated,
            "oom_killed": oom_killed,
            "finished_at": _stored_time(finished_at),
        }
        with self._write_lane() as (db, events):
            row = db.execute(_LANE_FINISH_EXEC, result).fetchone()
            if row is None:  # finished already, or no such exec
                row = db.execute(_LANE_GET_EXEC, {"exec_id": exec_id}).fetchone()
                if row is None:
                    raise NotFound(f"no exec {exec_id!r}")
                return _lane_exec(row)
            ended = _lane_exec(row)
            _lane_exec_end(db, events, ended, max(oom_kills, int(oom_killed)))
        return ended

    def get_exec(self, sandbox_id: str, exec_id: str) -> ExecRecord:
        with self._engine.connect() as conn:
            row = conn.execute(_GET_EXEC, {"exec_id": exec_id}).one_or_none()
        if row is None or row.sandbox_id != sandbox_id:
            raise NotFound(f"no exec {exec_id!r} in sandbox {sandbox_id!r}")
        return _record(ExecRecord, row)

    def exec_output(self, exec_id: str, stream: Literal["stdout", "stderr"]) -> Iterator[bytes]:
        """An exec's stored stream in pieces, read through SQLite's incremental blob I/O: a
        connection for each piece, so none is held between them, and never the whole in
        memory. Ends early should the exec be forgotten meanwhile."""
        offset = 0
        while True:
            with self._engine.connect() as conn:
                rowid = conn.execute(_EXEC_ROWID, {"exec_id": exec_id}).scalar()
                if rowid is None:
                    return
                database = cast(sqlite3.Connection, conn.connection.driver_connection)
                try:
                    with database.blobopen("execs", stream, int(rowid), readonly=True) as blob:
                        blob.seek(offset)
                        piece = blob.read(_OUTPUT_PIECE)
                except sqlite3.OperationalError:  # an empty value (NULL-like) has no blob
                    return
            if not piece:
                return
            offset += len(piece)
            yield piece

    def list_execs(self, sandbox_id: str) -> list[ExecRecord]:
        """A sandbox's execs, oldest first."""
        return self._execs(sandbox_id)

    def running_execs(self, sandbox_id: str) -> list[ExecRecord]:
        return self._execs(sandbox_id, ExecState.RUNNING)

    def delete_exec(self, exec_id: str) -> None:
        """Forget an exec that never ran (its sandbox ended before it could start)."""
        with self._writer.begin() as conn:
            conn.execute(_DELETE_EXEC, {"exec_id": exec_id})

    def delete_execs_finished_before(self, cutoff: datetime) -> int:
        """Forget execs that ended before `cutoff`; how many there were."""
        statement = delete(_EXECS).where(_X.state == ExecState.EXITED, _X.finished_at < cutoff)
        with self._writer.begin() as conn:
            return conn.execute(statement).rowcount

    # Idempotency keys.

    def find_idempotency_key(self, key: str, since: datetime) -> IdempotencyKeyRecord | None:
        """`key` as recorded at or after `since`, or None."""
        with self._engine.connect() as conn:
            row = conn.execute(_FIND_KEY, {"key": key, "since": since}).one_or_none()
        return None if row is None else _record(IdempotencyKeyRecord, row)

    def record_idempotency_key(
        self, key: str, *, body_hash: str, sandbox_id: str, now: datetime, since: datetime
    ) -> None:
        """Record that `key` made `sandbox_id`, forgetting every key recorded before `since`
        in the same transaction (so that an expired key can be used again). Conflict if `key`
        is recorded already."""
        with self._writer.begin() as conn:
            conn.execute(_FORGET_KEYS, {"since": since})
            try:
                conn.execute(
                    _INSERT_KEY,
                    {
                        "key": key,
                        "body_hash": body_hash,
                        "sandbox_id": sandbox_id,
                        "created_at": now,
                    },
                )
            except IntegrityError as exc:
                raise Conflict(f"the Idempotency-Key {key!r} is already recorded") from exc

    # Images.

    def list_images(self) -> list[ImageRecord]:
        return self._read(ImageRecord, select(_IMAGES).order_by(_I.created_at, _I.id))

    def save_image(
        self, record: ImageRecord, event: EventType = EventType.IMAGE_IMPORTED
    ) -> ImageRecord:
        """Insert the image, or merge its names into the one with its id; each of its names
        is taken from any other image that held it (a tag moves to the newest image). With
        its `event` (imported or pulled), in the same step."""
        with self._write() as conn:
            for other in conn.execute(select(_IMAGES)).all():
                if other.id == record.id:
                    continue
                kept = [n for n in other.names if n not in record.names]
                if kept != other.names:
                    conn.execute(update(_IMAGES).where(_I.id == other.id).values(names=kept))
            existing = conn.execute(select(_IMAGES).where(_I.id == record.id)).one_or_none()
            if existing is None:
                values = {c.key: getattr(record, c.key) for c in _IMAGES.c}
                row = conn.execute(insert(_IMAGES).values(values).returning(*_IMAGES.c)).one()
            else:
                names = list(dict.fromkeys([*existing.names, *record.names]))
                row = conn.execute(
                    update(_IMAGES)
                    .where(_I.id == record.id)
                    .values(names=names)
                    .returning(*_IMAGES.c)
                ).one()
            data = {"names": list(row.names), "digest": row.digest}
            _emit(conn, event, image_id=row.id, data=data)
        return _record(ImageRecord, row)

    def sandbox_image_ids(self) -> set[str]:
        """The images that sandbox records name."""
        query = select(_S.image_id).where(_S.image_id.is_not(None)).distinct()
        with self._engine.connect() as conn:
            return set(conn.execute(query).scalars())

    def delete_image(self, image_id: str) -> list[ImageRecord]:
        """Forget the image (Conflict while a sandbox record names it); the images left."""
        with self._write() as conn:
            user = conn.execute(_IMAGE_USERS, {"image_id": image_id}).first()
            if user is not None:
                raise Conflict(f"image {image_id} is used by sandbox {user.id}")
            gone = conn.execute(
                delete(_IMAGES).where(_I.id == image_id).returning(_I.names, _I.digest)
            ).one_or_none()
            if gone is not None:
                data = {"names": list(gone.names), "digest": gone.digest}
                _emit(conn, EventType.IMAGE_REMOVED, image_id=image_id, data=data)
            rows = conn.execute(select(_IMAGES)).all()
        return [_record(ImageRecord, row) for row in rows]

    def _execs(self, sandbox_id: str, state: ExecState | None = None) -> list[ExecRecord]:
        query = select(_EXECS).where(_X.sandbox_id == sandbox_id)
        if state is not None:
            query = query.where(_X.state == state)
        return self._read(ExecRecord, query.order_by(_X.seq))

    def _read(self, kind: type[R], query: sa.Select[Any]) -> list[R]:
        with self._engine.connect() as conn:
            rows = conn.execute(query).all()
        return [_record(kind, row) for row in rows]


def _record(kind: type[R], row: sa.Row[Any]) -> R:
    """`row` as a record, detached and fully loaded, as a closed Session leaves one. The
    values go straight into the instance's dict, as the ORM's own loading does: the
    constructor would replay each one as a change event, at three times the cost."""
    record = sa.inspect(kind).class_manager.new_instance()
    record.__dict__.update(row._mapping)
    make_transient_to_detached(record)  # an identity key, every attribute unchanged
    return record


@contextlib.contextmanager
def _unique_name(name: str | None) -> Iterator[None]:
    """A name taken between the check and the write (the check ran in another process's view,
    or someone bypassed it): the UNIQUE constraint has the last word, as a Conflict."""
    try:
        yield
    except IntegrityError as exc:
        if "sandboxes.name" in str(exc.orig):
            raise Conflict(f"the name {name!r} is already in use") from exc
        raise


def _check_room(conn: Connection, name: str | None, max_live: int) -> None:
    """LimitReached at `max_live` live sandboxes (pooled ones aside), Conflict on a taken name."""
    live, name_taken = conn.execute(_ROOM, {"name": name}).one()
    if live >= max_live:
        raise LimitReached(f"the daemon is at its limit of {max_live} live sandboxes")
    if name_taken:
        raise Conflict(f"the name {name!r} is already in use")


def _lowest_free_address(conn: Connection, subnet: IPv4Network) -> str:
    """The lowest address of `subnet` that no record holds, past the network's own address
    and the bridge's (the first host); LimitReached when every one is taken."""
    held = set(conn.execute(_HELD_ADDRESSES).scalars())
    first, last = int(subnet.network_address) + 2, int(subnet.broadcast_address) - 1
    for number in range(first, last + 1):
        address = str(IPv4Address(number))
        if address not in held:
            return address
    raise LeasesHeld(f"every address of the bridge's subnet {subnet} is in use")


# -- events, written in the transaction of the change they tell of ---------------------------


def _emit(
    conn: Connection,
    type: EventType,
    *,
    sandbox_id: str | None = None,
    exec_id: str | None = None,
    image_id: str | None = None,
    data: Mapping[str, Any] | None = None,
) -> None:
    """Insert one event in the open transaction (of Store._write); it is published when that
    commits. Every TRIM_EVERY seqs, events past the last EVENTS_KEPT go in the same step."""
    now, fields = datetime.now(UTC), dict(data or {})
    values = {
        "time": now,
        "type": str(type),
        "sandbox_id": sandbox_id,
        "exec_id": exec_id,
        "image_id": image_id,
        "data": fields,
    }
    seq = conn.execute(_INSERT_EVENT, values).scalar_one()
    if seq % TRIM_EVERY == 0:
        conn.execute(_TRIM_EVENTS, {"below": seq - EVENTS_KEPT})
    event = Event(seq, now, type, sandbox_id, exec_id, image_id, fields)
    conn.info[_PENDING].append(event)


def _emit_sandbox(conn: Connection, type: EventType, row: sa.Row[Any], **data: Any) -> None:
    facts = {"name": row.name, "labels": row.spec.get("labels") or {}, "state": str(row.state)}
    _emit(conn, type, sandbox_id=row.id, data={**facts, **data})


def _announced(row: Any) -> bool:
    """Whether a sandbox being deleted was ever shown by an event: it ran, or it ended (a
    failed create kept as failed); not the pool's, nor one forgotten while creating."""
    if row.state in POOL_STATES:
        return False
    return any(x is not None for x in (row.started_at, row.finished_at, row.exit_reason))


def _emit_transition(conn: Connection, row: sa.Row[Any], oom_kills: int) -> None:
    """The event of a sandbox that reached row.state: running → created; exited → exited
    (expired when its ttl ended it); failed → failed; each OOM kill of its main cmd → oom."""
    if row.state in (LifecycleState.WARMING, LifecycleState.POOLED, LifecycleState.DESTROYING):
        return  # the pool's (nobody asked for it: nobody is told), or told when removing
    if row.state == LifecycleState.RUNNING:
        _emit_sandbox(conn, EventType.SANDBOX_CREATED, row)
        return
    exit_info = {
        "exit_code": row.exit_code,
        "signal": row.exit_signal,
        "reason": None if row.exit_reason is None else str(row.exit_reason),
        "message": row.exit_message,
    }
    if row.exit_reason == ExitReason.OOM:
        oom_kills = max(oom_kills, 1)
    for _ in range(min(oom_kills, _OOM_EVENTS_MAX)):
        _emit_sandbox(conn, EventType.SANDBOX_OOM, row, victim="main")
    if row.state == LifecycleState.FAILED:
        kind = EventType.SANDBOX_FAILED
    elif row.exit_reason == ExitReason.TTL_EXPIRED:
        kind = EventType.SANDBOX_EXPIRED
    else:
        kind = EventType.SANDBOX_EXITED
    _emit_sandbox(conn, kind, row, exit=exit_info)


# One report may count many kills (a fork bomb under a memory limit): at most this many events.
_OOM_EVENTS_MAX = 16


def _check_fields(fields: Mapping[str, Any]) -> None:
    unknown = set(fields) - _SETTABLE
    if unknown:
        raise TypeError(f"cannot set {', '.join(sorted(unknown))} of a sandbox this way")
