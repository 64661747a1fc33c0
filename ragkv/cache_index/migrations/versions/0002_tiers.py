"""Schema 2: kv_entries.priority / on_disk / on_remote and the eviction_clock table.

The new columns get server defaults so existing rows are filled in place (no data loss), and so
a node still running schema-1 code can insert rows while another node already runs schema 2.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-26
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "eviction_clock",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("value", sa.Float(), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    with op.batch_alter_table("kv_entries") as batch:
        batch.add_column(
            sa.Column("priority", sa.Float(), nullable=False, server_default=sa.text("0"))
        )
        batch.add_column(
            sa.Column("on_disk", sa.Boolean(), nullable=False, server_default=sa.true())
        )
        batch.add_column(
            sa.Column("on_remote", sa.Boolean(), nullable=False, server_default=sa.false())
        )
        batch.create_index("ix_kv_entries_priority", ["priority"], unique=False)
    # Rows carried over are scored as the default policy (PGDSF, clock 0) would have scored
    # them: at 0 every one, however often read, would be evicted before any entry stored after.
    op.execute("UPDATE kv_entries SET priority = (hits + 1) * n_tokens * 1.0 / nbytes"
               " WHERE nbytes > 0")


def downgrade() -> None:
    with op.batch_alter_table("kv_entries") as batch:
        batch.drop_index("ix_kv_entries_priority")
        batch.drop_column("on_remote")
        batch.drop_column("on_disk")
        batch.drop_column("priority")
    op.drop_table("eviction_clock")
