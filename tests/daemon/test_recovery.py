"""The preflight's verdicts on a real state directory, and what is kept beside a sandbox."""

from __future__ import annotations

import fcntl
import os
import secrets
from datetime import UTC, datetime
from pathlib import Path

import pytest

from daemon.config import Config, ConfigError
from daemon.lifecycle import claims, recovery
from daemon.lifecycle.recovery import RecoveryNeeded, preflight, read_generation, trusted
from daemon.store.database import DatabaseFound, Store


@pytest.fixture
def config(tmp_path: Path) -> Config:
    # A cgroup name of its own: no cgroup of it exists, so only the directories count.
    name = f"sandboxd-unit-{secrets.token_hex(4)}"
    return Config(state_dir=tmp_path / "state", run_dir=tmp_path / "run", cgroup_name=name)


def database(config: Config) -> Path:
    return config.state_dir / recovery.DATABASE


def started(config: Config) -> str:
    """A state directory as a daemon leaves it: a database, and its generation claimed."""
    store = Store(database(config))
    generation = store.generation()
    store.close()
    recovery.claim(config.state_dir, generation)
    return generation


def a_sandbox_on_disk(config: Config, sandbox_id: str = "sb_0123456789abcdef") -> None:
    (config.state_dir / "sandboxes" / sandbox_id / "layers").mkdir(parents=True)


@pytest.mark.parametrize(
    ("found", "claimed", "expected"),
    [
        (DatabaseFound("marked", "g1"), "g1", True),
        (DatabaseFound("marked", "g1"), None, True),  # a first start, or `sandboxd migrate`
        (DatabaseFound("unmarked"), None, True),  # an upgrade from before migration 0005
        (DatabaseFound("marked", "g1"), "g2", False),  # another directory's
        (DatabaseFound("marked", "g1"), "recovering", False),  # a recover cut short
        (DatabaseFound("unmarked"), "g1", False),
        (DatabaseFound("missing"), None, False),
        (DatabaseFound("empty"), "g1", False),
        (DatabaseFound("damaged", detail="file is not a database"), "g1", False),
    ],
)
def test_which_databases_are_trusted(found: DatabaseFound, claimed: str, expected: bool) -> None:
    assert trusted(found, claimed) is expected


def test_a_sound_database_is_served_untouched(config: Config) -> None:
    generation = started(config)
    a_sandbox_on_disk(config)
    preflight(config)
    assert read_generation(config.state_dir) == generation
    assert not list(config.state_dir.glob("*.damaged-*"))


@pytest.mark.parametrize("damage", ["truncate", "delete", "garbage", "foreign"])
def test_a_bad_database_with_a_sandbox_on_disk_is_refused(config: Config, damage: str) -> None:
    generation = started(config)
    a_sandbox_on_disk(config, "sb_fedcba9876543210")
    db = database(config)
    if damage == "truncate":
        db.write_bytes(b"")
    elif damage == "delete":
        db.unlink()
    elif damage == "garbage":
        db.write_bytes(b"garbage " * 512)
    else:
        db.unlink()
        Store(db).close()  # a database of another generation
    before = db.read_bytes() if db.exists() else None

    with pytest.raises(RecoveryNeeded) as refused:
        preflight(config)
    assert "sb_fedcba9876543210" in str(refused.value)
    assert "sandboxd recover --adopt" in str(refused.value)
    assert (db.read_bytes() if db.exists() else None) == before  # nothing changed
    assert read_generation(config.state_dir) == generation


def test_a_bad_database_with_nothing_on_disk_is_set_aside(config: Config) -> None:
    started(config)
    database(config).write_bytes(b"garbage " * 512)
    preflight(config)
    aside = list(config.state_dir.glob("sandboxd.db.damaged-*"))
    assert [p.read_bytes() for p in aside if not p.name.endswith(("-wal", "-shm"))] == [
        b"garbage " * 512
    ]
    assert not database(config).exists() and read_generation(config.state_dir) is None


def test_the_state_directory_is_locked(config: Config) -> None:
    config.state_dir.mkdir(parents=True, exist_ok=True)
    other = os.open(config.state_dir / "sandboxd.lock", os.O_RDWR | os.O_CREAT, 0o600)
    fcntl.flock(other, fcntl.LOCK_EX)  # as another process would hold it
    with pytest.raises(ConfigError, match="another sandboxd process"):
        recovery.lock(config.state_dir)
    os.close(other)
    held = recovery.lock(config.state_dir)
    assert recovery.lock(config.state_dir) == held  # this process holds it already
    claims.unlock(config.state_dir)


def test_what_is_kept_rebuilds_the_record(config: Config) -> None:
    store = Store(database(config))
    now = datetime.now(UTC)
    record = store.create_sandbox(
        id="sb_1", name="one", hostname="one", spec={"cmd": ["sleep", "1"]}, max_live=10,
        now=now, expires_at=None,
    )  # fmt: skip
    directory = config.state_dir / "sandboxes" / "sb_1"
    directory.mkdir(parents=True)
    recovery.keep(directory, record, store.generation())
    kept = recovery.read_kept(directory)
    assert kept is not None and kept["generation"] == store.generation()
    assert (directory / recovery.KEPT_FILE).stat().st_mode & 0o777 == 0o600
    fields = recovery._fields(kept)
    assert fields["created_at"] == now and fields["spec"] == {"cmd": ["sleep", "1"]}
    store.close()
