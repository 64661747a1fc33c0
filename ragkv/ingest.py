"""Ingestion (documents → chunks → stored KV) and retrieval over the ingested chunks."""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from ragkv.cache_index.corpus import TOKENIZER_SETTING, DocumentGone, ForeignTokenizer, Removal
from ragkv.cache_index.models import ChunkRecord, ids_sha256
from ragkv.chunking import RetrievedChunk, chunk_text, tokenize_chunk
from ragkv.config import INGESTED_CONTEXT

if TYPE_CHECKING:
    from ragkv.cache_index import CacheIndex, KVStore
    from ragkv.config import RagkvConfig
    from ragkv.documents import Skipped
    from ragkv.engine.base import Backend


class Ingesting(Protocol):
    """What ingestion and retrieval need of the facade (:class:`ragkv.api.RagKV`)."""

    config: RagkvConfig
    index: CacheIndex
    tokenizer: Any
    #: :func:`ragkv.chunking.tokenizer_identity` of ``tokenizer``
    tokenizer_identity: str
    _retrieval: Any
    _embedder: Any
    backend: Backend

    def key_for(self, token_ids: Sequence[int]) -> str: ...

    def precompute_many(self, chunks: Sequence[Sequence[int]]) -> list[bool]: ...

    def choose_anchor(self, texts: Sequence[str]) -> str | None: ...

    def remove_document(self, name: str) -> bool: ...

    def _remove_documents(self, name: str, before_id: int | None = None) -> Removal: ...

    def _removals(self) -> KVStore: ...

TEXT_SUFFIXES = (".txt", ".md", ".markdown", ".rst")

#: Called as a document's ingestion moves: ``(stage, done, total)``, where the stage is
#: "chunking" (characters done), "embedding" or "precomputing" (chunks done).
Progress = Callable[[str, int, int], None]


def progress_text(stage: str, done: int, total: int) -> str:
    """How far a stage is, in words: "chunking (45%)", "embedding (3/10 chunks)"."""
    moved = f"{done / max(total, 1):.0%}" if stage == "chunking" else f"{done}/{total} chunks"
    return f"{stage} ({moved})"


#: A long document's chunks are embedded this many at a time, so that its progress moves (at
#: one thread the embedder reads ~3-4 chunks a second: minutes for a few MB of text).
EMBED_GROUP = 256
#: Chunks handed to the engine at once: enough for it to batch, few enough for a live bar.
PRECOMPUTE_BATCH = 8


@dataclass
class IngestResult:
    document_id: int
    name: str
    n_chunks: int
    precomputed: int  # chunks whose KV had to be computed (0 on a second run)
    new_document: bool
    #: tokens of the chunks computed now (their sum is what precompute throughput divides)
    precomputed_tokens: int = 0
    #: earlier versions of the document (same name, other text) removed by this ingestion
    replaced: int = 0
    #: a later version, ingested by another process at the same time, replaced this one
    superseded: bool = False
    #: chunks whose KV was computed but could not be stored (a full or unwritable blob store:
    #: the store logged why); their first query computes them again
    unstored: int = 0


def require_own_tokenizer(rag: Ingesting) -> None:
    """:class:`ForeignTokenizer` unless the corpus is empty or was tokenized by ``rag``'s
    tokenizer: stored ids are text only to the tokenizer that made them."""
    if rag.index.setting(TOKENIZER_SETTING) not in (None, rag.tokenizer_identity):
        raise ForeignTokenizer()


