"""Bring an index database to the current schema with the Alembic revisions in ``migrations/``.

:class:`~.index.CacheIndex` calls :func:`upgrade` on open, so a new release's schema is applied
by whichever node opens the shared index first. Three kinds of database arrive here:

* empty: every revision runs, from ``0001``;
* made before migrations existed (tables, no ``alembic_version``): stamped at the revision that
  matches its ``schema_version`` row, then upgraded, keeping every row;
* already migrated: one query finds it at head and nothing else happens.

Several processes may open one database at once: they take turns, under an advisory lock held
for the migration transaction on PostgreSQL, and inside one ``BEGIN IMMEDIATE`` on SQLite. The
next in line then finds the database at head.

A new revision (after changing ``models.py``)::

    from alembic import command
    from ragkv.cache_index.migrate import alembic_config
    command.revision(alembic_config("sqlite:///at-head.sqlite"), "what changed", autogenerate=True)
"""

from __future__ import annotations

import threading
import time
from functools import lru_cache
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Connection, Engine, inspect, text
from sqlalchemy.exc import IntegrityError, OperationalError, ProgrammingError

MIGRATIONS_DIR = Path(__file__).with_name("migrations")

#: ``schema_version`` of a pre-migration database -> the revision whose schema it has.
LEGACY_REVISIONS: dict[int, str] = {1: "0001", 2: "0002", 3: "0003"}

# Arbitrary but fixed: every ragkv process must agree on it ("ragkvidx").
_PG_LOCK_KEY = 0x7261676B76696478 & 0x7FFFFFFFFFFFFFFF
_ATTEMPTS = 3
# Alembic keeps its running context in module globals: two threads migrating at once would
# swap contexts under each other, so one process migrates one database at a time.
_THREAD_LOCK = threading.Lock()


def alembic_config(url: str | None = None, connection: Connection | None = None) -> Config:
    """An Alembic config for ``migrations/`` without any ini file."""
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    if url is not None:
        # ConfigParser treats % as interpolation; a password may contain one.
        cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    if connection is not None:
        cfg.attributes["connection"] = connection
    return cfg


class UnknownSchema(ValueError):
    """The database has a schema this release does not know: a newer ragkv made it."""

    def __init__(self, found: str) -> None:
        super().__init__(f"the cache index has schema {found}, which this ragkv does not know "
                         f"(it knows up to {head_revision()}): a newer ragkv made it; upgrade "
                         f"ragkv to use it")


@lru_cache(maxsize=1)
def known_revisions() -> frozenset[str]:
    return frozenset(r.revision for r in
                     ScriptDirectory.from_config(alembic_config()).walk_revisions())


@lru_cache(maxsize=1)
def head_revision() -> str:
    head = ScriptDirectory.from_config(alembic_config()).get_current_head()
    if head is None:
        raise RuntimeError(f"no Alembic revisions found in {MIGRATIONS_DIR}")
    return head


def current_revision(conn: Connection) -> str | None:
    return MigrationContext.configure(conn).get_current_revision()


def _legacy_revision(conn: Connection) -> str | None:
    """The revision an unversioned database already has, or None if it has no tables."""
    tables = set(inspect(conn).get_table_names())
    if "kv_entries" not in tables:
        return None
    version = 1
    if "schema_version" in tables:
        found = conn.execute(text("SELECT version FROM schema_version WHERE id = 1")).scalar()
        version = int(found) if found is not None else 1
    if version in LEGACY_REVISIONS:
        return LEGACY_REVISIONS[version]
    # Later releases keep schema_version equal to their revision's number: an index that
    # lost its alembic_version table (a partial dump) has that revision, a newer one is refused
    if f"{version:04d}" in known_revisions():
        return f"{version:04d}"
    raise UnknownSchema(f"version {version}")


def _upgrade_once(engine: Engine) -> None:
    with engine.connect() as conn:
        current = current_revision(conn)
    if current == head_revision():
        return  # the usual case, without taking any lock
    if current is not None and current not in known_revisions():
        raise UnknownSchema(f"revision {current}")  # refused before any lock or change
    with engine.begin() as conn:
        if conn.dialect.name == "postgresql":
            conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _PG_LOCK_KEY})
        elif conn.dialect.name == "sqlite":
            # The driver would run DDL outside any transaction; an explicit write transaction
            # both serializes concurrent migrators (busy_timeout waits) and makes it atomic.
            conn.exec_driver_sql("BEGIN IMMEDIATE")
        current = current_revision(conn)
        if current == head_revision():
            return
        cfg = alembic_config(connection=conn)
        if current is None:
            legacy = _legacy_revision(conn)
            if legacy is not None:
                command.stamp(cfg, legacy)
        command.upgrade(cfg, "head")


def upgrade(engine: Engine) -> None:
    """Migrate the database behind ``engine`` to the newest revision (a no-op when there)."""
    # PostgreSQL migrators queue on the advisory lock, so a failure there is real (often: the
    # server is down) and is raised at once; SQLite's busy timeout can run out under a long
    # writer, and then a later attempt succeeds.
    attempts = _ATTEMPTS if engine.dialect.name == "sqlite" else 1
    for attempt in range(attempts):
        try:
            with _THREAD_LOCK:
                _upgrade_once(engine)
            return
        except (OperationalError, IntegrityError, ProgrammingError):
            if attempt == attempts - 1:
                raise
            time.sleep(0.1 * (attempt + 1))
