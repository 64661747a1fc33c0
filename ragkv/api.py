"""The public facade: one object that ingests, retrieves and answers with fused chunk KV.

Timing follows DESIGN §3.7: TTFT runs from the request (question + chunk keys) to the first
token and includes index lookup, blob loading, computing chunks that missed, and fusion.
Retrieval is timed separately.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from ragkv.cache_index import CacheIndex, KVStore
from ragkv.config import BlendConfig, RagkvConfig
from ragkv.engine.blend import FusedPrefill
from ragkv.engine.hf import HFEngine
from ragkv.engine.kv import ChunkKV
from ragkv.keys import KV_LAYOUT, chunk_key, context_digest
from ragkv.prompt import AssembledPrompt, PromptTemplate
from ragkv.trace import ChunkTrace, QueryTrace

log = logging.getLogger("ragkv")


@dataclass
class RetrievedChunk:
    """A chunk as a retriever hands it out: text, token ids and its cache key."""

    token_ids: list[int]
    key: str
    text: str = ""
    chunk_id: int | None = None
    document: str | None = None
    score: float | None = None


@dataclass
class Answer:
    text: str
    tokens: list[int]
    trace: QueryTrace
    prompt: AssembledPrompt
    fused: FusedPrefill | None = None  # kept only when asked for (bench, inspection)


class TokenStream:
    """Text pieces of an answer as they are decoded; ``answer`` is set once exhausted.

    The prefill (and so the TTFT in the trace) has already happened when this is returned.
    """

    def __init__(self, rag: RagKV, question: str, prompt: AssembledPrompt, trace: QueryTrace,
                 fused: FusedPrefill, first: int, max_new_tokens: int, keep_kv: bool,
                 log_query: bool) -> None:
        self._rag, self.question, self.prompt, self.trace = rag, question, prompt, trace
        self._fused, self._first, self._max = fused, first, max_new_tokens
        self._keep, self._log = keep_kv, log_query
        self.answer: Answer | None = None

    def __iter__(self) -> Iterator[str]:
        engine = self._rag.engine
        tokens: list[int] = []
        shown = ""
        for tok in engine.decode_iter(self._fused, self._first, self._max):
            tokens.append(tok)
            if tok in engine.eos_token_ids:
                continue
            text = engine.tokenizer.decode([t for t in tokens if t not in engine.eos_token_ids],
                                           skip_special_tokens=True)
            if len(text) > len(shown) and not text.endswith("\ufffd"):  # whole characters only
                yield text[len(shown):]
                shown = text
        text = engine.tokenizer.decode([t for t in tokens if t not in engine.eos_token_ids],
                                       skip_special_tokens=True)
        if len(text) > len(shown):
            yield text[len(shown):]
        if self._log:
            self._rag._log(self.question, self.trace, text)
        self.answer = Answer(text.strip(), tokens, self.trace, self.prompt,
                             self._fused if self._keep else None)


class RagKV:
    """ingest → precompute → store → retrieve → fuse → answer, on one engine and one cache."""

    def __init__(self, config: RagkvConfig | None = None, *, engine: HFEngine | None = None,
                 store: KVStore | None = None) -> None:
        self.config = config or RagkvConfig()
        if engine is None:
            from ragkv.model_fetch import resolve_model

            path = resolve_model(self.config.model, self.config.home)
            engine = HFEngine.load(path, self.config.device, self.config.dtype,
                                    self.config.kernels)
        self.engine = engine
        self.template = PromptTemplate.from_tokenizer(engine.tokenizer, self.config.system_prompt)
        if store is None:
            self.config.home.mkdir(parents=True, exist_ok=True)
            store = KVStore.from_config(self.config)
        self.store = store
        self._prefix_kv: ChunkKV | None = None
        self._retrieval = None  # built lazily: ragkv.connectors.retrieval

    # ---- keys and KV --------------------------------------------------------------------
    @property
    def index(self) -> CacheIndex:
        return self.store.index

    def _context(self) -> str:
        if self.config.precompute_context == "prefix":
            return context_digest(self.template.prefix_ids)
        return context_digest(None)

    def key_for(self, token_ids: Sequence[int]) -> str:
        return chunk_key(self.engine.fingerprint, token_ids, context=self._context(),
                         kv_dtype=self.config.kv_storage)

    def _shape(self, n: int) -> dict[str, int]:
        r = self.engine.runner
        return dict(layers=r.n_layers, kv_heads=r.kv_heads, head_dim=r.head_dim, n_tokens=n)

    def _load(self, key: str, n: int) -> tuple[ChunkKV, str] | None:
        """The stored KV and the tier that served it, or None (a miss)."""
        found = self.store.fetch(key, model_fp=self.engine.fingerprint, layout=KV_LAYOUT)
        if found is None:
            return None
        try:
            return ChunkKV.from_tensors(found.tensors, **self._shape(n)), found.tier
        except (KeyError, ValueError) as exc:  # a foreign or damaged entry is a miss
            log.warning("cache entry %s unusable (%s); recomputing", key[:12], exc)
            self.store.delete(key)
            return None

    def _save(self, key: str, kv: ChunkKV) -> None:
        # KVStore.put logs and swallows storage failures: a failed write never fails a query.
        codec = self.config.int8_codec
        dtype = "float32" if codec is not None else self.config.kv_dtype  # codec quantizes
        self.store.put(key, kv.to_tensors(dtype), model_fp=self.engine.fingerprint,
                       layout=KV_LAYOUT, n_tokens=kv.n_tokens, codec=codec)

    def prefix_kv(self) -> ChunkKV:
        """KV of the template prefix: a true prefix, so its cached KV is exact."""
        if self._prefix_kv is None:
            ids = list(self.template.prefix_ids)
            key = chunk_key(self.engine.fingerprint, ids, kv_dtype=self.config.kv_storage)
            loaded = self._load(key, len(ids))
            if loaded is None:
                kv = self.engine.precompute(ids)
                self._save(key, kv)
            else:
                kv = loaded[0]
            self._prefix_kv = kv.to(self.engine.runner.device, self.engine.runner.dtype)
        return self._prefix_kv

    def chunk_kv(self, token_ids: Sequence[int], key: str | None = None,
                 indexed: bool = True) -> tuple[ChunkKV, bool]:
        """The chunk's KV and whether it was a hit; a miss is computed and stored back.

        ``indexed=False`` (the index already said the key is absent) skips the read.
        """
        kv, tier = self._chunk_kv(token_ids, key, indexed)
        return kv, tier is not None

    def _chunk_kv(self, token_ids: Sequence[int], key: str | None,
                  indexed: bool) -> tuple[ChunkKV, str | None]:
        """The chunk's KV and the tier that served it (None: computed now)."""
        key = key or self.key_for(token_ids)
        loaded = self._load(key, len(token_ids)) if indexed else None
        if loaded is not None:
            return loaded
        past = self.prefix_kv() if self.config.precompute_context == "prefix" else None
        kv = self.engine.precompute(list(token_ids), past)
        self._save(key, kv)
        return kv, None

    def precompute(self, token_ids: Sequence[int]) -> bool:
        """Make sure a chunk's KV is stored; returns True if it had to be computed."""
        key = self.key_for(token_ids)
        if self.store.contains([key]).get(key):
            return False
        self.chunk_kv(token_ids, key)
        return True

    # ---- ingestion and retrieval --------------------------------------------------------
    def ingest_text(self, name: str, text: str, source: str = "", progress=None):
        from ragkv.ingest import ingest_text

        return ingest_text(self, name, text, source, progress)

    def retrieve(self, question: str, k: int = 4) -> list[RetrievedChunk]:
        from ragkv.ingest import retrieve

        return retrieve(self, question, k)

    # ---- generation ---------------------------------------------------------------------
    def generate(self, chunks: Sequence[RetrievedChunk | Sequence[int]], question: str, *,
                 mode: str = "blend", blend: BlendConfig | None = None,
                 max_new_tokens: int = 64, keep_kv: bool = False, record: bool = False,
                 log_query: bool = True) -> Answer:
        """Answer ``question`` over ``chunks`` (in this order) with one of the four modes."""
        return self.generate_from(self.stream(
            chunks, question, mode=mode, blend=blend, max_new_tokens=max_new_tokens,
            keep_kv=keep_kv, record=record, log_query=log_query))

    def stream(self, chunks: Sequence[RetrievedChunk | Sequence[int]], question: str, *,
               mode: str = "blend", blend: BlendConfig | None = None, max_new_tokens: int = 64,
               keep_kv: bool = False, record: bool = False, log_query: bool = True,
               retrieval_s: float | None = None) -> TokenStream:
        """Prefill now (TTFT is measured here), then iterate the returned stream for text."""
        blend = self.engine.resolve(blend or self.config.blend)
        items = [c if isinstance(c, RetrievedChunk) else RetrievedChunk(list(c), "")
                 for c in chunks]
        t0 = time.perf_counter()
        prompt = self.template.assemble([c.token_ids for c in items], question)
        # Keys are derived from the ids, never taken on trust: a stale or mistaken key handed in
        # with a chunk must not load another chunk's KV (hashing costs microseconds).
        keys = [self.key_for(c.token_ids) for c in items]
        trace = QueryTrace(mode, blend.ratio if mode == "blend" else None,
                           blend.policy if mode == "blend" else None, len(prompt))
        trace.chunks = [ChunkTrace(k, len(c.token_ids), None, s, c.document)
                        for k, c, (s, _) in zip(keys, items, prompt.chunk_spans, strict=True)]
        cached: list[tuple[int, ChunkKV]] = []
        exact_until = 0
        if mode != "full":
            t = time.perf_counter()
            present = self.store.contains(keys)
            trace.lookup_s = time.perf_counter() - t
            cached.append((0, self.prefix_kv()))
            exact_until = prompt.prefix_len
            in_prefix_ctx = self.config.precompute_context == "prefix"
            wanted = items[:1] if mode == "prefix" else items
            if mode == "prefix" and not in_prefix_ctx:
                wanted = []  # a cold-computed chunk is never the prompt's exact prefix
            for c, ct, (s, e) in zip(wanted, trace.chunks, prompt.chunk_spans, strict=False):
                t = time.perf_counter()
                kv, ct.tier = self._chunk_kv(c.token_ids, ct.key, present.get(ct.key, False))
                dt = time.perf_counter() - t
                ct.hit = hit = ct.tier is not None
                if hit:
                    trace.load_s += dt
                else:
                    trace.precompute_s += dt
                cached.append((s, kv))
                if in_prefix_ctx and s == prompt.prefix_len:
                    exact_until = e  # computed after the same prefix at the same positions
        t = time.perf_counter()
        fused = self.engine.prefill(prompt, cached, mode, blend, exact_until, record=record)
        first = int(fused.logits.argmax())
        trace.fuse_s = time.perf_counter() - t
        trace.ttft_s = time.perf_counter() - t0
        trace.recomputed_per_layer = fused.recomputed_per_layer
        final = set(fused.final_positions.tolist())
        for ct, (s, e) in zip(trace.chunks, prompt.chunk_spans, strict=True):
            ct.recomputed = sum(1 for p in range(s, e) if p in final)
        trace.retrieval_s = retrieval_s
        return TokenStream(self, question, prompt, trace, fused, first, max_new_tokens,
                           keep_kv, log_query)

    def ask(self, question: str, k: int = 4, **kwargs) -> Answer:
        """Retrieve the top-k chunks and answer over them."""
        return self.generate_from(self.ask_stream(question, k, **kwargs))

    @staticmethod
    def generate_from(stream: TokenStream) -> Answer:
        """Drain a stream and return its Answer."""
        for _ in stream:
            pass
        return stream.answer

    def ask_stream(self, question: str, k: int = 4, **kwargs) -> TokenStream:
        """Retrieve, prefill, and return a stream of text pieces (``.answer`` at the end)."""
        t = time.perf_counter()
        chunks = self.retrieve(question, k)
        retrieval_s = time.perf_counter() - t
        if not chunks:
            raise LookupError("no documents ingested yet; run `ragkv ingest PATH` first")
        return self.stream(chunks, question, retrieval_s=retrieval_s, **kwargs)

    def _log(self, question: str, trace: QueryTrace, text: str) -> None:
        try:
            self.index.log_query(
                question=question, mode=trace.mode, ratio=trace.ratio, n_chunks=len(trace.chunks),
                hits=trace.hits, misses=trace.misses, context_tokens=trace.context_tokens,
                recomputed_tokens=trace.recomputed_tokens, ttft_s=trace.ttft_s,
                full_ttft_s=trace.full_ttft_s, retrieval_s=trace.retrieval_s, answer=text)
        except Exception as exc:  # noqa: BLE001 - the log is best effort
            log.warning("could not log query: %s", exc)