def ingest_text(rag: Ingesting, name: str, text: str, source: str = "",
                progress: Progress | None = None) -> IngestResult:
    """Chunk, embed, record and precompute one document. Idempotent on (name, text); a new
    text under a known name replaces the earlier version (its chunks leave retrieval), and of
    two processes ingesting versions at once the later-recorded one stays.

    Chunk KV goes to the engine in batches (it may prefill several chunks per forward pass);
    ``progress`` is called as each stage moves (:data:`Progress`)."""
    if not text.strip():
        raise ValueError(f"document {name!r} is empty")
    sha = hashlib.sha256(text.encode()).hexdigest()
    index = rag.index
    require_own_tokenizer(rag)  # before anything is written (and again as chunks are)
    doc_id, created = index.add_document(name, source or name, sha)
    infos = [] if created else index.chunks(document_id=doc_id)  # not every chunk: a rerun
    if not infos:  # new, or recorded by a run that stopped before its chunks were
        rag.choose_anchor([text])  # the cache's first document picks it; chunk keys name it
        chunks = chunk_text(text, rag.tokenizer, rag.config.chunk_tokens,
                            progress and functools.partial(progress, "chunking"))
        vectors = _embed(rag, [c.text for c in chunks], progress)
        from ragkv.connectors.retrieval import vector_to_bytes

        records = [ChunkRecord(i, c.text, c.token_ids, rag.key_for(c.token_ids),
                               vector_to_bytes(vec))
                   for i, (c, vec) in enumerate(zip(chunks, vectors, strict=True))]
        try:
            ids = index.add_chunks(doc_id, records, rag.tokenizer_identity)
        except DocumentGone:  # another process recorded a later version meanwhile: it stays
            return IngestResult(doc_id, name, 0, 0, created, 0, superseded=True)
        infos = index.chunks(ids)
    # after the new version's chunks are in, so the name is never without one; a rerun after
    # a crash between the two removes what is left
    replaced = rag._remove_documents(name, before_id=doc_id).documents
    stored = []  # the chunks whose KV this run computed and stored
    unstored = 0
    for start in range(0, len(infos), PRECOMPUTE_BATCH):
        if not index.has_document(doc_id):  # a later version replaced this one meanwhile
            break
        batch = infos[start:start + PRECOMPUTE_BATCH]
        computed = rag.precompute_many([c.token_ids for c in batch])
        stored += [c for c, new in zip(batch, computed, strict=True) if new]
        held = [rag.key_for(c.token_ids) for c, new in zip(batch, computed, strict=True)
                if not new]
        unstored += sum(not there for there in rag.backend.stored(held).values())
        if progress:
            progress("precomputing", start + len(batch), len(infos))
    # Of those, chunks that left meanwhile (a later version replaced them): their KV, stored
    # after that removal, would stay with no chunk to reach it, so it goes now.
    if stored:
        left = ({ids_sha256(c.token_ids) for c in stored}
                - index.chunk_digests([c.id for c in stored]))
        if left:
            rag._removals().remove_unreferenced(left)
    if not index.has_document(doc_id):
        return IngestResult(doc_id, name, 0, 0, created, 0, replaced, superseded=True)
    if created or stored:  # the context a query reads by default (RagKV.as_ingested)
        index.set_setting(INGESTED_CONTEXT, rag.config.precompute_context)
    return IngestResult(doc_id, name, len(infos), len(stored), created,
                        sum(len(c.token_ids) for c in stored), replaced, unstored=unstored)


def stored_texts(rag: Ingesting) -> dict[str, set[str]]:
    """Each stored document's name and the digests of its stored texts."""
    stored: dict[str, set[str]] = {}
    for d in rag.index.documents():
        stored.setdefault(d.name, set()).add(d.text_sha256)
    return stored


def drop_duplicates(rag: Ingesting, skipped: Sequence[Skipped]) -> list[tuple[str, str]]:
    """Files skipped as duplicates of another file's text, whose earlier, other text the
    index holds: that version goes (an edited file replaces its earlier version, and the new
    text is in under the other file's name). A file whose text did not change stays, even when
    another file was edited to hold the same text. ``(name, other file)`` for each."""
    stored = stored_texts(rag)
    gone = [(s.path, s.duplicate_of) for s in skipped
            if s.duplicate_of is not None and s.path in stored
            and stored[s.path] != {s.sha256}]
    for name, _ in gone:
        rag.remove_document(name)
    return gone


def iter_text_files(paths: Iterable[Path]) -> Iterator[Path]:
    """Text/markdown files under ``paths`` (files as given, folders recursively, sorted)."""
    for p in paths:
        p = Path(p)
        if p.is_dir():
            yield from sorted(f for f in p.rglob("*") if f.is_file()
                              and f.suffix.lower() in TEXT_SUFFIXES)
        elif p.is_file():
            yield p
        else:
            raise FileNotFoundError(f"no such file or folder: {p}")


