"""The warm pool's sandboxes and those being torn down as states, not flags: the pooled column
becomes the states warming (being built) and pooled (ready); expiring and destroying are new
values of the same column (daemon/lifecycle/states.py). States are plain strings: no CHECK
constraint to change.

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-05
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0007"
down_revision: str | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # A pooled row still being built is warming, a running one pooled; one that ended while
    # pooled (its record about to be forgotten) is forgotten at the next start as destroying.
    op.execute(
        "UPDATE sandboxes SET state = CASE state WHEN 'creating' THEN 'warming' "
        "WHEN 'running' THEN 'pooled' ELSE 'destroying' END WHERE pooled"
    )
    # ALTER TABLE DROP COLUMN (SQLite 3.35 and later), not a batch: dropping the old sandboxes
    # table would cascade to every exec.
    op.drop_column("sandboxes", "pooled")


def downgrade() -> None:
    op.add_column(
        "sandboxes", sa.Column("pooled", sa.Boolean(), nullable=False, server_default=sa.false())
    )
    op.execute(
        "UPDATE sandboxes SET pooled = 1, state = CASE state WHEN 'warming' THEN 'creating' "
        "ELSE 'running' END WHERE state IN ('warming', 'pooled')"
    )
    # Being torn down: what the older daemon knew them as (their teardown then ends them as
    # that daemon does).
    op.execute(
        "UPDATE sandboxes SET state = CASE WHEN exit_reason IN ('setup_failed', "
        "'supervisor_lost') THEN 'failed' WHEN exit_reason IS NOT NULL THEN 'exited' "
        "WHEN started_at IS NOT NULL THEN 'running' ELSE 'creating' END "
        "WHERE state IN ('expiring', 'destroying')"
    )
