"""The store against a real SQLite file: pragmas, migration, constraints, lifecycle, execs."""

from __future__ import annotations

import logging
import os
import sqlite3
import stat
import subprocess
import sys
import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta, timezone
from ipaddress import IPv4Network
from pathlib import Path
from typing import Any

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.config import Config
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import create_engine, inspect
from sqlalchemy.exc import IntegrityError, OperationalError

import daemon.store.database
import migrations
from daemon.config import ConfigError
from daemon.errors import Conflict, InvalidTransition, LimitReached, NotFound
from daemon.lifecycle.states import ExecState, ExitReason, LifecycleState
from daemon.store.database import Base, ImageRecord, Store, migrate

T0 = datetime(2025, 1, 2, 3, 4, 5, 678901, tzinfo=UTC)


@pytest.fixture
def db(tmp_path: Path) -> Path:
    return tmp_path / "state" / "sandboxd.db"


@pytest.fixture
def store(db: Path) -> Iterator[Store]:
    store = Store(db)
    yield store
    store.close()


def forget(store: Store, id: str) -> None:
    """Delete a record as the teardown does: marked destroying, then removing."""
    store.transition(id, LifecycleState.DESTROYING)
    store.remove_sandbox(id)
    store.delete_sandbox(id)


def create(store: Store, id: str, name: str | None = None, **kwargs: Any) -> Any:
    args: dict[str, Any] = {
        "hostname": name or id,
        "spec": {"labels": {}},
        "max_live": 100,
        "now": T0,
        "expires_at": None,
    }
    args.update(kwargs)
    return store.create_sandbox(id=id, name=name, **args)


def finished(**fields: Any) -> dict[str, Any]:
    """The arguments of finish_exec for a plain exit, with `fields` changed."""
    result: dict[str, Any] = {
        "exit_code": 0,
        "signal": None,
        "timed_out": False,
        "stdout": b"",
        "stderr": b"",
        "stdout_truncated": False,
        "stderr_truncated": False,
        "finished_at": T0,
    }
    return result | fields


def raw(db: Path, sql: str, *params: Any) -> list[tuple[Any, ...]]:
    """Query the file directly with sqlite3, bypassing the store's engine."""
    with sqlite3.connect(db) as conn:
        return conn.execute(sql, params).fetchall()


# The database file.


def test_pragmas_are_on_for_every_connection(store: Store) -> None:
    for _ in range(3):  # several pooled connections, not just the first
        with store._engine.connect() as conn:
            pragma = conn.exec_driver_sql
            assert pragma("PRAGMA journal_mode").scalar() == "wal"
            assert pragma("PRAGMA foreign_keys").scalar() == 1
            assert pragma("PRAGMA synchronous").scalar() == 1  # NORMAL
            assert pragma("PRAGMA busy_timeout").scalar() == 5000


def test_database_file_is_private(db: Path) -> None:
    old = os.umask(0)  # the mode must not depend on the daemon's umask
    try:
        store = Store(db)
        create(store, "a")
        files = [db, db.with_name(db.name + "-wal"), db.with_name(db.name + "-shm")]
        for path in files:
            assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
        store.close()
    finally:
        os.umask(old)


def test_existing_database_file_is_made_private(db: Path) -> None:
    db.parent.mkdir()
    db.touch(mode=0o644)
    os.chmod(db, 0o644)
    Store(db).close()
    assert stat.S_IMODE(db.stat().st_mode) == 0o600


