"""The database's generation: a random id made with it, which the files it keeps are marked with.

A database that is replaced (lost, emptied, restored from elsewhere) has another generation than
the files of the state directory, and the daemon then refuses to sweep what it finds there
(daemon/lifecycle/recovery.py). A database made before this migration gets a generation of its own
here.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-05
"""

from __future__ import annotations

import secrets
from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    meta = op.create_table(
        "meta",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("generation", sa.String(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_meta")),
    )
    op.bulk_insert(meta, [{"id": 1, "generation": secrets.token_hex(16)}])


def downgrade() -> None:
    op.drop_table("meta")
