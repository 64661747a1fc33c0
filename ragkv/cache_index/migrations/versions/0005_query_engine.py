"""Schema 5: queries.engine, which engine and model answered each query (``QueryTrace.engine``),
so that TTFTs are compared only within one: a full-prefill TTFT logged by another model made
the UI's speed-up x143.

Nullable: a node still running schema-4 code logs queries without it, and older rows have
none (they are compared with each other only).

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-07
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("queries") as batch:
        batch.add_column(sa.Column("engine", sa.Text(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("queries") as batch:
        batch.drop_column("engine")
