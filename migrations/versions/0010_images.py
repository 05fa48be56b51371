"""Images: the image table, and which image each sandbox was made from.

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-05
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0010"
down_revision: str | None = "0009"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "images",
        sa.Column("id", sa.String(), nullable=False),
        sa.Column("digest", sa.String(), nullable=False),
        sa.Column("names", sa.JSON(), nullable=False),
        sa.Column("layers", sa.JSON(), nullable=False),
        sa.Column("size", sa.Integer(), nullable=False),
        sa.Column("config", sa.JSON(), nullable=False),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_images")),
    )
    op.create_index(op.f("ix_images_digest"), "images", ["digest"], unique=False)
    # ALTER TABLE ADD COLUMN, not a batch (copy, drop, rename): dropping the old sandboxes
    # table would cascade to every exec. Rows stored before this were made from no image.
    op.add_column("sandboxes", sa.Column("image_id", sa.String(), nullable=True))
    op.create_index(op.f("ix_sandboxes_image_id"), "sandboxes", ["image_id"], unique=False)


def downgrade() -> None:
    op.drop_index(op.f("ix_sandboxes_image_id"), table_name="sandboxes")
    op.drop_column("sandboxes", "image_id")  # ALTER TABLE DROP COLUMN: SQLite 3.35 and later
    op.drop_index(op.f("ix_images_digest"), table_name="images")
    op.drop_table("images")
