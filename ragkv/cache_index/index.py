"""The relational index: documents, chunks, KV entries and the query log.

It holds only small rows; the KV tensors themselves live in a :class:`~.blobs.BlobStore`.
Several processes (the CLI ingesting, the UI answering) may share one SQLite file, hence WAL
(readers never block the writer) and a busy timeout (a second writer waits instead of failing).
Several nodes share one PostgreSQL database the same way (``postgresql+psycopg://...``); the
code stays portable SQL, and races between writers end in a unique-key conflict that the loser
treats as "already there". The schema is kept current by Alembic (:mod:`.migrate`) on open.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, create_engine, event, func, select, update
from sqlalchemy.engine import make_url
from sqlalchemy.exc import IntegrityError, OperationalError
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.pool import StaticPool

from ragkv.cache_index.migrate import upgrade
from ragkv.cache_index.models import (
    QUERY_FIELDS,
    SCHEMA_VERSION,
    Chunk,
    ChunkInfo,
    ChunkRecord,
    Document,
    DocumentInfo,
    EntryInfo,
    KVEntry,
    QueryLog,
    SchemaVersion,
    to_info,
    utcnow,
)

log = logging.getLogger("ragkv.cache")

#: Seconds to wait for a remote index server before the lookup counts as a miss (unless the
#: URL sets its own connect_timeout): a cache must not stall a query on a dead host.
REMOTE_CONNECT_TIMEOUT_S = 5
#: Milliseconds a SQLite writer waits for another writer's lock before giving up.
SQLITE_BUSY_TIMEOUT_MS = 30_000
# Stays well under SQLite's bound-parameter limit (999 on old builds) for IN (...) lists.
_IN_BATCH = 500


def _batches(items: Sequence[Any]) -> Iterator[Sequence[Any]]:
    for start in range(0, len(items), _IN_BATCH):
        yield items[start : start + _IN_BATCH]


def _make_engine(url: str) -> Engine:
    parsed = make_url(url)
    if parsed.get_backend_name() != "sqlite":
        connect_args: dict[str, Any] = {}
        if parsed.get_backend_name() == "postgresql" and "connect_timeout" not in parsed.query:
            connect_args["connect_timeout"] = REMOTE_CONNECT_TIMEOUT_S
        try:
            return create_engine(url, pool_pre_ping=True, connect_args=connect_args)
        except ImportError as exc:  # the driver is an optional extra
            extra = "postgres" if parsed.get_backend_name() == "postgresql" else None
            hint = f"pip install 'ragkv[{extra}]'" if extra else "install its database driver"
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


def _chunk_info(row: Chunk, document_name: str) -> ChunkInfo:
    # JSON columns may hand back the very list the session holds; callers get their own.
    return to_info(ChunkInfo, row, document_name=document_name, token_ids=list(row.token_ids))


class CacheIndex:
    """Typed access to the index database; every method is its own short transaction."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.engine = _make_engine(url)
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)
        self._ready = False
        try:
            self._create_schema()
        except OperationalError as exc:
            if self.engine.dialect.name == "sqlite":
                raise  # a local file that cannot be opened is a configuration error
            # A server that is down now may be back later: until then every use fails (a
            # miss for KVStore), and the first use after that migrates.
            log.warning("cache index %s unreachable at start: %s", self._safe_url, exc)

    @property
    def _safe_url(self) -> str:
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
    def _tx(self) -> Iterator[Session]:
        if not self._ready:
            self._create_schema()
        with self._sessions.begin() as session:
            yield session

    @property
    def schema_version(self) -> int | None:
        with self._tx() as s:
            row = s.get(SchemaVersion, 1)
            return row.version if row else None

    # -- documents and chunks ------------------------------------------------------------------

    def add_document(self, name: str, source: str, text_sha256: str) -> tuple[int, bool]:
        """Return ``(id, created)``; re-ingesting the same text under the same name is a no-op."""
        query = select(Document.id).where(
            Document.name == name, Document.text_sha256 == text_sha256
        )
        with self._tx() as s:
            existing = s.scalar(query)
            if existing is not None:
                return existing, False
        try:
            with self._tx() as s:
                doc = Document(
                    name=name,
                    source=source,
                    text_sha256=text_sha256,
                    n_chunks=0,
                    created_at=utcnow(),
                )
                s.add(doc)
                s.flush()
                return doc.id, True
        except IntegrityError:
            # Another process inserted it between our select and insert.
            with self._tx() as s:
                found = s.scalar(query)
            if found is None:
                raise
            return found, False

    def add_chunks(self, document_id: int, chunks: list[ChunkRecord]) -> list[int]:
        """Insert or refresh chunks by ``(document_id, ordinal)``; ids in the order given.

        An existing ordinal is updated rather than skipped: re-chunking a document with other
        settings must not leave stale text or cache keys under the old ids.
        """
        if not chunks:
            return []
        try:
            return self._add_chunks_once(document_id, chunks)
        except IntegrityError:
            # Another process inserted the same ordinals first: this time they are found and
            # updated.
            return self._add_chunks_once(document_id, chunks)

    def _add_chunks_once(self, document_id: int, chunks: list[ChunkRecord]) -> list[int]:
        with self._tx() as s:
            existing = {
                c.ordinal: c
                for c in s.scalars(select(Chunk).where(Chunk.document_id == document_id))
            }
            rows: list[Chunk] = []
            for rec in chunks:
                row = existing.get(rec.ordinal)
                if row is None:
                    row = Chunk(document_id=document_id, ordinal=rec.ordinal)
                    s.add(row)
                    existing[rec.ordinal] = row
                row.text = rec.text
                row.token_ids = [int(t) for t in rec.token_ids]
                row.n_tokens = len(rec.token_ids)
                row.cache_key = rec.cache_key
                row.embedding = rec.embedding
                rows.append(row)
            s.flush()
            return [row.id for row in rows]

    def set_document_chunk_count(self, document_id: int, n: int) -> None:
        """Record the final chunk count and drop chunks past it (left over from a re-chunk)."""
        with self._tx() as s:
            doc = s.get(Document, document_id)
            if doc is None:
                raise KeyError(f"no document with id {document_id}")
            doc.n_chunks = n
            for row in s.scalars(
                select(Chunk).where(Chunk.document_id == document_id, Chunk.ordinal >= n)
            ):
                s.delete(row)

    def documents(self) -> list[DocumentInfo]:
        with self._tx() as s:
            docs = s.scalars(select(Document).order_by(Document.id))
            return [to_info(DocumentInfo, d) for d in docs]

    def chunks(self, ids: list[int] | None = None) -> list[ChunkInfo]:
        """All chunks (by document, ordinal), or those in ``ids`` in that order; unknown ids
        are skipped."""
        base = select(Chunk, Document.name).join(Document, Chunk.document_id == Document.id)
        with self._tx() as s:
            if ids is None:
                pairs = s.execute(base.order_by(Chunk.document_id, Chunk.ordinal)).all()
                return [_chunk_info(c, n) for c, n in pairs]
            wanted = list(dict.fromkeys(ids))
            found: dict[int, ChunkInfo] = {}
            for batch in _batches(wanted):
                for c, n in s.execute(base.where(Chunk.id.in_(batch))).all():
                    found[c.id] = _chunk_info(c, n)
            return [found[i] for i in ids if i in found]

    # -- KV entries ----------------------------------------------------------------------------

    def get_entry(self, key: str) -> EntryInfo | None:
        with self._tx() as s:
            row = s.get(KVEntry, key)
            return to_info(EntryInfo, row) if row is not None else None

    def has_entries(self, keys: list[str]) -> dict[str, bool]:
        """Presence of every key, in one query per 500 keys (not one per key)."""
        unique = list(dict.fromkeys(keys))
        present: set[str] = set()
        with self._tx() as s:
            for batch in _batches(unique):
                present.update(s.scalars(select(KVEntry.key).where(KVEntry.key.in_(batch))))
        return {k: k in present for k in unique}

    def upsert_entry(
        self,
        key: str,
        *,
        model_fp: str,
        layout: str,
        n_tokens: int,
        nbytes: int,
        blob_name: str,
        checksum: str,
        dtype: str,
        on_remote: bool = False,
    ) -> None:
        """Insert or overwrite an entry; an overwrite keeps its hit count (same key, same KV).

        Called once the blob is on disk; ``on_remote`` once it is in the remote tier too."""
        fields = dict(
            model_fp=model_fp,
            layout=layout,
            n_tokens=n_tokens,
            nbytes=nbytes,
            blob_name=blob_name,
            checksum=checksum,
            dtype=dtype,
            on_disk=True,
            on_remote=on_remote,
        )
        for attempt in range(2):
            try:
                with self._tx() as s:
                    now = utcnow()
                    row = s.get(KVEntry, key)
                    if row is None:
                        s.add(
                            KVEntry(key=key, created_at=now, last_access_at=now, hits=0, **fields)
                        )
                    else:
                        for name, value in fields.items():
                            setattr(row, name, value)
                        row.created_at = now
                return
            except IntegrityError:
                # A concurrent writer inserted the same key first: go round and update it.
                if attempt:
                    raise

    def delete_entry(self, key: str, *, checksum: str | None = None) -> bool:
        """Delete an entry; with ``checksum``, only if the row still has it (so a reader that
        found a bad entry cannot delete a good one a concurrent writer just stored).
        Returns whether a row was deleted."""
        with self._tx() as s:
            row = s.get(KVEntry, key)
            if row is None or (checksum is not None and row.checksum != checksum):
                return False
            s.delete(row)
            return True

    def record_hits(self, keys: list[str]) -> None:
        """``hits += 1`` and ``last_access_at = now`` for each key, in one transaction."""
        if not keys:
            return
        now = utcnow()
        by_count: dict[int, list[str]] = {}
        for key, n in Counter(keys).items():
            by_count.setdefault(n, []).append(key)
        with self._tx() as s:
            for n, group in by_count.items():
                for batch in _batches(group):
                    s.execute(
                        update(KVEntry)
                        .where(KVEntry.key.in_(batch))
                        .values(hits=KVEntry.hits + n, last_access_at=now)
                    )

    # -- query log -----------------------------------------------------------------------------

    def log_query(self, **fields: Any) -> int:
        """Store one answered query; ``fields`` are the ``queries`` columns but id/created_at."""
        unknown = set(fields) - set(QUERY_FIELDS)
        if unknown:
            raise TypeError(f"unknown query fields: {sorted(unknown)}")
        with self._tx() as s:
            row = QueryLog(created_at=utcnow(), **fields)
            s.add(row)
            s.flush()
            return row.id

    def recent_queries(self, limit: int = 20) -> list[dict[str, Any]]:
        """Newest first, each as a dict of all columns."""
        columns = [c.name for c in QueryLog.__table__.columns]
        with self._tx() as s:
            rows = s.scalars(select(QueryLog).order_by(QueryLog.id.desc()).limit(limit))
            return [{name: getattr(r, name) for name in columns} for r in rows]

    # -- overview ------------------------------------------------------------------------------

    def stats(self) -> dict[str, Any]:
        with self._tx() as s:
            kv_n, kv_bytes, kv_tokens, kv_hits = s.execute(
                select(
                    func.count(KVEntry.key),
                    func.coalesce(func.sum(KVEntry.nbytes), 0),
                    func.coalesce(func.sum(KVEntry.n_tokens), 0),
                    func.coalesce(func.sum(KVEntry.hits), 0),
                )
            ).one()
            return {
                "documents": s.scalar(select(func.count(Document.id))) or 0,
                "chunks": s.scalar(select(func.count(Chunk.id))) or 0,
                "kv_entries": int(kv_n),
                "kv_bytes": int(kv_bytes),
                "kv_tokens": int(kv_tokens),
                "queries": s.scalar(select(func.count(QueryLog.id))) or 0,
                "chunk_hits": int(kv_hits),
                # Never show a database password in a UI panel or a log line.
                "index_url": self._safe_url,
                "schema_version": SCHEMA_VERSION,
            }

    def close(self) -> None:
        self.engine.dispose()
