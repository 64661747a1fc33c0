"""ORM tables of the cache index and the plain records that leave it.

The ORM classes stay inside :mod:`ragkv.cache_index`; callers get frozen dataclasses instead, so
no detached-instance or lazy-load surprises leak out of a closed session, and a later migration
(Alembic) can change the tables without touching callers.

All timestamps are naive UTC: SQLite keeps no time zone, so storing aware datetimes would come
back naive anyway and mixing the two would break comparisons.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass, fields
from datetime import UTC, datetime
from typing import Any, TypeVar

from sqlalchemy import (
    JSON,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Integer,
    LargeBinary,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import (
    DeclarativeBase,
    InstrumentedAttribute,
    Mapped,
    mapped_column,
    relationship,
)

#: Bumped by hand whenever the tables change, together with a new Alembic revision in
#: ``migrations/versions/`` (``tests/test_migrations.py`` fails until the two agree).
#: 2: kv_entries.priority / on_disk / on_remote and the eviction_clock table (tiers, budgets).
#: 3: the settings table (the corpus anchor passage).
#: 4: chunks.ids_sha256 and kv_entries.ids_sha256 (a removed chunk's KV leaves with it).
#: 5: queries.engine (which engine and model answered: TTFTs compare within one).
SCHEMA_VERSION = 5
#: the longest document name and source the index keeps (PostgreSQL enforces the column
#: lengths, SQLite does not: ingestion checks them on every database alike)
NAME_CHARS, SOURCE_CHARS = 512, 2048


def ids_sha256(token_ids: Sequence[int]) -> str:
    """Digest of a span's token ids alone: one value for a chunk and for every entry that
    holds its KV, whatever the model, context or dtype (which the entry's key also names)."""
    blob = json.dumps([int(t) for t in token_ids], separators=(",", ":")).encode()
    return hashlib.sha256(blob).hexdigest()


def utcnow() -> datetime:
    """Naive UTC now (see module docstring for why naive)."""
    return datetime.now(UTC).replace(tzinfo=None)


class Base(DeclarativeBase):
    pass


class SchemaVersion(Base):
    """One row: the schema version the tables are at (kept current after each migration)."""

    __tablename__ = "schema_version"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    version: Mapped[int] = mapped_column(Integer)
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)


class Document(Base):
    __tablename__ = "documents"
    # The same name with a changed text is a new document; the same text re-ingested is not.
    __table_args__ = (UniqueConstraint("name", "text_sha256", name="uq_documents_name_sha"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(NAME_CHARS))
    source: Mapped[str] = mapped_column(String(SOURCE_CHARS), default="")
    text_sha256: Mapped[str] = mapped_column(String(64))
    n_chunks: Mapped[int] = mapped_column(Integer, default=0)
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)

    chunks: Mapped[list[Chunk]] = relationship(
        back_populates="document", cascade="all, delete-orphan", passive_deletes=True
    )


