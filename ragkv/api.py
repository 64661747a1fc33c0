"""The public facade: one object that ingests, retrieves and answers with fused chunk KV.

It runs on any engine of the contract (:mod:`ragkv.engine.base`): transformers in process,
vLLM in process, or a vLLM server by URL, chosen by ``RagkvConfig.engine``. Retrieval and the
document index stay in this process; precompute and fusion go to the engine.

TTFT follows docs/design.md §3.7: it runs from the request (question + chunk keys) to the
first token and includes index lookup, blob loading, computing chunks that missed, and fusion.
Retrieval is timed separately.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import replace
from typing import TYPE_CHECKING

from ragkv.anchor_keeper import AnchorKeeper
from ragkv.answer import Answer, TokenStream
from ragkv.cache_index import CacheIndex
from ragkv.cache_index.corpus import Removal
from ragkv.cache_index.database import brief
from ragkv.cache_index.models import NAME_CHARS, SOURCE_CHARS
from ragkv.checks import chunk_list, seconds, whole
from ragkv.chunking import CHUNK_SPREAD, RetrievedChunk, tokenizer_identity
from ragkv.config import (
    ENGINE_SETTINGS,
    INGESTED_CONTEXT,
    PRECOMPUTE_CONTEXTS,
    BlendConfig,
    RagkvConfig,
)
from ragkv.engine.base import Backend, GenerationRequest
from ragkv.prompt import PromptTemplate, check_question, require_str
from ragkv.trace import ChunkTrace, QueryTrace

if TYPE_CHECKING:
    from ragkv.cache_index import KVStore

log = logging.getLogger("ragkv")
#: answer tokens a query asks for unless told (and room ingestion keeps for them)
DEFAULT_ANSWER_TOKENS = 64

__all__ = ["Answer", "RagKV", "RetrievedChunk", "TokenStream"]


def pack(template: PromptTemplate, chunks: list[RetrievedChunk], question: str,
         window: int) -> tuple[list[RetrievedChunk], list[RetrievedChunk]]:
    """The chunks that fit ``window`` positions with the template and the question, taken in
    rank order (one too long for what is left is skipped, a later shorter one may still fit),
    and those left out. Raises ValueError when not even one chunk fits."""
    fixed = len(template.prefix_ids) + len(template.suffix_ids(question))
    if fixed >= window:
        raise ValueError(f"the question and the prompt template take {fixed} tokens: no room "
                         f"for context in the model's window ({window} tokens left after the "
                         "answer budget)")
    kept, left, used = [], [], fixed
    for c in chunks:
        need = len(c.token_ids) + (len(template.sep_ids) if kept else 0)
        if used + need <= window:
            kept.append(c)
            used += need
        else:
            left.append(c)
    if chunks and not kept:
        raise ValueError(f"not even one retrieved chunk fits the model's window ({window} "
                         f"tokens after the answer budget; the shortest chunk needs "
                         f"{fixed + min(len(c.token_ids) for c in chunks)})")
    return kept, left

class RagKV:
    """ingest → precompute → store → retrieve → fuse → answer, on one engine and one cache.

    config.engine picks the engine (``hf``, ``vllm`` or a server URL); ``backend`` hands in an
    engine that is already open, ``engine`` a loaded transformers model to wrap.
    """

    def __init__(self, config: RagkvConfig | None = None, *, backend: Backend | None = None,
                 engine=None) -> None:
        from ragkv.engine.registry import open_backend

        self.config = config or RagkvConfig()
        if not isinstance(self.config, RagkvConfig):
            raise TypeError(f"config must be a RagkvConfig, got {type(self.config).__name__}")
        self.index = CacheIndex(self.config.resolved_index_url)
        self.backend: Backend = backend or open_backend(self.config, self.index, engine)
        self._owner: RagKV | None = None  # the facade whose engine and index this one shares
        self._closed = False
        self._retrieval = None  # built lazily: ragkv.connectors.retrieval
        self._embedder = None
        self._kv_store: KVStore | None = None  # for removals (built lazily)
        self._tokenizer_identity: str | None = None
        self._anchor = AnchorKeeper(self.config, self.index, self.backend)

    def with_config(self, **changes) -> RagKV:
        """Another facade on the same engine with some settings changed: the precompute
        context, the blend, the chunk size. Settings the engine was built with (the model,
        its template and anchor passage, where and how KV is stored) cannot change here; a
        change to one is a ValueError, since the engine would go on with the old value."""
        self._require_open()
        config = replace(self.config, **changes)  # checked, and normalized (a str home a Path)
        fixed = [name for name in ENGINE_SETTINGS
                 if name in changes and getattr(config, name) != getattr(self.config, name)]
        if fixed:
            raise ValueError(f"{', '.join(fixed)} is fixed when the engine is built; open a new "
                             f"RagKV with the other value")
        other = RagKV.__new__(RagKV)  # this one's engine and index: nothing new to open
        other.__dict__.update(self.__dict__, config=config, _owner=self._owner or self,
                              _retrieval=None, _embedder=None, _kv_store=None,
                              _anchor=AnchorKeeper(config, self.index, self.backend))
        return other

    def as_ingested(self) -> RagKV:
        """This facade, or one on the same engine that reads chunk KV in the precompute
        context the cache's last ingestion stored (another context's entries would all
        miss); what the CLI's ``ask`` and the UI use unless told a context."""
        ingested = self.index.setting(INGESTED_CONTEXT)
        if ingested in PRECOMPUTE_CONTEXTS and ingested != self.config.precompute_context:
            return self.with_config(precompute_context=ingested)
        return self

    def choose_anchor(self, texts: Sequence[str], record: bool = True) -> str | None:
        """With ``anchor`` precompute and ``anchor_source="corpus"``: the passage the cache's
        chunks are precomputed after, picked from ``texts`` (:func:`ragkv.anchor.
        corpus_anchor`) and recorded in the index if none is yet; the recorded one otherwise.
        Ingestion calls it before it precomputes anything; hand it the whole corpus when you
        have it. ``record=False`` (the benchmark) picks from ``texts`` whatever the index
        holds and records nothing. None: the engine keeps its passage (a fixed
        ``anchor_text``, the neutral one, or a corpus too short)."""
        self._require_open()
        if isinstance(texts, str | bytes) or not isinstance(texts, Sequence):
            raise TypeError(f"texts must be a list of the corpus's texts, got "
                            f"{type(texts).__name__}")
        for i, text in enumerate(texts):
            require_str(text, f"text {i}")
        return self._anchor.choose(texts, record)

    # ---- keys and KV --------------------------------------------------------------------
    @property
    def tokenizer(self):
        return self.backend.tokenizer

    @property
    def template(self):
        return self.backend.template

    @property
    def tokenizer_identity(self) -> str:
        """:func:`ragkv.chunking.tokenizer_identity` of the engine's tokenizer (hashed once)."""
        if self._tokenizer_identity is None:
            self._tokenizer_identity = tokenizer_identity(self.tokenizer)
        return self._tokenizer_identity

    @property
    def fingerprint(self) -> str:
        """Identity of the engine's weights, as its cache keys record it."""
        return self.backend.keys.fingerprint

    def key_for(self, token_ids: Sequence[int]) -> str:
        return self.backend.keys.chunk(token_ids, self.config.precompute_context)

    def precompute(self, token_ids: str | Sequence[int]) -> bool:
        """Make sure a chunk's KV is stored (its token ids, or its text); returns True if it
        had to be computed."""
        return self.precompute_many([token_ids])[0]

    def precompute_many(self, chunks: Sequence[RetrievedChunk | str | Sequence[int]]
                        ) -> list[bool]:
        """Store every chunk's KV (a retrieved chunk, its text or its token ids) through the
        engine; True where it was computed now."""
        self._require_open()
        chunks = chunk_list(chunks, (RetrievedChunk,))
        if not chunks:
            return []
        ids = [self._retrieved(c, i).token_ids for i, c in enumerate(chunks)]
        self._anchor.adopt()
        return self.backend.precompute(ids, self.config.precompute_context)

    def _retrieved(self, chunk: RetrievedChunk | str | Sequence[int], i: int) -> RetrievedChunk:
        """A chunk as handed to :meth:`generate`: a retriever's, its text, or its ids."""
        if isinstance(chunk, RetrievedChunk):
            if isinstance(chunk.token_ids, str | bytes):
                raise TypeError(f"chunk {i}: a RetrievedChunk's token_ids are the chunk's ids, "
                                f"got text; hand in the text itself, or RetrievedChunk(ids, "
                                f"key, text=...)")
            self.template.chunk_ids(chunk.token_ids, i)
            return chunk
        text = chunk if isinstance(chunk, str) else ""
        return RetrievedChunk(self.template.chunk_ids(chunk, i), "", text=text)

    # ---- ingestion and retrieval --------------------------------------------------------
    def ingest_text(self, name: str, text: str, source: str = "", progress=None):
        """Chunk, embed, record and precompute one document (``ingest.ingest_text``);
        ``progress(stage, done, total)`` is called as chunking, embedding and precomputing
        move."""
        from ragkv.ingest import ingest_text

        self._require_open()
        require_str(name, "the document's name")
        require_str(text, f"document {name!r}")
        require_str(source, "the document's source")
        for what, value, most in (("name", name, NAME_CHARS),
                                  ("source", source or name, SOURCE_CHARS)):
            if len(value) > most:
                raise ValueError(f"the document's {what} is {len(value):,} characters; the "
                                 f"cache index keeps at most {most:,}")
        if progress is not None and not callable(progress):
            raise TypeError(f"progress must be a function of (stage, done, total) or None, got "
                            f"{type(progress).__name__}")
        # Its chunks must fit a prompt: the longest (a document's last one, which may run to
        # CHUNK_SPREAD times the size) beside the template, a short question and the answer.
        window = self.backend.max_model_len
        fixed = (len(self.template.prefix_ids) + len(self.template.suffix_ids("?"))
                 + DEFAULT_ANSWER_TOKENS)
        most = int((window - fixed) / CHUNK_SPREAD)
        if self.config.chunk_tokens > most:
            raise ValueError(f"chunk_tokens {self.config.chunk_tokens} makes chunks too long for "
                             f"a prompt in the model's window of {window} tokens (a chunk may "
                             f"run to {CHUNK_SPREAD}x it, beside the template, a question and "
                             f"a {DEFAULT_ANSWER_TOKENS}-token answer); use at most "
                             f"{max(most, 0)} (512 by default)")
        return ingest_text(self, name, text, source, progress)

    def remove_document(self, name: str) -> bool:
        """Remove the document called ``name`` (every version) from retrieval and the index,
        with the KV of its chunks that no other chunk shares; False when there is none."""
        self._require_open()
        require_str(name, "the document's name")
        return self._remove_documents(name).documents > 0

    def _remove_documents(self, name: str, before_id: int | None = None) -> Removal:
        """``KVStore.remove_documents`` on this facade's cache."""
        if self.index.undigested_entries():  # a cache from before schema 4
            self._digest_legacy_entries(name, before_id)
        return self._removals().remove_documents(name, before_id=before_id)

    def _digest_legacy_entries(self, name: str, before_id: int | None) -> None:
        """Give the entries of these documents' chunks stored before schema 4 their ids'
        digest, in every context this engine keys (the migration could digest only the one
        the chunk named), so that they leave with the documents."""
        from ragkv.cache_index.models import ids_sha256

        self._anchor.adopt()  # the passage the anchor entries were keyed after
        keys = self.backend.keys
        contexts = [c for c in PRECOMPUTE_CONTEXTS if c != "anchor" or keys.anchor_ids]
        self.index.digest_entries({
            keys.chunk(ids, ctx): ids_sha256(ids)
            for ids in self.index.document_token_ids(name, before_id=before_id)
            for ctx in contexts})

    def _removals(self) -> KVStore:
        """The store removals go through, whatever the engine: the index and the blob tiers
        this facade's config names (no memory tier of its own)."""
        if self._kv_store is None:
            from ragkv.cache_index import KVStore

            self._kv_store = KVStore.from_config(replace(self.config, memory_budget_bytes=0),
                                                 index=self.index)
        return self._kv_store

    def retrieve(self, question: str, k: int = 4) -> list[RetrievedChunk]:
        from ragkv.ingest import retrieve

        self._require_open()
        check_question(question)
        k = whole(k, "k", "chunks", 1)
        self._anchor.adopt()  # the keys handed out name the passage the cache holds now
        return retrieve(self, question, k)

    # ---- generation ---------------------------------------------------------------------
    def generate(self, chunks: Sequence[RetrievedChunk | str | Sequence[int]], question: str, *,
                 mode: str = "blend", blend: BlendConfig | None = None,
                 max_new_tokens: int = DEFAULT_ANSWER_TOKENS, keep_kv: bool = False,
                 record: bool = False, log_query: bool = True, full_ttft_s: float | None = None,
                 retrieval_s: float | None = None) -> Answer:
        """Answer ``question`` over ``chunks`` (in this order) with one of the four modes;
        ``retrieval_s``: how long retrieving them took, for the trace and the query log."""
        return self.generate_from(self.stream(
            chunks, question, mode=mode, blend=blend, max_new_tokens=max_new_tokens,
            keep_kv=keep_kv, record=record, log_query=log_query, full_ttft_s=full_ttft_s,
            retrieval_s=retrieval_s))

    def stream(self, chunks: Sequence[RetrievedChunk | str | Sequence[int]], question: str, *,
               mode: str = "blend", blend: BlendConfig | None = None,
               max_new_tokens: int = DEFAULT_ANSWER_TOKENS,
               keep_kv: bool = False, record: bool = False, log_query: bool = True,
               retrieval_s: float | None = None,
               full_ttft_s: float | None = None) -> TokenStream:
        """Prefill now (TTFT is measured here), then iterate the returned stream for text.

        Chunks are taken in the order given (a retriever's rank) while the prompt and the
        answer budget fit the engine's window; the rest are left out and named in
        ``trace.left_out``. ``full_ttft_s``: full prefill's TTFT measured on this same prompt
        (logged beside this answer's, for the dashboard)."""
        self._require_open()
        items = [self._retrieved(c, i)
                 for i, c in enumerate(chunk_list(chunks, (RetrievedChunk,)))]
        max_new_tokens = whole(max_new_tokens, "max_new_tokens", "tokens", 1)
        retrieval_s = seconds(retrieval_s, "retrieval_s")
        full_ttft_s = seconds(full_ttft_s, "full_ttft_s")
        if isinstance(blend, dict):  # the knobs as a mapping, as RagkvConfig takes them
            blend = BlendConfig(**blend)
        if blend is not None and not isinstance(blend, BlendConfig):
            raise TypeError(f"blend must be a BlendConfig (e.g. rag.config.blend.choose("
                            f"ratio=0.3)) or None, got {type(blend).__name__}")
        window = self.backend.max_model_len
        if max_new_tokens >= window:
            raise ValueError(f"max_new_tokens {max_new_tokens} leaves no room for the prompt in "
                             f"the model's window of {window} tokens; ask for fewer")
        t0 = time.perf_counter()
        self._anchor.adopt()
        items, left_out = pack(self.template, items, question, window - max_new_tokens)
        prompt = self.template.assemble([c.token_ids for c in items], question)
        # Keys are derived from the ids, never taken on trust: a stale or mistaken key handed in
        # with a chunk must not load another chunk's KV (hashing costs microseconds).
        keys = tuple(self.backend.keys.at(c.token_ids, i, self.config.precompute_context)
                     for i, c in enumerate(items))
        req = GenerationRequest(prompt, keys, mode, blend or self.config.blend,
                                self.config.precompute_context, max_new_tokens, t0,
                                tuple(c.document for c in items), record=record, keep=keep_kv)
        gen = self.backend.generate(req)
        gen.trace.retrieval_s = retrieval_s
        gen.trace.full_ttft_s = full_ttft_s
        gen.trace.left_out = [ChunkTrace(self.key_for(c.token_ids), len(c.token_ids), None, -1,
                                         c.document) for c in left_out]
        return TokenStream(self, question, prompt, gen, keep_kv, log_query, items)

    def ask(self, question: str, k: int = 4, **kwargs) -> Answer:
        """Retrieve the top-k chunks and answer over them."""
        return self.generate_from(self.ask_stream(question, k, **kwargs))

    @staticmethod
    def generate_from(stream: TokenStream) -> Answer:
        """Drain a stream and return its Answer."""
        for _ in stream:
            pass
        assert stream.answer is not None
        return stream.answer

    def ask_stream(self, question: str, k: int = 4, **kwargs) -> TokenStream:
        """Retrieve, prefill, and return a stream of text pieces (``.answer`` at the end)."""
        t = time.perf_counter()
        chunks = self.retrieve(question, k)
        retrieval_s = time.perf_counter() - t
        if not chunks:
            raise LookupError("no documents ingested yet; run `ragkv ingest PATH` first")
        return self.stream(chunks, question, retrieval_s=retrieval_s, **kwargs)

    def close(self) -> None:
        """Release the engine and the cache index; using the facade afterwards is an error.
        A facade from :meth:`with_config` shares both with the one it came from: closing it
        leaves them open, closing that one closes them."""
        if self._closed:
            return
        self._closed = True
        if self._owner is None:
            self.backend.close()
            self.index.close()

    def __enter__(self) -> RagKV:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _require_open(self) -> None:
        if self._closed or (self._owner is not None and self._owner._closed):
            raise RuntimeError("this RagKV was closed; open a new one")

    def _log(self, question: str, trace: QueryTrace, text: str) -> None:
        try:
            self.index.log_query(
                question=question, mode=trace.mode, ratio=trace.ratio, n_chunks=len(trace.chunks),
                hits=trace.hits, misses=trace.misses, context_tokens=trace.context_tokens,
                recomputed_tokens=trace.recomputed_tokens, ttft_s=trace.ttft_s,
                full_ttft_s=trace.full_ttft_s, retrieval_s=trace.retrieval_s, answer=text,
                engine=trace.engine or None)
        except Exception as exc:  # noqa: BLE001 - the log is best effort
            log.warning("could not log query: %s", brief(exc))
