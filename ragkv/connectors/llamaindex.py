"""LlamaIndex bridge: a retriever, an ingestion transform and a query engine on fused chunk KV.

A node's cached text is what a LlamaIndex LLM would see for it (``MetadataMode.LLM``), so any
existing index or retriever can feed ragkv. The cache key is added to node metadata and listed
in both exclusion lists: annotating a node never changes its LLM or embedding text (its tokens).

Timing and cache events go through LlamaIndex's instrumentation dispatcher, so handlers that are
already attached to the root dispatcher see spans for every query and one event per chunk.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from typing import TYPE_CHECKING, Any, Literal

try:
    from llama_index.core.base.base_retriever import BaseRetriever
    from llama_index.core.base.response.schema import (
        AsyncStreamingResponse,
        Response,
        StreamingResponse,
    )
    from llama_index.core.bridge.pydantic import ConfigDict, Field, PrivateAttr
    from llama_index.core.indices.base import BaseIndex
    from llama_index.core.instrumentation import get_dispatcher
    from llama_index.core.instrumentation.events import BaseEvent
    from llama_index.core.query_engine import CustomQueryEngine
    from llama_index.core.schema import (
        BaseNode,
        MetadataMode,
        NodeWithScore,
        QueryBundle,
        TextNode,
        TransformComponent,
    )
    from tqdm.auto import tqdm
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError(
        f"the LlamaIndex connector needs llama-index-core ({exc}); "
        "install it with `pip install 'ragkv[llamaindex]'`"
    ) from exc

from ragkv.api import RagKV, RetrievedChunk, TokenStream
from ragkv.chunking import tokenize_chunk
from ragkv.config import MODES, BlendConfig
from ragkv.ingest import PRECOMPUTE_BATCH
from ragkv.prompt import check_question, require_str

if TYPE_CHECKING:
    from ragkv.trace import QueryTrace

KEY = "ragkv_key"
N_TOKENS = "ragkv_n_tokens"
CHUNK_ID = "ragkv_chunk_id"
DOCUMENT = "ragkv_document"
_RAGKV_KEYS = (KEY, N_TOKENS, CHUNK_ID, DOCUMENT)

dispatcher = get_dispatcher(__name__)


# ---- instrumentation events -------------------------------------------------------------
class RagkvChunkEvent(BaseEvent):
    """Base of the per-chunk cache events; ``stage`` is ``query`` or ``ingest``."""

    key: str
    n_tokens: int
    document: str | None = None
    stage: str = "query"

    @classmethod
    def class_name(cls) -> str:
        return "RagkvChunkEvent"


class RagkvCacheHitEvent(RagkvChunkEvent):
    """A chunk's KV came from the store (at ingestion: it was already stored)."""

    @classmethod
    def class_name(cls) -> str:
        return "RagkvCacheHitEvent"


class RagkvCacheMissEvent(RagkvChunkEvent):
    """A chunk's KV had to be computed (and was stored back)."""

    @classmethod
    def class_name(cls) -> str:
        return "RagkvCacheMissEvent"


class RagkvTTFTEvent(BaseEvent):
    """Prefill finished: time to first token and what the fusion cost."""

    ttft_s: float
    retrieval_s: float | None = None
    mode: str
    ratio: float | None = None
    hits: int
    misses: int
    recomputed_tokens: int
    context_tokens: int

    @classmethod
    def class_name(cls) -> str:
        return "RagkvTTFTEvent"


def emit_trace_events(trace: QueryTrace) -> None:
    """One hit/miss event per looked-up chunk, then the TTFT event."""
    for c in trace.chunks:
        if c.hit is not None:  # None: the mode never looked this chunk up
            cls = RagkvCacheHitEvent if c.hit else RagkvCacheMissEvent
            dispatcher.event(cls(key=c.key, n_tokens=c.n_tokens, document=c.document))
    dispatcher.event(RagkvTTFTEvent(
        ttft_s=trace.ttft_s, retrieval_s=trace.retrieval_s, mode=trace.mode, ratio=trace.ratio,
        hits=trace.hits, misses=trace.misses, recomputed_tokens=trace.recomputed_tokens,
        context_tokens=trace.context_tokens))


