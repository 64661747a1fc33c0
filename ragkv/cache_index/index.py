"""The relational index: documents and chunks (:mod:`.corpus`), KV entries, settings and the
query log.

It holds only small rows; the KV tensors themselves live in a :class:`~.blobs.BlobStore`.
Opening, sharing and migrating the database is :mod:`.database`'s job; read-only summaries
are built in :mod:`.reports`. Every method here is its own short transaction.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

from sqlalchemy import delete, select, update
from sqlalchemy.exc import IntegrityError

from ragkv.cache_index import reports
from ragkv.cache_index.corpus import CorpusRows, upsert_setting
from ragkv.cache_index.database import in_batches
from ragkv.cache_index.models import (
    QUERY_FIELDS,
    EntryInfo,
    KVEntry,
    QueryLog,
    Setting,
    to_info,
    utcnow,
)
from ragkv.cache_index.reports import DocumentSize, QueryTotals, TierSize, TopEntry


class CacheIndex(CorpusRows):
    """Typed access to the index database; every method is its own short transaction.

    A caller that needs a query of its own runs it in :meth:`transaction` (inherited); the
    documents' and chunks' methods are :class:`~.corpus.CorpusRows`'.
    """

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
        ids_sha256: str | None = None,
    ) -> EntryInfo | None:
        """Insert or overwrite an entry; an overwrite keeps its hit count (same key, same KV).

        Called once the blob is on disk; ``on_remote`` once it is in the remote tier too.
        ``ids_sha256``: the digest of the token ids the KV is of (kept when not given).
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
        if ids_sha256 is not None:
            fields["ids_sha256"] = ids_sha256
        # Compare-and-swap on the blob name and its tiers: two writers of one key must not
        # both replace the same row, or the blob of the one that lost would be named by no row
        # and never deleted; nor may a promotion meanwhile (the blob copied to the remote
        # tier) go unseen, or its copy would be left behind. Whoever finds the row changed
        # under it goes round.
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
                                    .where(KVEntry.key == key, KVEntry.blob_name == old.blob_name,
                                           KVEntry.on_disk == old.on_disk,
                                           KVEntry.on_remote == old.on_remote)
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
        Returns whether a row was deleted. One statement, so the condition and the delete
        see the same row."""
        query = delete(KVEntry).where(KVEntry.key == key)
        if blob is not None:
            query = query.where(KVEntry.blob_name == blob)
        with self.transaction() as s:
            return s.execute(query.execution_options(synchronize_session=False)).rowcount > 0

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

    def set_setting(self, name: str, value: str) -> None:
        """Record ``value`` under ``name``, replacing any value there (the last writer's
        stays)."""
        with self.transaction() as s:
            upsert_setting(s, name, value)

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

    def query_totals(self) -> QueryTotals:
        """The whole query log summed (:class:`.reports.QueryTotals`)."""
        with self.transaction() as s:
            return reports.query_totals(s)

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
