"""Schema 4: chunks.ids_sha256 and kv_entries.ids_sha256, so the KV of a removed chunk can be
found and removed with it.

Both columns are nullable: a node still running schema-3 code can insert rows while another
node already runs schema 4. Existing chunks get their digest from their token ids; existing
entries get it when a chunk names them by its cache key (the entry of the precompute context
the chunk was ingested in). The others stay null until their document leaves: the facade
then keys its chunks in every context and digests the entries those keys name.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-06
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from ragkv.cache_index.models import ids_sha256

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

_BATCH = 500


def upgrade() -> None:
    for table in ("chunks", "kv_entries"):
        with op.batch_alter_table(table) as batch:
            batch.add_column(sa.Column("ids_sha256", sa.String(length=64), nullable=True))
            batch.create_index(f"ix_{table}_ids_sha256", ["ids_sha256"], unique=False)
    chunks = sa.table("chunks", sa.column("id", sa.Integer), sa.column("token_ids", sa.JSON),
                      sa.column("cache_key", sa.String), sa.column("ids_sha256", sa.String))
    entries = sa.table("kv_entries", sa.column("key", sa.String),
                       sa.column("ids_sha256", sa.String))
    conn = op.get_bind()
    last = 0
    while rows := conn.execute(sa.select(chunks.c.id, chunks.c.token_ids)
                               .where(chunks.c.id > last).order_by(chunks.c.id)
                               .limit(_BATCH)).all():
        for chunk_id, token_ids in rows:
            conn.execute(sa.update(chunks).where(chunks.c.id == chunk_id)
                         .values(ids_sha256=ids_sha256(token_ids)))
        last = rows[-1][0]
    named = (sa.select(chunks.c.ids_sha256).where(chunks.c.cache_key == entries.c.key)
             .limit(1).scalar_subquery())
    conn.execute(sa.update(entries)
                 .where(entries.c.key.in_(sa.select(chunks.c.cache_key)))
                 .values(ids_sha256=named))


def downgrade() -> None:
    for table in ("kv_entries", "chunks"):
        with op.batch_alter_table(table) as batch:
            batch.drop_index(f"ix_{table}_ids_sha256")
            batch.drop_column("ids_sha256")