def read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError(f"{path} is not UTF-8 text") from exc


def pydoc_topics(names: Iterable[str] | None = None) -> list[tuple[str, str]]:
    """Python's own documentation topics (``pydoc_data.topics``), on every Python."""
    from pydoc_data.topics import topics

    chosen = sorted(topics) if names is None else list(names)
    return [(f"pydoc:{n}", topics[n]) for n in chosen]


def _mark(embedding: bytes | memoryview | None) -> int:
    """A stored embedding's fingerprint (a driver may hand bytes or a memoryview)."""
    return hash(None if embedding is None else bytes(embedding))


class _Retrieval:
    """FAISS index over every chunk's stored embedding, as of one corpus version."""

    def __init__(self, rag: Ingesting) -> None:
        from ragkv.connectors.retrieval import build_retriever

        # read before the rows: a change while they are read leaves a version this lacks
        self.version = rag.index.corpus_version()
        ids, embeddings = rag.index.chunk_embeddings()
        # what each id held: a row read later under the same id is the same chunk only if its
        # embedding is (SQLite gives a new row the id of the last one removed)
        self.marks = {i: _mark(e) for i, e in zip(ids, embeddings, strict=True)}
        self.faiss = build_retriever(ids, embeddings)
        # chunks tokenized by another model's tokenizer (a home shared by two models): their
        # stored ids would be other tokens here, so their text is tokenized again
        self.retokenize = rag.index.setting(TOKENIZER_SETTING) not in (None, rag.tokenizer_identity)


def _embed(rag: Ingesting, texts: list[str], progress: Progress | None) -> Any:
    """``[n, dim]`` embeddings of ``texts``, :data:`EMBED_GROUP` at a time."""
    import numpy as np

    if not texts:  # a text of characters the tokenizer drops has no chunk
        return _embedder(rag).embed([])
    parts = []
    for start in range(0, len(texts), EMBED_GROUP):
        parts.append(_embedder(rag).embed(texts[start:start + EMBED_GROUP]))
        if progress:
            progress("embedding", min(start + EMBED_GROUP, len(texts)), len(texts))
    return np.concatenate(parts) if len(parts) > 1 else parts[0]


def _embedder(rag: Ingesting):
    emb = rag._embedder
    if emb is None:
        from ragkv.connectors.retrieval import Embedder

        emb = rag._embedder = Embedder()
    return emb


#: Searches one retrieval makes while other processes keep changing the corpus under it.
RETRIEVAL_TRIES = 3


def retrieve(rag: Ingesting, question: str, k: int) -> list[RetrievedChunk]:
    if k < 1:
        raise ValueError("k must be >= 1")
    query = _embedder(rag).embed([question])[0]
    for _ in range(RETRIEVAL_TRIES):
        # any process's ingestion or removal gives the corpus a new version: rebuild then
        if rag._retrieval is None or rag._retrieval.version != rag.index.corpus_version():
            rag._retrieval = _Retrieval(rag)
        if len(rag._retrieval.faiss) == 0:
            return []
        hits = rag._retrieval.faiss.search(query, k)
        infos = {c.id: c for c in rag.index.chunks([i for i, _ in hits])}
        # Rows read after a change to the corpus may be other chunks under the ids searched
        # (SQLite gives a new row the id of the last one removed): searched again then.
        if rag.index.corpus_version() == rag._retrieval.version:
            break
    # (after as many changes in a row, a chunk removed or replaced meanwhile is left out)
    marks, retokenize = rag._retrieval.marks, rag._retrieval.retokenize
    found = [(c, score) for i, score in hits
             if (c := infos.get(i)) is not None and _mark(c.embedding) == marks.get(i)]
    out = []
    for c, score in found:
        ids = tokenize_chunk(c.text, rag.tokenizer) if retokenize else c.token_ids
        out.append(RetrievedChunk(ids, rag.key_for(ids), c.text, c.id, c.document_name, score))
    return out
