"""Read-only summaries of the index for the UI and the CLI, as plain rows.

Each function runs inside a transaction the caller opened (the public entry points are the
:class:`~.index.CacheIndex` methods of the same names), and returns dicts of Python scalars,
so no ORM object or SQLAlchemy type reaches a caller; the UI only shapes them into frames.
"""

from __future__ import annotations

from typing import Any, TypedDict

from sqlalchemy import func, or_, select
from sqlalchemy.orm import Session

from ragkv.cache_index.database import in_batches
from ragkv.cache_index.models import (
    SCHEMA_VERSION,
    TIER_FLAGS,
    Chunk,
    Document,
    KVEntry,
    QueryLog,
    tier_flag,
)


class TierSize(TypedDict):
    """What one persistent tier holds, by the index's account."""

    tier: str  # "disk" or "remote"
    entries: int
    kv_bytes: int


class DocumentSize(TypedDict):
    """Stored KV of one document's chunks."""

    document_id: int
    document: str  # its name
    chunks: int
    kv_bytes: int  # chunks without an entry add 0; an entry shared by two documents counts in both


class TopEntry(TypedDict):
    """A reused KV entry and one chunk that uses it (None when no chunk names its key)."""

    key: str
    hits: int
    n_tokens: int
    document: str | None
    ordinal: int | None
    text: str | None


def tier_size(s: Session, tier: str) -> tuple[int, int]:
    """``(entries, bytes)`` whose row says ``tier`` holds them; ValueError for no such tier."""
    n, total = s.execute(select(func.count(KVEntry.key),
                                func.coalesce(func.sum(KVEntry.nbytes), 0))
                         .where(tier_flag(tier).is_(True))).one()
    return int(n), int(total)


def tier_sizes(s: Session) -> list[TierSize]:
    out: list[TierSize] = []
    for tier in TIER_FLAGS:
        n, total = tier_size(s, tier)
        out.append({"tier": tier, "entries": n, "kv_bytes": total})
    return out


def document_sizes(s: Session) -> list[DocumentSize]:
    # Every entry holding a chunk's KV (any context, model or dtype: by the ids' digest; by
    # the chunk's key for entries stored before the digest), once per document.
    held = (select(Chunk.document_id.label("doc"), KVEntry.key, KVEntry.nbytes)
            .join(KVEntry, or_(KVEntry.key == Chunk.cache_key,
                               KVEntry.ids_sha256 == Chunk.ids_sha256))
            .distinct().subquery())
    kv = dict(s.execute(select(held.c.doc, func.sum(held.c.nbytes)).group_by(held.c.doc)).all())
    # Inner join on chunks: a document with no chunks (yet) has no KV to show.
    q = (select(Document.id, Document.name, func.count(Chunk.id))
         .join(Chunk, Chunk.document_id == Document.id)
         .group_by(Document.id, Document.name)
         .order_by(Document.id))
    return [{"document_id": int(doc_id), "document": name, "chunks": int(n),
             "kv_bytes": int(kv.get(doc_id) or 0)}
            for doc_id, name, n in s.execute(q).all()]


def top_entries(s: Session, limit: int) -> list[TopEntry]:
    entries = s.execute(select(KVEntry.key, KVEntry.hits, KVEntry.n_tokens, KVEntry.ids_sha256)
                        .where(KVEntry.hits > 0)
                        .order_by(KVEntry.hits.desc(), KVEntry.key).limit(limit)).all()
    by_key: dict[str, tuple[str, int, str]] = {}
    by_ids: dict[str, tuple[str, int, str]] = {}
    q = (select(Chunk.cache_key, Chunk.ids_sha256, Document.name, Chunk.ordinal, Chunk.text)
         .join(Document, Chunk.document_id == Document.id)
         .order_by(Chunk.id))  # a shared entry is shown under its first-stored chunk
    digests = [e.ids_sha256 for e in entries if e.ids_sha256 is not None]
    for column, values in ((Chunk.cache_key, [e.key for e in entries]),
                           (Chunk.ids_sha256, digests)):
        for batch in in_batches(values):
            for key, digest, name, ordinal, text in s.execute(q.where(column.in_(batch))).all():
                by_key.setdefault(key, (name, int(ordinal), text))
                if digest is not None:
                    by_ids.setdefault(digest, (name, int(ordinal), text))
    out: list[TopEntry] = []
    for key, hits, n_tokens, digest in entries:
        name, ordinal, text = by_key.get(key) or by_ids.get(digest) or (None, None, None)
        out.append({"key": key, "hits": int(hits), "n_tokens": int(n_tokens),
                    "document": name, "ordinal": ordinal, "text": text})
    return out


class QueryTotals(TypedDict):
    """The whole query log summed: what a page showing only its latest queries adds up."""

    queries: int
    hits: int
    misses: int
    paired: int  # non-full queries logged with full prefill's TTFT on their prompt
    saved_s: float  # their full-prefill TTFT minus their TTFT, summed


def query_totals(s: Session) -> QueryTotals:
    paired = (QueryLog.full_ttft_s.is_not(None)) & (QueryLog.mode != "full")
    n, hits, misses = s.execute(select(
        func.count(QueryLog.id), func.coalesce(func.sum(QueryLog.hits), 0),
        func.coalesce(func.sum(QueryLog.misses), 0))).one()
    pairs, saved = s.execute(select(
        func.count(QueryLog.id),
        func.coalesce(func.sum(QueryLog.full_ttft_s - QueryLog.ttft_s), 0.0)).where(paired)).one()
    return {"queries": int(n), "hits": int(hits), "misses": int(misses), "paired": int(pairs),
            "saved_s": float(saved)}


def overview(s: Session, index_url: str) -> dict[str, Any]:
    kv_n, kv_bytes, kv_tokens = s.execute(
        select(
            func.count(KVEntry.key),
            func.coalesce(func.sum(KVEntry.nbytes), 0),
            func.coalesce(func.sum(KVEntry.n_tokens), 0),
        )
    ).one()
    # Hits of chunks' entries: not of the template prefix's or the anchor passage's, whose
    # ids no chunk has (read by every query, they made this one more per query than the
    # query log's hits); an entry stored without its ids' digest may be a chunk's, so counts.
    of_chunks = KVEntry.ids_sha256.is_(None) | KVEntry.ids_sha256.in_(
        select(Chunk.ids_sha256).where(Chunk.ids_sha256.is_not(None)))
    kv_hits = s.scalar(select(func.coalesce(func.sum(KVEntry.hits), 0)).where(of_chunks))
    return {
        "documents": s.scalar(select(func.count(Document.id))) or 0,
        "chunks": s.scalar(select(func.count(Chunk.id))) or 0,
        "kv_entries": int(kv_n),
        "kv_bytes": int(kv_bytes),
        "kv_tokens": int(kv_tokens),
        "queries": s.scalar(select(func.count(QueryLog.id))) or 0,
        "chunk_hits": int(kv_hits),
        "index_url": index_url,
        "schema_version": SCHEMA_VERSION,
    }
