"""Alembic's entry point: runs migrations on the connection daemon.store.database.migrate hands
over.

Run only through `daemon.store.database.migrate` (or `sandboxd migrate`), which opens the database
with
the daemon's pragmas and passes the connection in `config.attributes["connection"]`. There is
deliberately no logging setup here (no fileConfig): the daemon owns its logging.
"""

from __future__ import annotations

from alembic import context
from sqlalchemy.engine import Connection

from daemon.store.database import Base

connection = context.config.attributes.get("connection")
if not isinstance(connection, Connection):
    raise RuntimeError(
        "run migrations through daemon.store.database.migrate(), which supplies the connection"
    )

context.configure(
    connection=connection,
    target_metadata=Base.metadata,
    # SQLite alters a table by copying it; batch mode lets later migrations do that.
    render_as_batch=True,
    # The store turns off sqlite3's own transaction handling and emits BEGIN itself, so DDL
    # is transactional: a migration that fails half-way leaves the schema as it was.
    transactional_ddl=True,
)
with context.begin_transaction():
    context.run_migrations()
