"""The corpus rows of the index: documents, their chunks, and the corpus version that tells
every process when the chunks changed. :class:`~.index.CacheIndex` inherits them."""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field

from sqlalchemy import bindparam, delete, select, text, tuple_, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from ragkv.anchor import ANCHOR_SETTING
from ragkv.cache_index.database import IndexDatabase, in_batches
from ragkv.cache_index.models import (
    Chunk,
    ChunkInfo,
    ChunkRecord,
    Document,
    DocumentInfo,
    EntryInfo,
    KVEntry,
    Setting,
    ids_sha256,
    to_info,
    utcnow,
)

#: The setting that names the tokenizer the corpus's chunks were tokenized with
#: (:func:`ragkv.chunking.tokenizer_identity`): their stored ids are text only to it.
TOKENIZER_SETTING = "corpus_tokenizer"

#: The setting that names the corpus's current version: a new value whenever chunks are added
#: or removed, so a process holding a retrieval index knows to rebuild it.
CORPUS_VERSION = "corpus_version"

#: A new value whenever KV entries are removed with their chunks, so that a process holding
#: memory copies (a server's connector, another app) drops those whose rows went.
REMOVAL_STAMP = "kv_removal_stamp"


def upsert_setting(s: Session, name: str, value: str) -> None:
    """Record ``value`` under ``name`` in this transaction, replacing any value there (one
    statement, so two processes writing at once leave one of their values, never an error)."""
    dialect = postgresql if s.get_bind().dialect.name == "postgresql" else sqlite
    s.execute(dialect.insert(Setting).values(name=name, value=value, created_at=utcnow())
              .on_conflict_do_update(index_elements=[Setting.name], set_={"value": value}))


def _new_corpus_version(s: Session) -> None:
    """Give the corpus a new version in the transaction that changes its chunks (two
    processes changing chunks at once both leave a version their retrievers lack)."""
    upsert_setting(s, CORPUS_VERSION, uuid.uuid4().hex)


def _chunk_info(row: Chunk, document_name: str) -> ChunkInfo:
    # JSON columns may hand back the very list the session holds; callers get their own.
    return to_info(ChunkInfo, row, document_name=document_name, token_ids=list(row.token_ids))


@dataclass(frozen=True)
class Removal:
    """What :meth:`CorpusRows.remove_documents` removed: how many documents, and the KV
    entries whose rows went with their chunks (their blobs are the caller's to delete:
    :meth:`~.store.KVStore.remove_documents`, which lists in ``undeleted`` those whose blob
    it could not delete: orphans, which ``verify`` removes)."""

    documents: int = 0
    entries: list[EntryInfo] = field(default_factory=list)
    undeleted: list[EntryInfo] = field(default_factory=list)


class DocumentGone(KeyError):
    """The document was removed while it was being written: a later version of it replaced
    it (or it was removed outright), so this version's ingestion has nothing left to do."""


class ForeignTokenizer(ValueError):
    """The corpus's chunks were tokenized by another tokenizer than the one adding to it: one
    corpus holds one tokenizer's ids."""

    def __init__(self) -> None:
        super().__init__("this cache's documents were chunked by another model's tokenizer; "
                         "ingest into another home (--home), or remove them first")


def _lock_key(name: str) -> int:
    """A document name's advisory lock (a signed 64-bit key, the same in every process)."""
    digest = hashlib.sha256(f"ragkv-document:{name}".encode()).digest()
    return int.from_bytes(digest[:8], "big", signed=True)