# ---- nodes <-> chunks -------------------------------------------------------------------
def node_chunk(rag: RagKV, node: BaseNode) -> RetrievedChunk | None:
    """The chunk a node stands for: its LLM-visible text, tokenized on its own; None if empty."""
    text = node.get_content(metadata_mode=MetadataMode.LLM)
    require_str(text, f"node {node.node_id}'s text")
    ids = tokenize_chunk(text, rag.tokenizer)
    if not ids:
        return None
    document = node.metadata.get(DOCUMENT) or node.ref_doc_id or node.node_id
    return RetrievedChunk(ids, rag.key_for(ids), text, node.metadata.get(CHUNK_ID), document)


def _exclude(keys: Sequence[str], extra: Sequence[str]) -> list[str]:
    return list(keys) + [k for k in extra if k not in keys]


def annotate(node: BaseNode, chunk: RetrievedChunk, copy: bool = True) -> BaseNode:
    """Add the cache key and token count to ``node``'s metadata without changing its tokens."""
    if copy:  # a retriever must not write into the nodes an index keeps in its docstore
        node = node.model_copy()
    node.metadata = {**node.metadata, KEY: chunk.key, N_TOKENS: len(chunk.token_ids)}
    added = [k for k in _RAGKV_KEYS if k in node.metadata]
    node.excluded_llm_metadata_keys = _exclude(node.excluded_llm_metadata_keys, added)
    node.excluded_embed_metadata_keys = _exclude(node.excluded_embed_metadata_keys, added)
    return node


def chunk_node(chunk: RetrievedChunk) -> TextNode:
    """A node for a chunk of ragkv's own index; all its metadata is hidden from LLM and embedder,
    so its LLM text is exactly the cached chunk text."""
    meta: dict[str, Any] = {KEY: chunk.key, N_TOKENS: len(chunk.token_ids)}
    if chunk.chunk_id is not None:
        meta[CHUNK_ID] = chunk.chunk_id
    if chunk.document is not None:
        meta[DOCUMENT] = chunk.document
    node_id = f"ragkv-chunk-{chunk.chunk_id}" if chunk.chunk_id is not None else chunk.key
    return TextNode(id_=node_id, text=chunk.text, metadata=meta,
                    excluded_llm_metadata_keys=list(meta), excluded_embed_metadata_keys=list(meta))


# ---- retriever ----------------------------------------------------------------------------
class RagkvRetriever(BaseRetriever):
    """Nodes annotated with their ragkv cache key.

    source: ``None`` uses ragkv's own FAISS retriever over ingested chunks; any LlamaIndex
        retriever, or an index (turned into its retriever), is wrapped instead and its nodes'
        keys are computed from their text.
    """

    def __init__(self, rag: RagKV, similarity_top_k: int = 4,
                 source: BaseRetriever | BaseIndex | None = None, **kwargs: Any) -> None:
        if similarity_top_k < 1:
            raise ValueError("similarity_top_k must be >= 1")
        if isinstance(source, BaseIndex):
            source = source.as_retriever(similarity_top_k=similarity_top_k)
        self.rag, self.similarity_top_k, self.source = rag, similarity_top_k, source
        super().__init__(**kwargs)

    def _own(self, query: str) -> list[NodeWithScore]:
        return [NodeWithScore(node=chunk_node(c), score=c.score)
                for c in self.rag.retrieve(query, self.similarity_top_k)]

    def _annotated(self, results: list[NodeWithScore]) -> list[NodeWithScore]:
        out = []
        for r in results:
            chunk = node_chunk(self.rag, r.node)
            if chunk is not None:  # an empty node has nothing to cache or to answer from
                out.append(NodeWithScore(node=annotate(r.node, chunk), score=r.score))
        return out

    def _retrieve(self, query_bundle: QueryBundle) -> list[NodeWithScore]:
        if self.source is None:
            return self._own(query_bundle.query_str)
        return self._annotated(self.source.retrieve(query_bundle))

    async def _aretrieve(self, query_bundle: QueryBundle) -> list[NodeWithScore]:
        if self.source is None:  # embedding + FAISS are blocking: keep the event loop free
            return await asyncio.to_thread(self._own, query_bundle.query_str)
        return self._annotated(await self.source.aretrieve(query_bundle))