def test_a_writer_without_the_lock_fails_whole_and_readers_go_on(store: Store, db: Path) -> None:
    create(store, "a")
    with store._engine.connect() as conn:  # the pool's one connection, reused by the calls below
        conn.exec_driver_sql("PRAGMA busy_timeout=50")
    holder = sqlite3.connect(db, isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")  # another writer, e.g. another process's, holds the lock
    try:
        with pytest.raises(OperationalError, match="database is locked"):
            store.update_sandbox("a", pid=1)  # refused at its BEGIN, as SQLAlchemy reports it
        assert store.get_sandbox("a").pid is None  # WAL: a reader does not wait for a writer
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    assert store.update_sandbox("a", pid=1).pid == 1


# The schema.


def test_migration_matches_the_models(db: Path) -> None:
    migrate(db)
    engine = create_engine(f"sqlite:///{db}")
    with engine.connect() as conn:
        assert compare_metadata(MigrationContext.configure(conn), Base.metadata) == []
        # One line of history (get_current_head refuses two heads), and the file is at its end.
        assert MigrationContext.configure(conn).get_current_revision() == migration_head()
    engine.dispose()


def alembic_config() -> Config:
    config = Config()
    config.set_main_option("script_location", str(Path(migrations.__file__).parent))
    return config


def migration_head() -> str | None:
    return ScriptDirectory.from_config(alembic_config()).get_current_head()


def migrated_to(db: Path, revision: str) -> None:
    """A new database at an older `revision` of the schema, as an older daemon left it."""
    db.parent.mkdir(parents=True, exist_ok=True)
    config = alembic_config()
    engine = create_engine(f"sqlite:///{db}")
    with engine.begin() as conn:
        config.attributes["connection"] = conn
        command.upgrade(config, revision)
    engine.dispose()


def test_a_database_of_the_first_schema_is_migrated(db: Path) -> None:
    """A database made before execs knew of OOM kills keeps its execs, as not OOM-killed."""
    migrated_to(db, "0001")
    engine = create_engine(f"sqlite:///{db}")
    with engine.begin() as conn:
        conn.exec_driver_sql(
            "INSERT INTO sandboxes (id, seq, state, hostname, spec, created_at) "
            "VALUES ('sb_1', 1, 'running', 'h', '{}', '2025-01-01 00:00:00')"
        )
        conn.exec_driver_sql(
            "INSERT INTO execs (id, seq, sandbox_id, cmd, state, timed_out, stdout, stderr, "
            "stdout_truncated, stderr_truncated, started_at) "
            "VALUES ('ex_1', 1, 'sb_1', '[]', 'exited', 0, 'old', '', 0, 0, '2025-01-01 00:00:00')"
        )
    engine.dispose()
    store = Store(db)
    old = store.get_exec("sb_1", "ex_1")
    assert (old.stdout, old.oom_killed, old.encoding) == (b"old", False, "utf-8")


def test_a_0001_database_with_sandboxes_upgrades(db: Path) -> None:
    migrated_to(db, "0001")
    raw(
        db,
        "INSERT INTO sandboxes (id, seq, state, hostname, spec, created_at) "
        "VALUES ('old', 1, 'running', 'old', '{}', '2025-01-01 00:00:00')",
    )
    store = Store(db)
    assert store.get_sandbox("old").ip is None
    assert create(store, "new", subnet=IPv4Network("10.9.0.0/24")).ip == "10.9.0.2"
    store.close()


def test_the_newest_revision_read_as_text_is_alembics_head() -> None:
    assert daemon.store.database.newest_revision() == migration_head()


def test_a_current_database_opens_without_loading_alembic(db: Path) -> None:
    """Alembic is 9 MiB of the daemon's memory: loaded only when there is a migration to run."""
    code = (
        "import sys; from pathlib import Path; from daemon.store.database import Store; "
        "Store(Path(sys.argv[1])).close(); print('alembic' in sys.modules)"
    )

    def opened(path: Path = db) -> str:
        return subprocess.run(
            [sys.executable, "-c", code, str(path)],
            cwd=Path(migrations.__file__).parent.parent,
            capture_output=True, text=True, check=True,
        ).stdout.strip()  # fmt: skip

    assert opened() == "True"  # a new database: Alembic makes its schema
    assert opened() == "False"  # now current
    older = db.parent / "older.db"
    migrated_to(older, "0009")
    assert opened(older) == "True"  # an older one: upgraded
    assert opened(older) == "False"


def test_migrate_apart_upgrades_in_a_child_and_says_why_it_could_not(db: Path) -> None:
    code = (
        "import sys; from pathlib import Path; import daemon.store.database as d; "
        "d.migrate_apart(Path(sys.argv[1])); print('alembic' in sys.modules)"
    )

    def apart(path: Path) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-c", code, str(path)],
            cwd=Path(migrations.__file__).parent.parent,
            capture_output=True, text=True, check=False,
        )  # fmt: skip

    assert apart(db).stdout.strip() == "False"  # a new database, made by the child
    assert raw(db, "SELECT version_num FROM alembic_version") == [(migration_head(),)]
    older = db.parent / "older.db"
    migrated_to(older, "0009")
    assert apart(older).stdout.strip() == "False"
    assert raw(older, "SELECT version_num FROM alembic_version") == [(migration_head(),)]
    raw(older, "UPDATE alembic_version SET version_num = 'ffff'")  # a newer daemon's
    with pytest.raises(daemon.store.database.MigrationFailed, match="ffff"):
        daemon.store.database.migrate_apart(older)


def test_migrate_twice_keeps_the_data(db: Path) -> None:
    store = Store(db)
    create(store, "a", "keep")
    store.close()
    migrate(db)
    store = Store(db)
    assert store.get_sandbox("keep").id == "a"
    store.close()


def test_migrate_leaves_logging_alone(db: Path) -> None:
    logger = logging.getLogger("sandboxd.test.existing")
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    migrate(db)
    assert not logger.disabled  # fileConfig would disable existing loggers
    assert root.handlers == handlers
    assert root.level == level


# Creating sandboxes.


