"""The index database itself: engine, schema on open, and the one way to open a transaction.

Several processes (the CLI ingesting, the UI answering) may share one SQLite file, hence WAL
(readers never block the writer) and a busy timeout (a second writer waits instead of failing).
Several nodes share one PostgreSQL database the same way (``postgresql+psycopg://...``); the
code stays portable SQL, and races between writers end in a unique-key conflict that the loser
treats as "already there". The schema is kept current by Alembic (:mod:`.migrate`) on open.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError, IntegrityError, NoSuchModuleError, OperationalError
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.pool import StaticPool

from ragkv.cache_index.migrate import upgrade
from ragkv.cache_index.models import SCHEMA_VERSION, SchemaVersion, utcnow

log = logging.getLogger("ragkv.cache")

#: Seconds to wait for a remote index server before the lookup counts as a miss (unless the
#: URL sets its own connect_timeout): a cache must not stall a query on a dead host.
REMOTE_CONNECT_TIMEOUT_S = 5
#: Milliseconds a SQLite writer waits for another writer's lock before giving up.
SQLITE_BUSY_TIMEOUT_MS = 30_000
#: Items per ``IN (...)`` list: well under SQLite's bound-parameter limit (999 on old builds).
IN_BATCH = 500


def in_batches(items: Sequence[Any]) -> Iterator[Sequence[Any]]:
    """``items`` in slices of :data:`IN_BATCH`, one per ``IN (...)`` query."""
    for start in range(0, len(items), IN_BATCH):
        yield items[start : start + IN_BATCH]


def brief(exc: BaseException) -> str:
    """The first line of a database error's own text (SQLAlchemy's wraps the driver's over
    several lines and ends in a link): fit for a log line or a one-line error."""
    cause = getattr(exc, "orig", None) or exc
    lines = str(cause).strip().splitlines()
    return lines[0] if lines else type(cause).__name__


def make_engine(url: str) -> Engine:
    """An engine for ``url`` with the pragmas (SQLite) or timeouts (servers) described above.
    A URL that names no database SQLAlchemy knows is a ``ValueError`` saying so."""
    try:
        parsed = make_url(url)
    except ArgumentError:
        raise ValueError(f"index URL {url!r} is not a database URL (e.g. sqlite:///path/"
                         f"index.sqlite or postgresql://user@host/db)") from None
    if parsed.get_backend_name() != "sqlite":
        connect_args: dict[str, Any] = {}
        if parsed.get_backend_name() == "postgresql" and "connect_timeout" not in parsed.query:
            connect_args["connect_timeout"] = REMOTE_CONNECT_TIMEOUT_S
        try:
            return create_engine(url, pool_pre_ping=True, connect_args=connect_args)
        except NoSuchModuleError:
            raise ValueError(f"index URL {parsed.render_as_string(hide_password=True)!r}: "
                             f"SQLAlchemy knows no database {parsed.drivername!r} (use "
                             f"sqlite:// or postgresql://)") from None
        except ImportError as exc:  # the driver is an optional extra
            extra = "postgres" if parsed.get_backend_name() == "postgresql" else None
            hint = f"pip install 'ragkv[{extra}]'" if extra else "its database driver installed"
            raise ImportError(f"index URL {parsed.drivername}:// needs {hint}: {exc}") from exc
    database = parsed.database or ""
    in_memory = database in ("", ":memory:") or "mode=memory" in database
    if in_memory:
        # One shared connection, otherwise every pooled connection sees its own empty database.
        engine = create_engine(url, poolclass=StaticPool, connect_args={"check_same_thread": False})
    else:
        if not database.startswith("file:"):
            Path(database).expanduser().parent.mkdir(parents=True, exist_ok=True)
        # The pool hands a connection to one thread at a time, so sqlite3's thread check only
        # gets in the way of a threaded UI.
        engine = create_engine(url, connect_args={"check_same_thread": False})

    @event.listens_for(engine, "connect")
    def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
        cursor = dbapi_conn.cursor()
        try:
            cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
            if not in_memory:
                cursor.execute("PRAGMA journal_mode=WAL")
                # With WAL, NORMAL is still crash-safe for the database; only the last
                # transactions may be lost on power failure, and the cache can be rebuilt.
                cursor.execute("PRAGMA synchronous=NORMAL")
            cursor.execute("PRAGMA foreign_keys=ON")
        finally:
            cursor.close()

    return engine


class IndexDatabase:
    """An open index database: its engine, a current schema, and short transactions.

    :class:`~.index.CacheIndex` adds the typed methods; modules that need a query of their own
    (:mod:`.residency`) run it inside :meth:`transaction`.
    """

    def __init__(self, url: str) -> None:
        self.url = url
        self.engine = make_engine(url)
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)
        self._ready = False
        try:
            self._create_schema()
        except OperationalError as exc:
            if self.engine.dialect.name == "sqlite":
                raise  # a local file that cannot be opened is a configuration error
            # A server that is down now may be back later: until then every use fails (a
            # miss for KVStore), and the first use after that migrates.
            log.warning("cache index %s unreachable at start: %s", self.safe_url, brief(exc))

    @property
    def safe_url(self) -> str:
        """The URL with any password masked: fit for a log line or a UI panel."""
        return make_url(self.url).render_as_string(hide_password=True)

    def _create_schema(self) -> None:
        upgrade(self.engine)
        try:
            with self._sessions.begin() as s:
                row = s.get(SchemaVersion, 1)
                if row is None:
                    s.add(SchemaVersion(id=1, version=SCHEMA_VERSION, created_at=utcnow()))
                elif row.version < SCHEMA_VERSION:  # migrated just now
                    row.version = SCHEMA_VERSION
        except IntegrityError:
            pass  # a concurrent opener wrote the row first
        self._ready = True

    @contextmanager
    def transaction(self) -> Iterator[Session]:
        """One short transaction: commits when the block ends, rolls back if it raises.

        Objects loaded in it stay readable after the block (no expiry on commit), but keep
        them inside: callers outside ``ragkv.cache_index`` get plain records, not ORM rows.
        An index whose server was down at open gets its schema here, on first use.
        """
        if not self._ready:
            self._create_schema()
        with self._sessions.begin() as session:
            yield session

    @property
    def schema_version(self) -> int | None:
        with self.transaction() as s:
            row = s.get(SchemaVersion, 1)
            return row.version if row else None

    def close(self) -> None:
        self.engine.dispose()