# ---- ingestion transform ----------------------------------------------------------------
class RagkvKVTransform(TransformComponent):
    """Precomputes and stores each node's KV and annotates the node with its cache key.

    Use it last in an ``IngestionPipeline`` (after splitting and metadata extraction): the KV is
    computed over the node's final LLM text. Nodes go to the engine ``PRECOMPUTE_BATCH`` at a
    time, as ``RagKV.ingest_text`` sends chunks (an engine may prefill them in one pass);
    ``show_progress`` (or the keyword of that name when called) shows a bar over the nodes.
    """

    model_config = ConfigDict(arbitrary_types_allowed=True)
    rag: Any = Field(exclude=True, description="the RagKV instance that stores the KV")
    # Part of the pipeline's cache hash, so a different model never reuses cached nodes.
    fingerprint: str = ""
    # not in the pipeline's cache hash: a bar changes no node
    show_progress: bool = Field(default=False, exclude=True,
                                description="a progress bar over the nodes")
    _computed: int = PrivateAttr(default=0)

    def __init__(self, rag: RagKV, **kwargs: Any) -> None:
        super().__init__(rag=rag, fingerprint=rag.fingerprint, **kwargs)

    @classmethod
    def class_name(cls) -> str:
        return "RagkvKVTransform"

    def to_dict(self, **kwargs: Any) -> dict[str, Any]:
        # What the pipeline's cache hashes. A node's key depends on the precompute context,
        # the KV storage dtype and the anchor passage too, not only on the weights: with the
        # fingerprint alone a pipeline rerun for another setup got the cached nodes back,
        # nothing precomputed and every key naming the other setup's entry.
        try:
            space = self.rag.key_for([0])  # every key of this setup hashes in the same way
        except ValueError:  # the anchor passage is picked with the first nodes: not yet
            space = f"{self.rag.config.precompute_context}:{self.rag.config.kv_storage}"
        return {**super().to_dict(**kwargs), "fingerprint": f"{self.fingerprint}:{space}"}

    @property
    def computed(self) -> int:
        """Nodes whose KV this transform had to compute (0 when everything was stored)."""
        return self._computed

    def __call__(self, nodes: Sequence[BaseNode], **kwargs: Any) -> Sequence[BaseNode]:
        self.rag.choose_anchor([n.get_content(metadata_mode=MetadataMode.LLM) for n in nodes])
        todo = [(node, chunk) for node in nodes
                if (chunk := node_chunk(self.rag, node)) is not None]
        show = bool(kwargs.get("show_progress", self.show_progress))
        with tqdm(total=len(todo), desc="Precomputing KV", unit="node", disable=not show) as bar:
            for start in range(0, len(todo), PRECOMPUTE_BATCH):
                batch = todo[start:start + PRECOMPUTE_BATCH]
                computed = self.rag.precompute_many([c.token_ids for _, c in batch])
                for (node, chunk), new in zip(batch, computed, strict=True):
                    self._computed += new
                    cls = RagkvCacheMissEvent if new else RagkvCacheHitEvent
                    dispatcher.event(cls(key=chunk.key, n_tokens=len(chunk.token_ids),
                                         document=chunk.document, stage="ingest"))
                    annotate(node, chunk, copy=False)  # transforms hand on the nodes given
                bar.update(len(batch))
        return nodes


