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
import operator
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from ragkv.anchor_keeper import AnchorKeeper
from ragkv.cache_index import CacheIndex
from ragkv.cache_index.corpus import Removal
from ragkv.cache_index.database import brief
from ragkv.chunking import RetrievedChunk, tokenizer_identity
from ragkv.config import (
    ENGINE_SETTINGS,
    INGESTED_CONTEXT,
    PRECOMPUTE_CONTEXTS,
    BlendConfig,
    RagkvConfig,
)
from ragkv.engine.base import Backend, Generation, GenerationRequest, NextToken
from ragkv.prompt import AssembledPrompt, PromptTemplate, check_question, require_str
from ragkv.trace import ChunkTrace, QueryTrace

if TYPE_CHECKING:
    from ragkv.cache_index import KVStore

log = logging.getLogger("ragkv")

__all__ = ["Answer", "RagKV", "RetrievedChunk", "TokenStream"]


@dataclass
class Answer:
    text: str
    tokens: list[int]
    trace: QueryTrace
    prompt: AssembledPrompt
    first: NextToken  # the first token's distribution (top-k; full logits in process)
    generation: Generation | None = None  # kept only when asked for (bench scoring)

    def score(self, target: Sequence[int]) -> list[NextToken]:
        """Teacher-forced next-token distributions on this answer's prefill (``keep=True``)."""
        if self.generation is None:
            raise RuntimeError("ask with keep_kv=True to score an answer")
        return self.generation.score(target)


def _require_list(chunks: object) -> None:
    """Chunks come as a list: one text (or one chunk) handed in alone is a mistake that would
    otherwise read as one chunk per character."""
    if isinstance(chunks, str | bytes | RetrievedChunk):
        raise TypeError(f"chunks must be a list (of retrieved chunks, texts or token ids), "
                        f"got one {type(chunks).__name__}; wrap it in a list")


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


class TokenStream:
    """Text pieces of an answer as they are decoded; ``answer`` is set once exhausted.

    The prefill (and so the TTFT in the trace) has already happened when this is returned.
    """

    def __init__(self, rag: RagKV, question: str, prompt: AssembledPrompt,
                 gen: Generation, keep: bool, log_query: bool,
                 chunks: Sequence[RetrievedChunk] = ()) -> None:
        self._rag, self.question, self.prompt = rag, question, prompt
        self._gen, self._keep, self._log = gen, keep, log_query
        self.trace: QueryTrace = gen.trace
        #: the chunks the prompt holds, in its order (the ones handed in, as given, less those
        #: left out for the window, ``trace.left_out``): an answer's sources
        self.chunks = list(chunks)
        self.answer: Answer | None = None

    def _tokens(self) -> Iterator[int]:
        yield self._gen.first_token
        if self._gen.first_token not in self._rag.backend.eos_token_ids:
            yield from self._gen.rest()

    def __iter__(self) -> Iterator[str]:
        """The pieces join to ``answer.text``: the answer's leading and trailing whitespace is
        left out, and whitespace inside it is held until the text after it comes (streamed
        as decoded, they began "\n\n" or a space where the answer does not)."""
        held, started = "", False
        for piece in self._pieces():
            if not started:
                piece = piece.lstrip()
                started = bool(piece)
            text = piece.rstrip()
            if text:
                yield held + text
                held = piece[len(text):]
            else:
                held += piece

    def _pieces(self) -> Iterator[str]:
        eos = self._rag.backend.eos_token_ids
        decode = self._rag.tokenizer.decode
        tokens: list[int] = []
        shown = ""
        try:
            for tok in self._tokens():
                tokens.append(tok)
                if tok in eos:
                    continue
                text = decode([t for t in tokens if t not in eos], skip_special_tokens=True)
                if len(text) > len(shown) and not text.endswith("\ufffd"):  # whole chars only
                    yield text[len(shown):]
                    shown = text
        finally:
            if not self._keep:
                self._gen.close()
        text = decode([t for t in tokens if t not in eos], skip_special_tokens=True)
        if len(text) > len(shown):
            yield text[len(shown):]
        if self._log:
            self._rag._log(self.question, self.trace, text)
        self.answer = Answer(text.strip(), tokens, self.trace, self.prompt, self._gen.first,
                             self._gen if self._keep else None)