class Chunk(Base):
    __tablename__ = "chunks"
    __table_args__ = (UniqueConstraint("document_id", "ordinal", name="uq_chunks_doc_ordinal"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    document_id: Mapped[int] = mapped_column(
        ForeignKey("documents.id", ondelete="CASCADE"), index=True
    )
    ordinal: Mapped[int] = mapped_column(Integer)
    text: Mapped[str] = mapped_column(Text)
    token_ids: Mapped[list[int]] = mapped_column(JSON)
    n_tokens: Mapped[int] = mapped_column(Integer)
    # Not unique: identical chunks in two documents share one KV entry.
    cache_key: Mapped[str] = mapped_column(String(64), index=True)
    embedding: Mapped[bytes | None] = mapped_column(LargeBinary, nullable=True)
    # ids_sha256(token_ids): which KV entries hold this chunk's KV (null only in rows written
    # by code before schema 4 after the migration ran)
    ids_sha256: Mapped[str | None] = mapped_column(String(64), nullable=True, index=True)

    document: Mapped[Document] = relationship(back_populates="chunks")


class KVEntry(Base):
    __tablename__ = "kv_entries"

    key: Mapped[str] = mapped_column(String(64), primary_key=True)
    model_fp: Mapped[str] = mapped_column(String(64))
    layout: Mapped[str] = mapped_column(String(128))
    n_tokens: Mapped[int] = mapped_column(Integer)
    nbytes: Mapped[int] = mapped_column(Integer)
    blob_name: Mapped[str] = mapped_column(String(512))
    checksum: Mapped[str] = mapped_column(String(64))
    dtype: Mapped[str] = mapped_column(String(32))
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
    # Non-null from creation on, so LRU eviction can order by it without NULL handling.
    last_access_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow, index=True)
    hits: Mapped[int] = mapped_column(Integer, default=0)
    # Eviction order of the persistent tiers, lowest first: the configured policy's value
    # (PGDSF: clock + hits * tokens / bytes; LRU: last access time), kept in the row so a
    # budget pass is one indexed scan instead of scoring every entry in Python.
    priority: Mapped[float] = mapped_column(Float, default=0.0, index=True)
    # Which persistent tiers hold the blob. A row stays while either is true, so an entry
    # evicted from local disk but still remote is found (and promoted) instead of recomputed.
    on_disk: Mapped[bool] = mapped_column(Boolean, default=True)
    on_remote: Mapped[bool] = mapped_column(Boolean, default=False)
    # ids_sha256 of the span this entry holds the KV of: when the last chunk with those ids
    # is removed, the entry goes with it. Null for entries stored before schema 4 that the
    # migration could not match to a chunk, until their document leaves (RagKV digests them).
    ids_sha256: Mapped[str | None] = mapped_column(String(64), nullable=True, index=True)


#: The column saying whether each persistent tier holds an entry's blob, fastest tier first.
TIER_FLAGS: dict[str, InstrumentedAttribute[bool]] = {
    "disk": KVEntry.on_disk,
    "remote": KVEntry.on_remote,
}


def tier_flag(tier: str) -> InstrumentedAttribute[bool]:
    """The ``on_<tier>`` column; ValueError for a tier that is not persistent (memory is per
    process and has no column)."""
    try:
        return TIER_FLAGS[tier]
    except KeyError:
        raise ValueError(f"not a persistent tier: {tier!r}") from None


class EvictionClock(Base):
    """One row: PGDSF's clock, the priority of the last entry evicted from a persistent tier.

    Shared through the index because eviction (``ragkv cache gc``) and the entries it ranks
    may come from different processes; new entries start at this clock, not at zero.
    """

    __tablename__ = "eviction_clock"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    value: Mapped[float] = mapped_column(Float, default=0.0)


class Setting(Base):
    """A value the cache was built with that every process on it must share (e.g. the corpus
    anchor passage chunks are precomputed after); written once, never changed. One row alone
    changes: the corpus version (``corpus.CORPUS_VERSION``), new whenever chunks change."""

    __tablename__ = "settings"

    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    value: Mapped[str] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)


class QueryLog(Base):
    __tablename__ = "queries"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow, index=True)
    question: Mapped[str] = mapped_column(Text)
    mode: Mapped[str] = mapped_column(String(32))
    ratio: Mapped[float | None] = mapped_column(Float, nullable=True)
    n_chunks: Mapped[int] = mapped_column(Integer, default=0)
    hits: Mapped[int] = mapped_column(Integer, default=0)
    misses: Mapped[int] = mapped_column(Integer, default=0)
    context_tokens: Mapped[int] = mapped_column(Integer, default=0)
    recomputed_tokens: Mapped[int] = mapped_column(Integer, default=0)
    ttft_s: Mapped[float] = mapped_column(Float, default=0.0)
    full_ttft_s: Mapped[float | None] = mapped_column(Float, nullable=True)
    retrieval_s: Mapped[float | None] = mapped_column(Float, nullable=True)
    answer: Mapped[str] = mapped_column(Text, default="")
    #: ``QueryTrace.engine`` (engine, model, device, dtype); None in rows older than schema 5
    engine: Mapped[str | None] = mapped_column(Text, nullable=True)


#: Columns a caller may pass to ``CacheIndex.log_query``.
QUERY_FIELDS: tuple[str, ...] = tuple(
    c.name for c in QueryLog.__table__.columns if c.name not in ("id", "created_at")
)


@dataclass(frozen=True, slots=True)
class ChunkRecord:
    """A chunk as the ingester produced it, before it has an id."""

    ordinal: int
    text: str
    token_ids: list[int]
    cache_key: str
    embedding: bytes | None = None


@dataclass(frozen=True, slots=True)
class DocumentInfo:
    id: int
    name: str
    source: str
    n_chunks: int
    created_at: datetime
    text_sha256: str = ""


@dataclass(frozen=True, slots=True)
class ChunkInfo:
    id: int
    document_id: int
    document_name: str
    ordinal: int
    text: str
    token_ids: list[int]
    n_tokens: int
    cache_key: str
    embedding: bytes | None


@dataclass(frozen=True, slots=True)
class EntryInfo:
    key: str
    model_fp: str
    layout: str
    n_tokens: int
    nbytes: int
    blob_name: str
    checksum: str
    dtype: str
    created_at: datetime
    last_access_at: datetime
    hits: int
    priority: float
    on_disk: bool
    on_remote: bool
    ids_sha256: str | None = None


_Info = TypeVar("_Info", DocumentInfo, ChunkInfo, EntryInfo)


def to_info(cls: type[_Info], row: Base, **extra: Any) -> _Info:
    """Copy an ORM row into its record type, field by name, so the two cannot drift apart
    silently (a renamed column fails here, loudly)."""
    values = {f.name: getattr(row, f.name) for f in fields(cls) if f.name not in extra}
    return cls(**values, **extra)