# ---- query engine -------------------------------------------------------------------------
class RagkvQueryEngine(CustomQueryEngine):
    """Retrieve, fuse the chunks' stored KV with ragkv, answer; the trace is in the metadata.

    ``response.metadata["ragkv_trace"]`` is :meth:`QueryTrace.to_dict` (hits, misses,
    recomputed tokens, TTFT); ``["ragkv_tokens"]`` the answer's token ids (for a streaming
    response, once its generator is exhausted).
    """

    # a misspelled setting (similarity_topk=1) is an error, not silently the default
    model_config = ConfigDict(arbitrary_types_allowed=True, extra="forbid")
    rag: Any = Field(exclude=True)
    retriever: Any = Field(default=None, exclude=True,
                           description="a LlamaIndex retriever or index (its nodes get their "
                                       "cache keys); default: ragkv's own retriever")
    node_postprocessors: list[Any] = Field(
        default_factory=list, exclude=True,
        description="LlamaIndex node postprocessors, applied in order before fusion")
    similarity_top_k: int = 4
    mode: str = "blend"
    ratio: float | Literal["auto"] | None = None  # None: the RagKV config's blend ratio
    policy: str | None = None  # None: the RagKV config's blend policy
    max_new_tokens: int = Field(default=64, ge=1)
    streaming: bool = False

    def model_post_init(self, context: Any) -> None:
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        # a bad ratio or policy fails at construction, not at the first query
        self._blend()
        given = getattr(self.retriever, "similarity_top_k", None)  # a RagkvRetriever's own
        if ("similarity_top_k" in self.model_fields_set and self.retriever is not None
                and not isinstance(self.retriever, BaseIndex)
                and given != self.similarity_top_k):  # it was ignored: every node went in
            raise ValueError(f"similarity_top_k={self.similarity_top_k} does not reach the "
                             f"retriever given, which returns its own top-k: set it on that "
                             f"retriever, or pass an index")
        if not isinstance(self.retriever, RagkvRetriever):  # own, or another wrapped
            self.retriever = RagkvRetriever(self.rag, self.similarity_top_k, self.retriever)

    def _blend(self) -> BlendConfig:
        # every other setting (correction, guard) as the RagKV config has it
        return self.rag.config.blend.choose(self.ratio, self.policy)

    @dispatcher.span
    def _fuse(self, query_str: str, nodes: list[NodeWithScore],
              retrieval_s: float) -> tuple[TokenStream, list[NodeWithScore]]:
        pairs = [(n, c) for n in nodes if (c := node_chunk(self.rag, n.node)) is not None]
        if not pairs:
            raise LookupError("the retriever returned no usable nodes; ingest documents first")
        stream = self.rag.stream([c for _, c in pairs], query_str, mode=self.mode,
                                 blend=self._blend(), max_new_tokens=self.max_new_tokens,
                                 retrieval_s=retrieval_s)
        emit_trace_events(stream.trace)
        in_prompt = {id(c) for c in stream.chunks}  # not those left out for the window
        return stream, [n for n, c in pairs if id(c) in in_prompt]

    def _retrieve(self, query_str: str) -> tuple[list[NodeWithScore], float]:
        """The nodes to answer from, after the postprocessors, and the seconds it took."""
        t = time.perf_counter()
        nodes = self.retriever.retrieve(query_str)
        bundle = QueryBundle(query_str)
        for post in self.node_postprocessors:
            nodes = post.postprocess_nodes(nodes, query_bundle=bundle)
        return nodes, time.perf_counter() - t

    # LlamaIndex validates the question only inside its own start event, a several-line
    # pydantic error for ``query(None)``; checked first it is the facade's one-line error.
    def query(self, str_or_query_bundle: Any) -> Any:
        return super().query(_checked(str_or_query_bundle))

    async def aquery(self, str_or_query_bundle: Any) -> Any:
        return await super().aquery(_checked(str_or_query_bundle))

    @dispatcher.span
    def custom_query(self, query_str: str) -> Response | StreamingResponse:
        stream, used = self._fuse(query_str, *self._retrieve(query_str))
        meta: dict[str, Any] = {"ragkv_trace": stream.trace.to_dict()}
        if self.streaming:
            return StreamingResponse(response_gen=_pieces(stream, meta), source_nodes=used,
                                     metadata=meta)
        answer = RagKV.generate_from(stream)
        meta["ragkv_tokens"] = answer.tokens
        return Response(answer.text, source_nodes=used, metadata=meta)

    async def acustom_query(self, query_str: str) -> Response | AsyncStreamingResponse:
        # The model runs on blocking torch calls; a worker thread keeps the loop responsive
        # (and to_thread carries the context, so spans and events still nest correctly).
        response = await asyncio.to_thread(self.custom_query, query_str)
        if isinstance(response, StreamingResponse):  # as LlamaIndex's own engines answer
            return AsyncStreamingResponse(response_gen=_in_thread(response.response_gen),
                                          source_nodes=response.source_nodes,
                                          metadata=response.metadata)
        return response


def _checked(query: Any) -> Any:
    """``query`` (a question or a ``QueryBundle``) once its question is a string with text."""
    check_question(query.query_str if isinstance(query, QueryBundle) else query)
    return query


async def _in_thread(pieces: Iterator[str]) -> AsyncIterator[str]:
    """``pieces`` as an async generator, each (blocking) decode step in a worker thread."""
    done = object()
    while (piece := await asyncio.to_thread(next, pieces, done)) is not done:
        yield piece  # type: ignore[misc]


def _pieces(stream: TokenStream, meta: dict[str, Any]) -> Iterator[str]:
    yield from stream
    if stream.answer is not None:  # the metadata dict is shared with the StreamingResponse
        meta["ragkv_tokens"] = stream.answer.tokens
        meta["ragkv_answer"] = stream.answer.text
