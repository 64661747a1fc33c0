"""The relational index: documents, chunks, KV entries and the query log.

It holds only small rows; the KV tensors themselves live in a :class:`~.blobs.BlobStore`.
Opening, sharing and migrating the database is :mod:`.database`'s job; read-only summaries
are built in :mod:`.reports`. Every method here is its own short transaction.
"""

from __future__ import annotations

import uuid
from collections import Counter
from typing import Any

from sqlalchemy import delete, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from ragkv.cache_index import reports
from ragkv.cache_index.database import IndexDatabase, in_batches
from ragkv.cache_index.models import (
    QUERY_FIELDS,
    Chunk,
    ChunkInfo,
    ChunkRecord,
    Document,
    DocumentInfo,
    EntryInfo,
    KVEntry,
    QueryLog,
    Setting,
    to_info,
    utcnow,
)
from ragkv.cache_index.reports import DocumentSize, TierSize, TopEntry

#: The setting that names the corpus's current version: a new value whenever chunks are added
#: or removed, so a process holding a retrieval index knows to rebuild it.
CORPUS_VERSION = "corpus_version"


def _new_corpus_version(s: Session) -> None:
    """Give the corpus a new version in the transaction that changes its chunks (an upsert:
    two processes changing chunks at once both leave a version their retrievers lack)."""
    value = uuid.uuid4().hex
    dialect = postgresql if s.get_bind().dialect.name == "postgresql" else sqlite
    s.execute(dialect.insert(Setting).values(name=CORPUS_VERSION, value=value,
                                             created_at=utcnow())
              .on_conflict_do_update(index_elements=[Setting.name], set_={"value": value}))


def _chunk_info(row: Chunk, document_name: str) -> ChunkInfo:
    # JSON columns may hand back the very list the session holds; callers get their own.
    return to_info(ChunkInfo, row, document_name=document_name, token_ids=list(row.token_ids))


