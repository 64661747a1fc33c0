"""LangChain bridge: a retriever of cache-keyed Documents and an LCEL runnable on fused chunk KV.

The runnable takes ``{"question": ...}`` or a plain string and returns
``{"answer", "tokens", "trace", "chunks"}``; ``stream``/``astream`` yield that dict in pieces
that add up to it, as LCEL expects of a step: ``{"answer": text}`` as the answer is decoded,
then the rest (``chain.pick("answer")`` streams the text alone). Mode, recompute ratio,
policy and k come from the fields or, per call, from ``config["configurable"]``
(``ragkv_mode``, ``ragkv_ratio``, ``ragkv_policy``, ``ragkv_k``). Cache hits and TTFT are
sent as LangChain custom events (``ragkv_cache``, ``ragkv_ttft``), so callback handlers and
``astream_events`` see them.
"""

from __future__ import annotations

import threading
import time
import weakref
from collections.abc import AsyncIterator, Iterator
from typing import Any, Literal

try:
    from langchain_core.callbacks import (
        CallbackManagerForChainRun,
        CallbackManagerForRetrieverRun,
        adispatch_custom_event,
        dispatch_custom_event,
    )
    from langchain_core.documents import Document
    from langchain_core.retrievers import BaseRetriever
    from langchain_core.runnables import Runnable, RunnableConfig, RunnableSerializable
    from langchain_core.runnables.config import run_in_executor
    from langchain_core.runnables.utils import AddableDict, ConfigurableFieldSpec
    from pydantic import ConfigDict, Field
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError(
        f"the LangChain connector needs langchain-core ({exc}); "
        "install it with `pip install 'ragkv[langchain]'`"
    ) from exc

from ragkv.api import RagKV, RetrievedChunk, TokenStream
from ragkv.chunking import tokenize_chunk
from ragkv.config import MODES, BlendConfig
from ragkv.prompt import check_question, require_str

RunnableInput = str | dict[str, Any]

# One lock per engine: batch() runs invoke() in a thread pool, and the engine, the SQLite
# index and the blob store are not meant to be driven by several threads at once. Facades
# made by ``with_config`` share their engine, so the lock is the engine's, not the facade's.
_LOCKS: weakref.WeakKeyDictionary[Any, threading.RLock] = weakref.WeakKeyDictionary()
_LOCKS_GUARD = threading.Lock()


def _lock(rag: RagKV) -> threading.RLock:
    with _LOCKS_GUARD:
        return _LOCKS.setdefault(rag.backend, threading.RLock())


def chunk_document(chunk: RetrievedChunk) -> Document:
    """A Document for a ragkv chunk; ``page_content`` is exactly the cached chunk text."""
    meta: dict[str, Any] = {"ragkv_key": chunk.key, "ragkv_n_tokens": len(chunk.token_ids),
                            "ragkv_chunk_id": chunk.chunk_id, "source": chunk.document,
                            "score": chunk.score}
    doc_id = f"ragkv-chunk-{chunk.chunk_id}" if chunk.chunk_id is not None else chunk.key
    return Document(page_content=chunk.text, metadata=meta, id=doc_id)


def document_chunk(rag: RagKV, doc: Document) -> RetrievedChunk | None:
    """The chunk a Document stands for: its page content tokenized on its own; None if empty."""
    require_str(doc.page_content, "a retrieved Document's page_content")
    ids = tokenize_chunk(doc.page_content, rag.tokenizer)
    if not ids:
        return None
    return RetrievedChunk(ids, rag.key_for(ids), doc.page_content,
                          doc.metadata.get("ragkv_chunk_id"), doc.metadata.get("source"),
                          doc.metadata.get("score"))


class RagkvRetriever(BaseRetriever):
    """ragkv's own retriever (MiniLM + FAISS over ingested chunks) as a LangChain retriever."""

    model_config = ConfigDict(arbitrary_types_allowed=True)
    rag: Any = Field(exclude=True, description="the RagKV instance to retrieve from")
    k: int = Field(default=4, ge=1, description="number of chunks to return")

    def _get_relevant_documents(self, query: str, *, run_manager: CallbackManagerForRetrieverRun,
                                k: int | None = None) -> list[Document]:
        with _lock(self.rag):
            chunks = self.rag.retrieve(query, self.k if k is None else k)
        return [chunk_document(c) for c in chunks]


