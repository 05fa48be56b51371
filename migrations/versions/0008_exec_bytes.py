"""Execs keep their output as the bytes written (`stdout`, `stderr` as BLOBs) and the encoding
their client asked for (`encoding`).

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-05
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0008"
down_revision: str | None = "0007"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("execs") as batch:
        batch.alter_column("stdout", type_=sa.LargeBinary(), existing_type=sa.Text())
        batch.alter_column("stderr", type_=sa.LargeBinary(), existing_type=sa.Text())
        # Execs stored before this were all text.
        batch.add_column(sa.Column("encoding", sa.String(), nullable=False, server_default="utf-8"))
    # Output stored as text becomes its UTF-8 bytes (what was kept of it: the bytes that had
    # been replaced on decoding are gone).
    op.execute("UPDATE execs SET stdout = CAST(stdout AS BLOB), stderr = CAST(stderr AS BLOB)")


def downgrade() -> None:
    op.execute("UPDATE execs SET stdout = CAST(stdout AS TEXT), stderr = CAST(stderr AS TEXT)")
    with op.batch_alter_table("execs") as batch:
        batch.drop_column("encoding")
        batch.alter_column("stdout", type_=sa.Text(), existing_type=sa.LargeBinary())
        batch.alter_column("stderr", type_=sa.Text(), existing_type=sa.LargeBinary())
