"""Execs remember whether the OOM killer ended them (`oom_killed`).

Revision ID: 0003
Revises: 0002
Create Date: 2025-11-30
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("execs") as batch:
        # Execs stored before this knew nothing of OOM kills: false.
        batch.add_column(
            sa.Column("oom_killed", sa.Boolean(), nullable=False, server_default=sa.false())
        )


def downgrade() -> None:
    with op.batch_alter_table("execs") as batch:
        batch.drop_column("oom_killed")