def _question(value: RunnableInput) -> str:
    """The question, checked before any retriever sees it."""
    if isinstance(value, dict) and isinstance(value.get("question"), str):
        value = value["question"]
    if not isinstance(value, str):
        raise TypeError("ragkv expects a question string or a dict with a 'question' string")
    check_question(value)
    return value


def _payloads(stream: TokenStream) -> list[tuple[str, dict[str, Any]]]:
    t = stream.trace
    cache = {"hits": t.hits, "misses": t.misses,
             "chunks": [{"key": c.key, "hit": c.hit, "n_tokens": c.n_tokens,
                         "document": c.document} for c in t.chunks]}
    ttft = {"ttft_s": t.ttft_s, "retrieval_s": t.retrieval_s, "mode": t.mode, "ratio": t.ratio,
            "recomputed_tokens": t.recomputed_tokens, "context_tokens": t.context_tokens}
    return [("ragkv_cache", cache), ("ragkv_ttft", ttft)]


class RagkvRunnable(RunnableSerializable[RunnableInput, dict[str, Any]]):
    """Retrieve, fuse the chunks' stored KV with ragkv and answer, as one LCEL runnable.

    retriever: any LangChain retriever (or runnable returning Documents) whose documents'
        ``page_content`` become the chunks, keys computed on the fly; default: ragkv's own
        retriever, which gives the same chunks as :meth:`RagKV.ask`.
    """

    model_config = ConfigDict(arbitrary_types_allowed=True)
    rag: Any = Field(exclude=True)
    retriever: Runnable[str, list[Document]] | None = Field(default=None, exclude=True)
    k: int = Field(default=4, ge=1)
    mode: str = "blend"
    ratio: float | Literal["auto"] | None = None  # None: the RagKV config's blend ratio
    policy: str | None = None  # None: the RagKV config's blend policy
    max_new_tokens: int = Field(default=64, ge=1)

    def model_post_init(self, context: Any) -> None:
        # a bad mode or policy fails at construction, as a bad k or ratio does, not at the
        # first call; per-call settings are checked per call
        self._options(None)

    @property
    def config_specs(self) -> list[ConfigurableFieldSpec]:
        # Declared so tooling (and RunnableSequence) knows these per-call settings exist. The
        # defaults are None ("this runnable's own field"), the same for every runnable: two
        # differently set up in one chain (full against blend) gave LangChain conflicting
        # specs, and the chain's config_schema() raised.
        return [
            ConfigurableFieldSpec(id="ragkv_mode", annotation=str | None, default=None,
                                  name="ragkv mode", description=f"one of {MODES}; None: the "
                                                                 "runnable's mode"),
            ConfigurableFieldSpec(id="ragkv_ratio", annotation=float | str | None,
                                  default=None, name="recompute ratio",
                                  description="blend ratio in [0, 1] or 'auto'; None: the "
                                              "runnable's (else the RagKV config's)"),
            ConfigurableFieldSpec(id="ragkv_policy", annotation=str | None, default=None,
                                  name="selection policy", description="blend token policy; "
                                                                       "None: the runnable's"),
            ConfigurableFieldSpec(id="ragkv_k", annotation=int | None, default=None,
                                  name="chunks", description="chunks to retrieve; None: the "
                                                             "runnable's k"),
        ]

    def _options(self, config: RunnableConfig | None) -> tuple[str, BlendConfig, int]:
        conf = {name: value for name, value in ((config or {}).get("configurable") or {}).items()
                if value is not None}  # None: the runnable's own (config_specs' default)
        mode = conf.get("ragkv_mode", self.mode)
        if mode not in MODES:
            raise ValueError(f"ragkv_mode must be one of {MODES}, got {mode!r}")
        # every other setting (correction, guard) as the RagKV config has it
        blend = self.rag.config.blend.choose(conf.get("ragkv_ratio", self.ratio),
                                             conf.get("ragkv_policy", self.policy))
        k = conf.get("ragkv_k", self.k)
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"ragkv_k must be a whole number of chunks >= 1, got {k!r}")
        return mode, blend, k

    def _start(self, value: RunnableInput, config: RunnableConfig) -> TokenStream:
        """Retrieve and prefill (TTFT is measured here); decoding is left to the caller."""
        question = _question(value)
        mode, blend, k = self._options(config)
        t = time.perf_counter()
        if self.retriever is None:
            with _lock(self.rag):
                chunks = self.rag.retrieve(question, k)
        else:
            docs = self.retriever.invoke(question, config)
            chunks = [c for d in docs[:k] if (c := document_chunk(self.rag, d)) is not None]
        retrieval_s = time.perf_counter() - t
        if not chunks:
            raise LookupError("no chunks retrieved; ingest documents first")
        with _lock(self.rag):
            stream = self.rag.stream(chunks, question, mode=mode, blend=blend,
                                     max_new_tokens=self.max_new_tokens, retrieval_s=retrieval_s)
        return stream

    def _pieces(self, stream: TokenStream) -> Iterator[str]:
        # Lock per decode step, not across yields: an abandoned stream must not hold the lock.
        it = iter(stream)
        while True:
            with _lock(self.rag):
                piece = next(it, None)
            if piece is None:
                return
            yield piece

    @staticmethod
    def _output(stream: TokenStream) -> dict[str, Any]:
        return {"answer": stream.answer.text, **RagkvRunnable._rest(stream)}

    @staticmethod
    def _rest(stream: TokenStream) -> dict[str, Any]:
        """The output but its answer text: the last piece a stream yields."""
        answer = stream.answer
        return {"tokens": answer.tokens, "trace": answer.trace.to_dict(),
                "chunks": [{"key": c.key, "document": c.document, "chunk_id": c.chunk_id,
                            "score": c.score, "text": c.text}
                           for c in stream.chunks]}  # in the prompt: not those left out

    def _streamed(self, stream: TokenStream) -> Iterator[AddableDict]:
        """The output in pieces that add up to :meth:`_output`'s."""
        said = False
        for text in self._pieces(stream):
            said = True
            yield AddableDict(answer=text)
        yield AddableDict(self._rest(stream) if said else self._output(stream))

    # ---- sync -------------------------------------------------------------------------------
    def _run(self, value: RunnableInput, run_manager: CallbackManagerForChainRun,
             config: RunnableConfig) -> dict[str, Any]:
        stream = self._start(value, config)
        for name, data in _payloads(stream):
            dispatch_custom_event(name, data, config=config)
        for _ in self._pieces(stream):
            pass
        return self._output(stream)

    def invoke(self, input: RunnableInput, config: RunnableConfig | None = None,
               **kwargs: Any) -> dict[str, Any]:
        return self._call_with_config(self._run, input, config, run_type="chain")

    def _transform(self, inputs: Iterator[RunnableInput], run_manager: CallbackManagerForChainRun,
                   config: RunnableConfig) -> Iterator[AddableDict]:
        for value in inputs:
            stream = self._start(value, config)
            for name, data in _payloads(stream):
                dispatch_custom_event(name, data, config=config)
            yield from self._streamed(stream)

    def stream(self, input: RunnableInput, config: RunnableConfig | None = None,
               **kwargs: Any) -> Iterator[AddableDict]:
        yield from self._transform_stream_with_config(iter([input]), self._transform, config,
                                                      run_type="chain")

    # ---- async: the model runs in worker threads, events go through the async dispatcher --
    async def _arun(self, value: RunnableInput, run_manager: Any,
                    config: RunnableConfig) -> dict[str, Any]:
        stream = await run_in_executor(config, self._start, value, config)
        for name, data in _payloads(stream):
            await adispatch_custom_event(name, data, config=config)
        await run_in_executor(config, lambda: [None for _ in self._pieces(stream)])
        return self._output(stream)

    async def ainvoke(self, input: RunnableInput, config: RunnableConfig | None = None,
                      **kwargs: Any) -> dict[str, Any]:
        return await self._acall_with_config(self._arun, input, config, run_type="chain")

    async def _atransform(self, inputs: AsyncIterator[RunnableInput], run_manager: Any,
                          config: RunnableConfig) -> AsyncIterator[AddableDict]:
        async for value in inputs:
            stream = await run_in_executor(config, self._start, value, config)
            for name, data in _payloads(stream):
                await adispatch_custom_event(name, data, config=config)
            pieces = self._streamed(stream)
            while (piece := await run_in_executor(config, next, pieces, None)) is not None:
                yield piece

    async def astream(self, input: RunnableInput, config: RunnableConfig | None = None,
                      **kwargs: Any) -> AsyncIterator[AddableDict]:
        async def one() -> AsyncIterator[RunnableInput]:
            yield input

        async for piece in self._atransform_stream_with_config(one(), self._atransform, config,
                                                               run_type="chain"):
            yield piece