class RagKV:
    """ingest → precompute → store → retrieve → fuse → answer, on one engine and one cache.

    config.engine picks the engine (``hf``, ``vllm`` or a server URL); ``backend`` hands in an
    engine that is already open, ``engine`` a loaded transformers model to wrap.
    """

    def __init__(self, config: RagkvConfig | None = None, *, backend: Backend | None = None,
                 engine=None) -> None:
        from ragkv.engine.registry import open_backend

        self.config = config or RagkvConfig()
        self.index = CacheIndex(self.config.resolved_index_url)
        self.backend: Backend = backend or open_backend(self.config, self.index, engine)
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
        fixed = [name for name in ENGINE_SETTINGS
                 if name in changes and changes[name] != getattr(self.config, name)]
        if fixed:
            raise ValueError(f"{', '.join(fixed)} is fixed when the engine is built; open a new "
                             f"RagKV with the other value")
        return RagKV(replace(self.config, **changes), backend=self.backend)

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
        _require_list(chunks)
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

        require_str(name, "the document's name")
        require_str(text, f"document {name!r}")
        return ingest_text(self, name, text, source, progress)

    def remove_document(self, name: str) -> bool:
        """Remove the document called ``name`` (every version) from retrieval and the index,
        with the KV of its chunks that no other chunk shares; False when there is none."""
        require_str(name, "the document's name")
        return self._remove_documents(name).documents > 0

    def _remove_documents(self, name: str, before_id: int | None = None) -> Removal:
        """``KVStore.remove_documents`` on this facade's cache."""
        return self._removals().remove_documents(name, before_id=before_id)

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

        check_question(question)
        if isinstance(k, bool) or not isinstance(k, int):
            raise TypeError(f"k must be a whole number of chunks, got {k!r}")
        self._anchor.adopt()  # the keys handed out name the passage the cache holds now
        return retrieve(self, question, k)

    # ---- generation ---------------------------------------------------------------------
    def generate(self, chunks: Sequence[RetrievedChunk | str | Sequence[int]], question: str, *,
                 mode: str = "blend", blend: BlendConfig | None = None,
                 max_new_tokens: int = 64, keep_kv: bool = False, record: bool = False,
                 log_query: bool = True, full_ttft_s: float | None = None,
                 retrieval_s: float | None = None) -> Answer:
        """Answer ``question`` over ``chunks`` (in this order) with one of the four modes;
        ``retrieval_s``: how long retrieving them took, for the trace and the query log."""
        return self.generate_from(self.stream(
            chunks, question, mode=mode, blend=blend, max_new_tokens=max_new_tokens,
            keep_kv=keep_kv, record=record, log_query=log_query, full_ttft_s=full_ttft_s,
            retrieval_s=retrieval_s))

    def stream(self, chunks: Sequence[RetrievedChunk | str | Sequence[int]], question: str, *,
               mode: str = "blend", blend: BlendConfig | None = None, max_new_tokens: int = 64,
               keep_kv: bool = False, record: bool = False, log_query: bool = True,
               retrieval_s: float | None = None,
               full_ttft_s: float | None = None) -> TokenStream:
        """Prefill now (TTFT is measured here), then iterate the returned stream for text.

        Chunks are taken in the order given (a retriever's rank) while the prompt and the
        answer budget fit the engine's window; the rest are left out and named in
        ``trace.left_out``. ``full_ttft_s``: full prefill's TTFT measured on this same prompt
        (logged beside this answer's, for the dashboard)."""
        _require_list(chunks)
        items = [self._retrieved(c, i) for i, c in enumerate(chunks)]
        try:  # (numpy's ints too; a float or a bool is a mistake)
            if isinstance(max_new_tokens, bool):
                raise TypeError
            max_new_tokens = operator.index(max_new_tokens)
        except TypeError:
            raise TypeError(f"max_new_tokens must be a whole number of tokens, got "
                            f"{max_new_tokens!r}") from None
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
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
        self.backend.close()

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