def test_create_records_a_creating_sandbox(store: Store, db: Path) -> None:
    spec = {"labels": {"team": "ci"}, "cmd": ["sleep", "1"], "env": {"A": "b"}}
    record = create(store, "a", "web-1", spec=spec, expires_at=T0 + timedelta(seconds=30))
    assert record.state is LifecycleState.CREATING
    assert (record.name, record.hostname, record.spec) == ("web-1", "web-1", spec)
    assert record.pid is None and record.exit_reason is None
    assert raw(db, "SELECT id, state, name FROM sandboxes") == [("a", "creating", "web-1")]


def test_name_taken_is_a_conflict(store: Store, db: Path) -> None:
    create(store, "a", "web")
    store.transition("a", LifecycleState.FAILED)  # a dead sandbox still holds its name
    with pytest.raises(Conflict):
        create(store, "b", "web")
    assert raw(db, "SELECT id FROM sandboxes") == [("a",)]
    create(store, "c", None)
    create(store, "d", None)  # no name is not a name


def test_name_unique_in_the_database_too(store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    # Were the check fooled (another writer, a bug), the UNIQUE constraint still refuses.
    create(store, "a", "web")
    monkeypatch.setattr(daemon.store.database, "_check_room", lambda conn, name, max_live: None)
    with pytest.raises(Conflict):
        create(store, "b", "web")
    assert [r.id for r in store.list_sandboxes()] == ["a"]


def test_name_race_between_stores_has_one_winner(db: Path) -> None:
    stores = [Store(db) for _ in range(8)]
    barrier = threading.Barrier(len(stores))
    outcomes: list[str] = []

    def attempt(i: int) -> None:
        barrier.wait()
        try:
            create(stores[i], f"s{i}", "same")
            outcomes.append("created")
        except Conflict:
            outcomes.append("conflict")

    threads = [threading.Thread(target=attempt, args=(i,)) for i in range(len(stores))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(outcomes) == ["conflict"] * 7 + ["created"]
    assert len(stores[0].list_sandboxes()) == 1
    for store in stores:
        store.close()


def test_limit_counts_live_sandboxes_only(store: Store, db: Path) -> None:
    create(store, "a", max_live=2)
    create(store, "b", max_live=2)
    with pytest.raises(LimitReached):
        create(store, "c", max_live=2)
    assert len(raw(db, "SELECT id FROM sandboxes")) == 2
    store.transition("a", LifecycleState.RUNNING)
    with pytest.raises(LimitReached):
        create(store, "c", max_live=2)
    store.transition("a", LifecycleState.EXITED)
    create(store, "c", max_live=2)


def test_uid_slots_lowest_free_unique_and_reused(store: Store) -> None:
    slots = [create(store, id).uid_slot for id in "abcd"]
    assert slots == [0, 1, 2, 3]
    forget(store, "b")
    store.transition("c", LifecycleState.FAILED, uid_slot=None)  # released on death
    assert create(store, "e").uid_slot == 1
    assert create(store, "f").uid_slot == 2
    assert create(store, "g").uid_slot == 4
    with pytest.raises(IntegrityError):
        store.update_sandbox("g", uid_slot=0)  # the database refuses to share a slot
    assert store.get_sandbox("g").uid_slot == 4


def test_no_slot_past_the_last_even_while_dying_sandboxes_hold_theirs(
    store: Store, db: Path
) -> None:
    create(store, "a", slots=2)
    create(store, "b", slots=2)
    store.transition("a", LifecycleState.RUNNING)
    store.transition("a", LifecycleState.EXITED)  # ended, its slot not yet released
    with pytest.raises(LimitReached, match="uid ranges"):
        create(store, "c", slots=2)
    assert len(raw(db, "SELECT id FROM sandboxes")) == 2  # refused whole
    store.transition("b", LifecycleState.FAILED, uid_slot=None)
    assert create(store, "c", slots=2).uid_slot == 1


def test_addresses_lowest_free_unique_released_and_exhausted(store: Store) -> None:
    subnet = IPv4Network("10.9.0.0/29")  # .1 is the bridge's; .2 to .6 are for sandboxes
    assert create(store, "none").ip is None
    ips = [create(store, id, subnet=subnet).ip for id in "abcde"]
    assert ips == ["10.9.0.2", "10.9.0.3", "10.9.0.4", "10.9.0.5", "10.9.0.6"]
    with pytest.raises(LimitReached):
        create(store, "f", subnet=subnet)
    with pytest.raises(NotFound):
        store.get_sandbox("f")  # refused whole
    forget(store, "b")
    store.transition("d", LifecycleState.FAILED, ip=None)  # released on death
    assert create(store, "g", subnet=subnet).ip == "10.9.0.3"
    assert create(store, "h", subnet=subnet).ip == "10.9.0.5"
    with pytest.raises(IntegrityError):
        store.update_sandbox("h", ip="10.9.0.2")  # the database refuses to share an address
    assert store.get_sandbox("h").ip == "10.9.0.5"


def test_uid_slot_zero_and_gaps_are_taken_first(store: Store) -> None:
    for id in "abcde":
        create(store, id)  # slots 0 to 4
    forget(store, "a")
    store.transition("c", LifecycleState.FAILED, uid_slot=None)
    forget(store, "e")
    assert [create(store, id).uid_slot for id in "fghi"] == [0, 2, 4, 5]
    assert create(store, "j", "named").uid_slot == 6


# Reading sandboxes.


def test_get_by_id_then_by_name(store: Store) -> None:
    create(store, "id-1", "alpha")
    create(store, "alpha-id", "id-1")  # a name that is another sandbox's id
    assert store.get_sandbox("id-1").id == "id-1"
    assert store.get_sandbox("alpha").id == "id-1"
    with pytest.raises(NotFound):
        store.get_sandbox("nope")


def test_records_are_detached_and_fully_loaded(store: Store) -> None:
    # The service reads them after the store is done: no attribute may need a session or a query.
    records: list[Any] = [
        create(store, "a", "web"),
        store.transition("a", LifecycleState.RUNNING, pid=1),
        store.update_sandbox("a", base_dir="/b"),
        store.update_sandbox("a"),
        store.get_sandbox("a"),
        store.get_sandbox("web"),
        *store.list_sandboxes(),
        store.insert_exec(id="e1", sandbox_id="a", cmd=["x"], now=T0),
        store.finish_exec("e1", **finished(stdout=b"out")),
        store.finish_exec("e1", **finished(stdout=b"again")),
        store.get_exec("a", "e1"),
        *store.list_execs("a"),
    ]
    for record in records:
        state = inspect(record)
        assert state.detached and not state.unloaded and not state.modified, record
    assert (records[-1].stdout, records[2].base_dir, records[2].pid) == (b"out", "/b", 1)


def test_list_oldest_first_with_filters(store: Store) -> None:
    # Creation order, not the clock: the clock may step back between two creations.
    create(store, "c", spec={"labels": {"team": "ci", "tier": "1"}}, now=T0)
    create(store, "a", spec={"labels": {"team": "ci"}}, now=T0 - timedelta(hours=1))
    create(store, "b", spec={}, now=T0 + timedelta(hours=1))
    store.transition("a", LifecycleState.RUNNING)
    store.transition("b", LifecycleState.RUNNING)
    store.transition("b", LifecycleState.EXITED)

    def ids(*states: LifecycleState, **labels: str) -> list[str]:
        return [r.id for r in store.list_sandboxes(states, labels)]

    assert ids() == ["c", "a", "b"]
    assert ids(LifecycleState.RUNNING) == ["a"]
    assert ids(LifecycleState.RUNNING, LifecycleState.EXITED) == ["a", "b"]
    assert ids(team="ci") == ["c", "a"]
    assert ids(team="ci", tier="1") == ["c"]
    assert ids(team="ci", tier="2") == []
    assert ids(LifecycleState.EXITED, team="ci") == []
    assert [r.id for r in store.live_sandboxes()] == ["c", "a"]
    assert store.count_sandboxes() == (1, 3)


def test_timestamps_come_back_aware_utc(store: Store, db: Path) -> None:
    paris = timezone(timedelta(hours=1))
    create(store, "a", now=T0, expires_at=T0.astimezone(paris) + timedelta(minutes=5))
    store.transition("a", LifecycleState.RUNNING, started_at=T0.astimezone(paris))
    store.close()
    record = Store(db).get_sandbox("a")
    assert record.created_at == T0 and record.created_at.tzinfo is UTC
    assert record.started_at == T0 and record.started_at.utcoffset() == timedelta(0)
    assert record.expires_at == T0 + timedelta(minutes=5)
    assert record.expires_at is not None and record.expires_at.tzinfo is UTC
    assert record.finished_at is None


def test_naive_timestamps_are_refused(store: Store) -> None:
    with pytest.raises(Exception, match="naive datetime"):
        create(store, "a", now=datetime(2025, 1, 1))
    assert store.list_sandboxes() == []


# The lifecycle.


def test_transitions_are_persisted(store: Store, db: Path) -> None:
    create(store, "a")
    running = store.transition(
        "a", LifecycleState.RUNNING, pid=4242, pid_start=987654, started_at=T0, base_dir="/b"
    )
    assert (running.state, running.pid, running.pid_start) == (LifecycleState.RUNNING, 4242, 987654)
    store.transition(
        "a",
        LifecycleState.EXITED,
        pid=None,
        uid_slot=None,
        finished_at=T0 + timedelta(seconds=1),
        exit_code=None,
        exit_signal="SIGKILL",
        exit_reason=ExitReason.SIGNALED,
        exit_message="killed",
    )
    store.close()
    record = Store(db).get_sandbox("a")
    assert record.state is LifecycleState.EXITED
    assert record.exit_reason is ExitReason.SIGNALED
    assert (record.pid, record.uid_slot, record.exit_signal) == (None, None, "SIGKILL")
    assert (record.pid_start, record.base_dir, record.exit_message) == (987654, "/b", "killed")
    assert raw(db, "SELECT state, exit_reason FROM sandboxes") == [("exited", "signaled")]


@pytest.mark.parametrize(
    ("path", "target"),
    [
        ([LifecycleState.RUNNING], LifecycleState.CREATING),
        ([LifecycleState.RUNNING], LifecycleState.RUNNING),
        ([LifecycleState.RUNNING, LifecycleState.EXITED], LifecycleState.RUNNING),
        ([LifecycleState.FAILED], LifecycleState.EXITED),
    ],
)
def test_invalid_transition_changes_nothing(
    store: Store, db: Path, path: list[LifecycleState], target: LifecycleState
) -> None:
    create(store, "a")
    for state in path:
        store.transition("a", state, pid=1)
    before = raw(db, "SELECT * FROM sandboxes")
    with pytest.raises(InvalidTransition):
        store.transition("a", target, pid=99, exit_code=3)
    assert raw(db, "SELECT * FROM sandboxes") == before
    assert store.get_sandbox("a").pid == 1


def test_fields_are_checked(store: Store) -> None:
    create(store, "a")
    with pytest.raises(TypeError):
        store.update_sandbox("a", state=LifecycleState.RUNNING)  # only by transition
    with pytest.raises(TypeError):
        store.transition("a", LifecycleState.RUNNING, no_such_field=1)
    assert store.get_sandbox("a").state is LifecycleState.CREATING
    assert store.update_sandbox("a", ip="10.0.0.2").ip == "10.0.0.2"
    assert store.update_sandbox("a").ip == "10.0.0.2"  # nothing to set: read back as it is
    with pytest.raises(NotFound):
        store.update_sandbox("nope", ip="10.0.0.3")
    with pytest.raises(NotFound):
        store.update_sandbox("nope")
    with pytest.raises(NotFound):
        store.transition("nope", LifecycleState.RUNNING)


def test_delete_takes_the_execs_with_it(store: Store, db: Path) -> None:
    create(store, "a")
    create(store, "b")
    store.insert_exec(id="e1", sandbox_id="a", cmd=["true"], now=T0)
    store.insert_exec(id="e2", sandbox_id="a", cmd=["true"], now=T0)
    store.insert_exec(id="e3", sandbox_id="b", cmd=["true"], now=T0)
    forget(store, "a")
    assert raw(db, "SELECT id FROM execs WHERE sandbox_id = 'a'") == []
    assert raw(db, "SELECT id FROM execs") == [("e3",)]
    with pytest.raises(NotFound):
        store.get_sandbox("a")
    with pytest.raises(NotFound):
        forget(store, "a")


# The warm pool.


def pooled(store: Store, id: str) -> Any:
    """A pooled sandbox, running, as the pool leaves one."""
    create(store, id, pooled=True, max_live=0)  # the limit is not for the pool's
    return store.transition(id, LifecycleState.POOLED, pid=1)


def test_pooled_sandboxes_are_hidden_but_adopted(store: Store) -> None:
    create(store, "a")
    record = pooled(store, "p")
    assert record.pooled and record.uid_slot == 1
    with pytest.raises(NotFound):
        store.get_sandbox("p")
    assert store.get_sandbox("p", pooled_too=True).id == "p"
    assert [r.id for r in store.list_sandboxes()] == ["a"]
    assert [r.id for r in store.list_sandboxes(pooled_too=True)] == ["a", "p"]
    assert [r.id for r in store.live_sandboxes()] == ["a", "p"]
    assert store.count_sandboxes() == (0, 1)
    create(store, "b", max_live=2)  # the pooled one does not count towards the limit


def test_take_pooled_makes_it_the_newest_asked_for(store: Store) -> None:
    pooled(store, "p")
    create(store, "a")
    spec = {"labels": {"team": "ci"}}
    later = T0 + timedelta(minutes=1)
    taken = store.take_pooled(
        "p", name="web", hostname="web", spec=spec, max_live=2, now=later, expires_at=later
    )
    assert inspect(taken).detached and not inspect(taken).unloaded
    assert (taken.pooled, taken.state, taken.pid) == (False, LifecycleState.RUNNING, 1)
    assert (taken.name, taken.hostname, taken.spec) == ("web", "web", spec)
    assert taken.created_at == taken.started_at == taken.expires_at == later
    assert [r.id for r in store.list_sandboxes()] == ["a", "p"]  # the newest
    assert store.get_sandbox("web").seq > store.get_sandbox("a").seq
    assert store.count_sandboxes() == (1, 2)


def test_take_pooled_refusals_change_nothing(store: Store, db: Path) -> None:
    create(store, "a", "web")
    pooled(store, "p")
    create(store, "q", pooled=True)  # pooled, but not running yet
    before = raw(db, "SELECT * FROM sandboxes ORDER BY id")

    def take(sandbox_id: str, name: str | None = None, max_live: int = 10) -> Any:
        return store.take_pooled(
            sandbox_id, name=name, hostname="h", spec={}, max_live=max_live, now=T0, expires_at=None
        )

    with pytest.raises(Conflict):
        take("p", name="web")
    with pytest.raises(LimitReached):
        take("p", max_live=1)
    for sandbox_id in ("a", "q", "nope"):
        with pytest.raises(NotFound):
            take(sandbox_id)
    assert raw(db, "SELECT * FROM sandboxes ORDER BY id") == before
    take("p")
    with pytest.raises(NotFound):
        take("p")  # taken already


# Execs.


def test_exec_lifecycle(store: Store, db: Path) -> None:
    create(store, "a")
    record = store.insert_exec(id="e1", sandbox_id="a", cmd=["sh", "-c", "echo hi"], now=T0)
    assert (record.state, record.pid, record.cmd[2]) == (ExecState.RUNNING, None, "echo hi")
    assert (record.stdout, record.timed_out, record.stdout_truncated) == (b"", False, False)
    assert record.exit_code is None and record.finished_at is None
    store.set_exec_pid("e1", 7)
    assert store.get_exec("a", "e1").pid == 7
    done = store.finish_exec(
        "e1",
        **finished(stdout=b"hi\n", stderr_truncated=True, finished_at=T0 + timedelta(seconds=1)),
    )
    assert (done.state, done.pid) == (ExecState.EXITED, 7)  # no pid given: the stored one stays
    store.close()
    again = Store(db).get_exec("a", "e1")
    assert (again.exit_code, again.stdout, again.stderr_truncated) == (0, b"hi\n", True)
    assert again.finished_at == T0 + timedelta(seconds=1) and again.started_at.tzinfo is UTC


def test_finish_exec_first_result_wins(store: Store) -> None:
    create(store, "a")
    store.insert_exec(id="e1", sandbox_id="a", cmd=["x"], now=T0)
    killed = finished(exit_code=None, signal="SIGKILL", timed_out=True, stdout=b"first")
    first = store.finish_exec("e1", **killed, pid=5)
    later = finished(stdout=b"second", finished_at=T0 + timedelta(1))
    second = store.finish_exec("e1", **later, pid=6)
    for record in (second, store.get_exec("a", "e1")):
        assert (record.exit_code, record.signal, record.timed_out) == (None, "SIGKILL", True)
        assert (record.stdout, record.finished_at, record.pid) == (b"first", first.finished_at, 5)


def test_exec_lookups(store: Store) -> None:
    create(store, "a")
    create(store, "b")
    for exec_id in ("e3", "e1", "e2"):  # ids say nothing of order
        store.insert_exec(id=exec_id, sandbox_id="a", cmd=["x"], now=T0)
    store.insert_exec(id="f1", sandbox_id="b", cmd=["x"], now=T0)
    store.finish_exec("e1", **finished())
    assert [e.id for e in store.list_execs("a")] == ["e3", "e1", "e2"]
    assert [e.id for e in store.running_execs("a")] == ["e3", "e2"]
    assert [e.id for e in store.list_execs("b")] == ["f1"]
    with pytest.raises(NotFound):
        store.get_exec("b", "e1")  # exists, but in another sandbox
    with pytest.raises(NotFound):
        store.get_exec("a", "nope")
    with pytest.raises(NotFound):
        store.set_exec_pid("nope", 1)
    with pytest.raises(NotFound):
        store.finish_exec("nope", **finished())
    with pytest.raises(NotFound):
        store.insert_exec(id="g1", sandbox_id="nope", cmd=["x"], now=T0)


def test_concurrent_execs_get_distinct_seqs(db: Path) -> None:
    stores = [Store(db) for _ in range(6)]
    create(stores[0], "a")
    barrier = threading.Barrier(len(stores))

    def insert(i: int) -> None:
        barrier.wait()
        for n in range(20):
            stores[i].insert_exec(id=f"e{i}-{n}", sandbox_id="a", cmd=["x"], now=T0)

    threads = [threading.Thread(target=insert, args=(i,)) for i in range(len(stores))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert raw(db, "SELECT seq FROM execs ORDER BY seq") == [(n,) for n in range(1, 121)]
    for store in stores:
        store.close()


def test_an_sqlite_without_returning_is_refused_at_start(
    db: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sqlite3, "sqlite_version_info", (3, 34, 1))
    with pytest.raises(ConfigError, match=r"too old: sandboxd needs 3\.35\.0"):
        Store(db)
    assert not db.exists()  # refused before anything was made


# The generation and what the preflight reads (daemon/lifecycle/recovery.py).


def test_a_database_has_one_generation_that_migrating_keeps(db: Path) -> None:
    store = Store(db)
    generation = store.generation()
    store.close()
    migrate(db)
    store = Store(db)
    assert store.generation() == generation and len(generation) == 32
    store.close()
    assert Store(db.with_name("other.db")).generation() != generation


def test_a_0004_database_gets_a_generation(db: Path) -> None:
    migrated_to(db, "0004")
    assert daemon.store.database.inspect_database(db).kind == "unmarked"
    generation = Store(db).generation()
    assert daemon.store.database.inspect_database(db) == daemon.store.database.DatabaseFound(
        "marked", generation
    )


def test_inspect_database_tells_each_kind_and_changes_nothing(db: Path) -> None:
    inspect = daemon.store.database.inspect_database
    assert inspect(db).kind == "missing"
    db.parent.mkdir()
    db.touch()
    assert inspect(db).kind == "empty"
    db.write_bytes(b"garbage " * 512)
    damaged = inspect(db)
    assert damaged.kind == "damaged" and "not a database" in damaged.detail
    assert db.read_bytes() == b"garbage " * 512
    db.unlink()
    sqlite3.connect(db).execute("CREATE TABLE unrelated (x)").connection.close()
    assert inspect(db) == daemon.store.database.DatabaseFound("empty", detail="no tables")


def test_restore_sandbox_records_it_running_as_the_newest(store: Store) -> None:
    create(store, "a", "first")
    fields: dict[str, Any] = {
        "id": "b", "name": "back", "hostname": "back", "spec": {"labels": {}}, "uid_slot": 7,
        "ip": "10.9.0.9", "pid": 123, "pid_start": 456, "base_dir": None, "created_at": T0,
        "started_at": T0, "expires_at": None, "pooled": False,
    }  # fmt: skip
    record = store.restore_sandbox(**fields)
    assert (record.state, record.uid_slot, record.ip, record.pid) == ("running", 7, "10.9.0.9", 123)
    assert [r.id for r in store.list_sandboxes()] == ["a", "b"]
    with pytest.raises(Conflict):  # the uid slot is held
        store.restore_sandbox(**fields | {"id": "c", "name": None, "ip": None})
    with pytest.raises(TypeError):
        store.restore_sandbox(**fields | {"id": "d", "exit_cod": 1})
    assert [r.id for r in store.list_sandboxes()] == ["a", "b"]


# States, not flags (migration 0007).


def test_a_0006_database_gets_its_pooled_rows_as_states(db: Path) -> None:
    migrated_to(db, "0006")
    for id, state, pooled in [
        ("asked", "running", 0),
        ("warm", "creating", 1),
        ("ready", "running", 1),
        ("ended", "exited", 1),
    ]:
        raw(
            db,
            "INSERT INTO sandboxes (id, seq, state, hostname, spec, created_at, pooled) "
            f"VALUES ('{id}', (SELECT count(*) + 1 FROM sandboxes), '{state}', 'h', '{{}}', "
            f"'2025-01-01 00:00:00', {pooled})",
        )
    store = Store(db)
    states = {r.id: (r.state, r.pooled) for r in store.list_sandboxes(pooled_too=True)}
    assert states == {
        "asked": (LifecycleState.RUNNING, False),
        "warm": (LifecycleState.WARMING, True),
        "ready": (LifecycleState.POOLED, True),
        "ended": (LifecycleState.DESTROYING, False),
    }
    assert [r.id for r in store.list_sandboxes()] == ["asked", "ended"]
    store.close()
    assert "pooled" not in {row[1] for row in raw(db, "PRAGMA table_info(sandboxes)")}


def test_a_record_the_api_shows_is_forgotten_only_once_marked(store: Store, db: Path) -> None:
    create(store, "a")
    store.transition("a", LifecycleState.RUNNING)
    before = raw(db, "SELECT * FROM sandboxes")
    with pytest.raises(InvalidTransition, match="forgotten while running"):
        store.delete_sandbox("a")
    assert raw(db, "SELECT * FROM sandboxes") == before
    store.transition("a", LifecycleState.DESTROYING)
    with pytest.raises(InvalidTransition, match="forgotten while destroying"):
        store.delete_sandbox("a")
    store.remove_sandbox("a")
    store.delete_sandbox("a")
    pooled(store, "p")
    store.delete_sandbox("p")  # nobody saw it: forgotten as it is
    assert raw(db, "SELECT id FROM sandboxes") == []


def test_ended_records_holding_leases_are_unreleased(store: Store) -> None:
    create(store, "a", subnet=IPv4Network("10.9.0.0/24"))
    create(store, "b")
    create(store, "c")
    for id in "abc":
        store.transition(id, LifecycleState.RUNNING)
    store.transition("a", LifecycleState.EXITED)
    store.transition("c", LifecycleState.FAILED)
    store.update_sandbox("c", uid_slot=None, ip=None)
    assert [r.id for r in store.unreleased_sandboxes()] == ["a"]


def test_a_removing_record_is_gone_for_the_api_but_holds_its_leases(store: Store) -> None:
    subnet = IPv4Network("10.9.0.0/24")
    image = ImageRecord(
        id="sha256:c", digest="sha256:m", names=[], layers=[], size=0, config={}, created_at=T0
    )
    store.save_image(image)
    create(store, "a", "named", subnet=subnet, max_live=1, image_id=image.id)
    store.transition("a", LifecycleState.RUNNING)
    store.transition("a", LifecycleState.DESTROYING)
    held = store.remove_sandbox("a")
    assert (held.state, held.name, held.uid_slot, held.ip) == ("removing", None, 0, "10.9.0.2")
    for ref in ("a", "named"):
        with pytest.raises(NotFound):
            store.get_sandbox(ref)
        with pytest.raises(NotFound):
            store.get_sandbox(ref, pooled_too=True)
    assert store.list_sandboxes() == [] and store.count_sandboxes() == (0, 0)
    assert store.count_by_state() == {}
    assert store.delete_image(image.id) == []  # nothing of it runs to use the image
    # Its name is free, and it does not count towards max_live; its uid slot and address
    # are not handed out till it is deleted.
    again = create(store, "b", "named", subnet=subnet, max_live=1)
    assert (again.uid_slot, again.ip) == (1, "10.9.0.3")
    assert [r.id for r in store.live_sandboxes()] == ["a", "b"]  # a restart finishes it
    store.delete_sandbox("a")
    assert create(store, "c", subnet=subnet).uid_slot == 0


def test_0007_downgrades_to_the_pooled_column(db: Path) -> None:
    store = Store(db)
    pooled(store, "p")
    create(store, "a")
    store.transition("a", LifecycleState.RUNNING)
    store.transition("a", LifecycleState.EXPIRING, exit_reason=ExitReason.TTL_EXPIRED)
    store.close()
    config = alembic_config()
    engine = create_engine(f"sqlite:///{db}")
    with engine.begin() as conn:
        config.attributes["connection"] = conn
        command.downgrade(config, "0006")
    engine.dispose()
    rows = raw(db, "SELECT id, state, pooled FROM sandboxes ORDER BY id")
    assert rows == [("a", "exited", 0), ("p", "running", 1)]


def test_execs_stored_as_text_become_their_utf8_bytes(db: Path) -> None:
    """Migration 0008: output an older daemon stored as text reads back as that text's UTF-8
    bytes, in the utf-8 encoding; new output is stored as the bytes written."""
    migrated_to(db, "0006")
    raw(
        db,
        "INSERT INTO sandboxes (id, seq, state, hostname, spec, created_at) "
        "VALUES ('sb_1', 1, 'running', 'h', '{}', '2025-01-01 00:00:00')",
    )
    raw(
        db,
        "INSERT INTO execs (id, seq, sandbox_id, cmd, state, timed_out, stdout, stderr, "
        "stdout_truncated, stderr_truncated, oom_killed, started_at) VALUES ('ex_1', 1, 'sb_1', "
        "'[]', 'exited', 0, 'h\u00e9\ufffd', 'err', 0, 0, 0, '2025-01-01 00:00:00')",
    )
    store = Store(db)
    old = store.get_exec("sb_1", "ex_1")
    assert (old.stdout, old.stderr, old.encoding) == ("hé\ufffd".encode(), b"err", "utf-8")
    assert b"".join(store.exec_output("ex_1", "stdout")) == "hé\ufffd".encode()
    store.insert_exec(id="ex_2", sandbox_id="sb_1", cmd=["x"], now=T0, encoding="base64")
    big = bytes(range(256)) * 1000  # several pieces of the blob reader
    store.finish_exec("ex_2", **finished(stdout=big, stderr=b"\xff"))
    assert b"".join(store.exec_output("ex_2", "stdout")) == big
    assert b"".join(store.exec_output("ex_2", "stderr")) == b"\xff"
    assert store.get_exec("sb_1", "ex_2").encoding == "base64"
    assert list(store.exec_output("ex_nope", "stdout")) == []
    store.insert_exec(id="ex_3", sandbox_id="sb_1", cmd=["x"], now=T0)  # running: nothing yet
    assert list(store.exec_output("ex_3", "stdout")) == []
    store.close()