class CacheIndex(IndexDatabase):
    """Typed access to the index database; every method is its own short transaction.

    A caller that needs a query of its own runs it in :meth:`transaction` (inherited).
    """

    # -- documents and chunks ------------------------------------------------------------------

    def add_document(self, name: str, source: str, text_sha256: str) -> tuple[int, bool]:
        """Return ``(id, created)``; re-ingesting the same text under the same name is a no-op."""
        query = select(Document.id).where(
            Document.name == name, Document.text_sha256 == text_sha256
        )
        with self.transaction() as s:
            existing = s.scalar(query)
            if existing is not None:
                return existing, False
        try:
            with self.transaction() as s:
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
            with self.transaction() as s:
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
        with self.transaction() as s:
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
            _new_corpus_version(s)
            return [row.id for row in rows]

    def set_document_chunk_count(self, document_id: int, n: int) -> None:
        """Record the final chunk count and drop chunks past it (left over from a re-chunk)."""
        with self.transaction() as s:
            doc = s.get(Document, document_id)
            if doc is None:
                raise KeyError(f"no document with id {document_id}")
            doc.n_chunks = n
            stale = list(s.scalars(
                select(Chunk).where(Chunk.document_id == document_id, Chunk.ordinal >= n)))
            for row in stale:
                s.delete(row)
            if stale:
                _new_corpus_version(s)

    def remove_documents(self, name: str, *, before_id: int | None = None) -> int:
        """Remove the documents called ``name`` with their chunks (with ``before_id``, only
        those of a lower id: the versions ingested before it); returns how many went.

        Their KV entries stay: a key names content that other documents may share, and the
        budgets' eviction reclaims what nothing reads any more."""
        with self.transaction() as s:
            query = select(Document.id).where(Document.name == name)
            if before_id is not None:
                query = query.where(Document.id < before_id)
            doc_ids = list(s.scalars(query))
            if not doc_ids:
                return 0
            s.execute(delete(Chunk).where(Chunk.document_id.in_(doc_ids)))
            s.execute(delete(Document).where(Document.id.in_(doc_ids)))
            _new_corpus_version(s)
            return len(doc_ids)

    def corpus_version(self) -> str | None:
        """The corpus's current version (None before any chunk): it changes whenever chunks
        are added or removed, by any process on this index."""
        return self.setting(CORPUS_VERSION)

    def chunk_embeddings(self) -> tuple[list[int], list[bytes]]:
        """Every chunk's id and stored embedding, by id; chunks without one are left out."""
        with self.transaction() as s:
            rows = s.execute(select(Chunk.id, Chunk.embedding)
                             .where(Chunk.embedding.is_not(None)).order_by(Chunk.id)).all()
        return [r[0] for r in rows], [r[1] for r in rows]

    def documents(self) -> list[DocumentInfo]:
        with self.transaction() as s:
            docs = s.scalars(select(Document).order_by(Document.id))
            return [to_info(DocumentInfo, d) for d in docs]

    def chunks(self, ids: list[int] | None = None, *,
               document_id: int | None = None) -> list[ChunkInfo]:
        """All chunks (by document, ordinal), one document's (``document_id``), or those in
        ``ids`` in that order; unknown ids are skipped."""
        base = select(Chunk, Document.name).join(Document, Chunk.document_id == Document.id)
        with self.transaction() as s:
            if ids is None:
                if document_id is not None:
                    base = base.where(Chunk.document_id == document_id)
                pairs = s.execute(base.order_by(Chunk.document_id, Chunk.ordinal)).all()
                return [_chunk_info(c, n) for c, n in pairs]
            wanted = list(dict.fromkeys(ids))
            found: dict[int, ChunkInfo] = {}
            for batch in in_batches(wanted):
                for c, n in s.execute(base.where(Chunk.id.in_(batch))).all():
                    found[c.id] = _chunk_info(c, n)
            return [found[i] for i in ids if i in found]

    # -- KV entries ----------------------------------------------------------------------------

    def get_entry(self, key: str) -> EntryInfo | None:
        with self.transaction() as s:
            row = s.get(KVEntry, key)
            return to_info(EntryInfo, row) if row is not None else None

    def has_entries(self, keys: list[str]) -> dict[str, bool]:
        """Presence of every key, in one query per 500 keys (not one per key)."""
        unique = list(dict.fromkeys(keys))
        present: set[str] = set()
        with self.transaction() as s:
            for batch in in_batches(unique):
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
    ) -> EntryInfo | None:
        """Insert or overwrite an entry; an overwrite keeps its hit count (same key, same KV).

        Called once the blob is on disk; ``on_remote`` once it is in the remote tier too.
        Returns the row it replaced (whose blob, if named differently, no row names now)."""
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
        # Compare-and-swap on the blob name: two writers of one key must not both replace
        # the same row, or the blob of the one that lost would be named by no row and never
        # deleted. Whoever finds the row changed under it goes round.
        attempts = 8
        for attempt in range(attempts):
            try:
                with self.transaction() as s:
                    now = utcnow()
                    row = s.get(KVEntry, key)
                    if row is None:
                        s.add(
                            KVEntry(key=key, created_at=now, last_access_at=now, hits=0, **fields)
                        )
                        return None
                    old = to_info(EntryInfo, row)
                    res = s.execute(update(KVEntry)
                                    .where(KVEntry.key == key, KVEntry.blob_name == old.blob_name)
                                    .values(created_at=now, **fields)
                                    .execution_options(synchronize_session=False))
                    if res.rowcount:
                        return old
            except IntegrityError:
                # A concurrent writer inserted the same key first: go round and update it.
                if attempt == attempts - 1:
                    raise
        raise RuntimeError(f"cache entry {key} kept changing under a write")

    def delete_entry(self, key: str, *, blob: str | None = None) -> bool:
        """Delete an entry; with ``blob``, only if the row still names that blob (so a reader
        that found a bad entry cannot delete a good one a concurrent writer just stored).
        Returns whether a row was deleted."""
        with self.transaction() as s:
            row = s.get(KVEntry, key)
            if row is None or (blob is not None and row.blob_name != blob):
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
        with self.transaction() as s:
            for n, group in by_count.items():
                for batch in in_batches(group):
                    s.execute(
                        update(KVEntry)
                        .where(KVEntry.key.in_(batch))
                        .values(hits=KVEntry.hits + n, last_access_at=now)
                    )

    # -- settings ------------------------------------------------------------------------------

    def setting(self, name: str) -> str | None:
        """The value recorded under ``name``, or None."""
        with self.transaction() as s:
            row = s.get(Setting, name)
            return None if row is None else row.value

    def record_setting(self, name: str, value: str) -> str:
        """Record ``value`` under ``name`` unless a value is there already; return the value
        the index holds afterwards (the first writer's, when two processes race)."""
        if (found := self.setting(name)) is not None:
            return found
        try:
            with self.transaction() as s:
                s.add(Setting(name=name, value=value, created_at=utcnow()))
            return value
        except IntegrityError:
            found = self.setting(name)
            if found is None:
                raise
            return found

    # -- query log -----------------------------------------------------------------------------

    def log_query(self, **fields: Any) -> int:
        """Store one answered query; ``fields`` are the ``queries`` columns but id/created_at."""
        unknown = set(fields) - set(QUERY_FIELDS)
        if unknown:
            raise TypeError(f"unknown query fields: {sorted(unknown)}")
        with self.transaction() as s:
            row = QueryLog(created_at=utcnow(), **fields)
            s.add(row)
            s.flush()
            return row.id

    def recent_queries(self, limit: int = 20) -> list[dict[str, Any]]:
        """Newest first, each as a dict of all columns."""
        columns = [c.name for c in QueryLog.__table__.columns]
        with self.transaction() as s:
            rows = s.scalars(select(QueryLog).order_by(QueryLog.id.desc()).limit(limit))
            return [{name: getattr(r, name) for name in columns} for r in rows]

    # -- overview ------------------------------------------------------------------------------

    def stats(self) -> dict[str, Any]:
        """Counts of documents, chunks, entries (bytes, tokens, hits) and queries, with the
        index URL (password masked) and schema version."""
        with self.transaction() as s:
            return reports.overview(s, self.safe_url)

    def tier_sizes(self) -> list[TierSize]:
        """``{"tier", "entries", "kv_bytes"}`` per persistent tier ("disk", "remote"), every
        tier listed even when empty. An entry held by both counts in both; the memory tier is
        per process and reported by ``KVStore.stats``."""
        with self.transaction() as s:
            return reports.tier_sizes(s)

    def document_sizes(self) -> list[DocumentSize]:
        """``{"document_id", "document", "chunks", "kv_bytes"}`` per document that has chunks,
        by document id: its chunk count and the stored bytes of their KV entries (an entry
        shared by two documents counts in both; a chunk without an entry adds nothing)."""
        with self.transaction() as s:
            return reports.document_sizes(s)

    def top_entries(self, limit: int = 10) -> list[TopEntry]:
        """The ``limit`` most reused entries (hits > 0), most hits first, ties by key, each as
        ``{"key", "hits", "n_tokens", "document", "ordinal", "text"}``: the last three from the
        first-stored chunk whose cache key it is, or None where no chunk names it."""
        with self.transaction() as s:
            return reports.top_entries(s, limit)
