"""Address leases: no two sandboxes may hold the same address on the bridge.

`sandboxes.ip` has been there since 0001; a unique index makes it a lease (NULLs, the
sandboxes without one, do not collide in SQLite).

Revision ID: 0002
Revises: 0001
Create Date: 2025-12-01
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_index("ix_sandboxes_ip", "sandboxes", ["ip"], unique=True)


def downgrade() -> None:
    op.drop_index("ix_sandboxes_ip", table_name="sandboxes")
