"""Alembic environment, configured programmatically: no alembic.ini at run time.

:func:`ragkv.cache_index.migrate.upgrade` hands in an open connection (already inside a
transaction, and on PostgreSQL holding the migration lock); ``alembic_config(url)`` without one
is for developers generating revisions.
"""

from __future__ import annotations

from alembic import context
from sqlalchemy import Connection, create_engine

from ragkv.cache_index.models import Base


def _run(connection: Connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=Base.metadata,
        compare_type=True,
        # SQLite cannot ALTER most things in place; batch mode copies the table instead.
        render_as_batch=connection.dialect.name == "sqlite",
    )
    with context.begin_transaction():
        context.run_migrations()


def _main() -> None:
    config = context.config
    url = config.get_main_option("sqlalchemy.url")
    if context.is_offline_mode():
        context.configure(url=url, target_metadata=Base.metadata, literal_binds=True)
        with context.begin_transaction():
            context.run_migrations()
        return
    connection = config.attributes.get("connection")
    if connection is not None:
        _run(connection)
        return
    engine = create_engine(url or "")
    try:
        with engine.begin() as conn:
            _run(conn)
    finally:
        engine.dispose()


_main()
