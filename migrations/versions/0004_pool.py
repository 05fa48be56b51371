"""Pooled sandboxes: started before anyone asked, hidden from the API until a create takes one.

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-29
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # ALTER TABLE ADD COLUMN, not a batch (copy, drop, rename): dropping the old sandboxes
    # table would cascade to every exec. Rows stored before this were asked for: not pooled.
    op.add_column(
        "sandboxes", sa.Column("pooled", sa.Boolean(), nullable=False, server_default=sa.false())
    )


def downgrade() -> None:
    op.drop_column("sandboxes", "pooled")  # ALTER TABLE DROP COLUMN: SQLite 3.35 and later