class CorpusRows(IndexDatabase):
    """Documents and chunks; every method is its own short transaction."""

    def add_document(self, name: str, source: str, text_sha256: str) -> tuple[int, bool]:
        """Return ``(id, created)``; re-ingesting the same text under the same name is a no-op.

        Versions of one name get ids in the order they commit (each ingestion then removes
        those of lower ids): on PostgreSQL, where ids come from a sequence at insert, a lock on
        the name serializes the inserts; SQLite has one writer at a time anyway."""
        query = select(Document.id).where(
            Document.name == name, Document.text_sha256 == text_sha256
        )
        with self.transaction() as s:
            existing = s.scalar(query)
            if existing is not None:
                return existing, False
        try:
            with self.transaction() as s:
                if s.get_bind().dialect.name == "postgresql":
                    s.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _lock_key(name)})
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

    def add_chunks(self, document_id: int, chunks: list[ChunkRecord],
                   tokenizer: str | None = None) -> list[int]:
        """Record ``chunks`` as the document's whole chunking; their ids, in the order given.
        ``tokenizer``: the identity of the tokenizer that made their ids, recorded for the
        corpus by its first chunking; another is :class:`ForeignTokenizer`.

        An existing ordinal is updated rather than skipped, ordinals not given go, and the
        document's chunk count is set, all in one transaction that first locks the document's
        row: re-chunking with other settings leaves no stale text or cache keys under the old
        ids, and of two processes chunking one document differently at once, one's chunking
        stays whole (never a mix of both, never a count that disagrees with the rows).
        A document removed meanwhile (a later version of it replaced it) is :class:`DocumentGone`.
        """
        with self.transaction() as s:
            # The write comes first so that it takes the lock (SQLite's writer lock, the row's
            # on a server) before anything is read: every read below sees the last writer's
            # rows, and the next writer waits for this one.
            locked = s.execute(update(Document).where(Document.id == document_id)
                               .values(n_chunks=len(chunks)))
            if locked.rowcount == 0:
                raise DocumentGone(document_id)
            if tokenizer is not None:
                recorded = s.get(Setting, TOKENIZER_SETTING)
                if recorded is None:
                    upsert_setting(s, TOKENIZER_SETTING, tokenizer)
                elif recorded.value != tokenizer:
                    raise ForeignTokenizer()
            existing = {
                c.ordinal: c
                for c in s.scalars(select(Chunk).where(Chunk.document_id == document_id))
            }
            rows: list[Chunk] = []
            for rec in chunks:
                row = existing.pop(rec.ordinal, None)
                if row is None:
                    row = Chunk(document_id=document_id, ordinal=rec.ordinal)
                    s.add(row)
                row.text = rec.text
                row.token_ids = [int(t) for t in rec.token_ids]
                row.n_tokens = len(rec.token_ids)
                row.cache_key = rec.cache_key
                row.embedding = rec.embedding
                row.ids_sha256 = ids_sha256(row.token_ids)
                rows.append(row)
            for stale in existing.values():  # left over from a chunking into more chunks
                s.delete(stale)
            s.flush()
            _new_corpus_version(s)
            return [row.id for row in rows]

    def remove_documents(self, name: str, *, before_id: int | None = None) -> Removal:
        """Remove the documents called ``name`` with their chunks (with ``before_id``, only
        those of a lower id: the versions ingested before it).

        The KV entries of their chunks go in the same transaction, unless a chunk left (of any
        document) has the same token ids: entries are content-addressed and shared. Entries
        stored by another process after this are left to the budgets' eviction. A removal
        that leaves no chunk also forgets the corpus anchor passage and tokenizer, so the next
        ingestion picks them for the new corpus, as into a new cache."""
        with self.transaction() as s:
            query = select(Document.id).where(Document.name == name)
            if before_id is not None:
                query = query.where(Document.id < before_id)
            doc_ids = list(s.scalars(query))
            if not doc_ids:
                return Removal()
            digests = set(s.scalars(select(Chunk.ids_sha256).where(
                Chunk.document_id.in_(doc_ids), Chunk.ids_sha256.is_not(None))))
            s.execute(delete(Chunk).where(Chunk.document_id.in_(doc_ids)))
            s.execute(delete(Document).where(Document.id.in_(doc_ids)))
            _new_corpus_version(s)
            if s.scalar(select(Chunk.id).limit(1)) is None:
                s.execute(delete(Setting).where(Setting.name.in_((ANCHOR_SETTING,
                                                                  TOKENIZER_SETTING))))
            return Removal(len(doc_ids), _unreferenced_entries(s, digests))

    def undigested_entries(self) -> bool:
        """Whether any KV entry lacks its ids' digest: one stored before schema 4, whose
        migration could digest only the entry each chunk named by its cache key."""
        with self.transaction() as s:
            return s.scalar(select(KVEntry.key).where(KVEntry.ids_sha256.is_(None))
                            .limit(1)) is not None

    def document_token_ids(self, name: str, *, before_id: int | None = None
                           ) -> list[list[int]]:
        """The token ids of every chunk of the documents called ``name`` (with ``before_id``,
        of the versions before it)."""
        query = select(Chunk.token_ids).join(Document).where(Document.name == name)
        if before_id is not None:
            query = query.where(Document.id < before_id)
        with self.transaction() as s:
            return [list(ids) for ids in s.scalars(query)]

    def digest_entries(self, digests: dict[str, str]) -> None:
        """Give the entries ``digests`` names (key -> ids digest) that have none their digest,
        so they leave with the last chunk of those ids."""
        table = KVEntry.__table__  # a Core statement run once per row (not the ORM's by-key)
        query = (update(table).where(table.c.key == bindparam("k"), table.c.ids_sha256.is_(None))
                 .values(ids_sha256=bindparam("d")))
        rows = [{"k": k, "d": d} for k, d in digests.items()]
        with self.transaction() as s:
            for batch in in_batches(rows):
                s.connection().execute(query, batch)

    def chunk_digests(self, ids: list[int]) -> set[str]:
        """The token ids' digests (``ids_sha256``) of those of the chunks ``ids`` still in the
        index, as they hold now."""
        found: set[str] = set()
        with self.transaction() as s:
            for batch in in_batches(ids):
                rows = s.scalars(select(Chunk.token_ids).where(Chunk.id.in_(batch)))
                found.update(ids_sha256(token_ids) for token_ids in rows)
        return found

    def has_document(self, document_id: int) -> bool:
        with self.transaction() as s:
            return s.get(Document, document_id) is not None

    def remove_unreferenced(self, digests: Iterable[str]) -> list[EntryInfo]:
        """Remove the KV entries of these chunk digests (``ids_sha256``) that no chunk holds
        now: the KV an ingestion computed for chunks that left the index meanwhile (a later
        version of their document, recorded by another process, replaced them)."""
        with self.transaction() as s:
            return _unreferenced_entries(s, set(digests))

    def corpus_version(self) -> str | None:
        """The corpus's current version (None before any chunk): it changes whenever chunks
        are added or removed, by any process on this index."""
        with self.transaction() as s:
            row = s.get(Setting, CORPUS_VERSION)
            return None if row is None else row.value

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


def _unreferenced_entries(s: Session, digests: set[str]) -> list[EntryInfo]:
    """Delete, in session ``s``, the KV entry rows of ``digests`` that no chunk has; the
    rows deleted, whose blobs the caller deletes."""
    entries: list[EntryInfo] = []
    for batch in in_batches(sorted(digests)):
        kept = set(s.scalars(select(Chunk.ids_sha256).where(Chunk.ids_sha256.in_(batch))))
        gone = [d for d in batch if d not in kept]
        if gone:
            rows = s.scalars(select(KVEntry).where(KVEntry.ids_sha256.in_(gone)))
            entries.extend(to_info(EntryInfo, row) for row in rows)
    # by key and blob: a row another process re-put meanwhile names a new blob it keeps (the
    # blob read here is then an orphan, which the re-put deletes)
    for batch in in_batches([(e.key, e.blob_name) for e in entries]):
        s.execute(delete(KVEntry).where(tuple_(KVEntry.key, KVEntry.blob_name).in_(batch))
                  .execution_options(synchronize_session=False))
    if entries:  # every process's memory tier checks its copies again (KVStore.fetch)
        upsert_setting(s, REMOVAL_STAMP, uuid.uuid4().hex)
    return entries
