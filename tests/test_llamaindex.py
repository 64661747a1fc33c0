"""LlamaIndex connector on real LlamaIndex classes: keyed nodes, ingestion, fused answers, events.

A tiny random Llama saved as a model folder (with SmolLM2's tokenizer) keeps this fast; what is
checked is that answers through LlamaIndex equal answers from the ragkv API token for token.
"""

from __future__ import annotations

import asyncio
from pydoc_data.topics import topics
from typing import Any

import pytest

pytest.importorskip("llama_index.core")

from llama_index.core import Document, SummaryIndex  # noqa: E402
from llama_index.core.base.response.schema import Response, StreamingResponse  # noqa: E402
from llama_index.core.ingestion import IngestionPipeline  # noqa: E402
from llama_index.core.instrumentation import get_dispatcher  # noqa: E402
from llama_index.core.instrumentation.event_handlers import BaseEventHandler  # noqa: E402
from llama_index.core.instrumentation.events import BaseEvent  # noqa: E402
from llama_index.core.node_parser import SentenceSplitter  # noqa: E402
from llama_index.core.schema import MetadataMode, TextNode  # noqa: E402

from ragkv import BlendConfig, RagKV  # noqa: E402
from ragkv.chunking import tokenize_chunk  # noqa: E402
from ragkv.connectors.llamaindex import (  # noqa: E402
    KEY,
    N_TOKENS,
    RagkvCacheHitEvent,
    RagkvCacheMissEvent,
    RagkvKVTransform,
    RagkvQueryEngine,
    RagkvRetriever,
    RagkvTTFTEvent,
    node_chunk,
)

QUESTION = "What does the assert statement do?"
NEW = 6  # tokens generated per answer: enough to compare, cheap on the tiny model


@pytest.fixture(scope="module")
def rag(pydoc_rag: RagKV) -> RagKV:
    return pydoc_rag


class Collector(BaseEventHandler):
    """A real LlamaIndex event handler that keeps what it sees."""

    events: list[Any] = []

    @classmethod
    def class_name(cls) -> str:
        return "Collector"

    def handle(self, event: BaseEvent, **kwargs: Any) -> None:
        self.events.append(event)


@pytest.fixture
def collector() -> Any:
    root = get_dispatcher()
    handler = Collector(events=[])
    root.add_event_handler(handler)
    yield handler
    root.event_handlers.remove(handler)


def api_answer(rag: RagKV, mode: str = "blend", ratio: float = 0.15, k: int = 3):
    return rag.ask(QUESTION, k, mode=mode, blend=BlendConfig(ratio=ratio), max_new_tokens=NEW)


def test_retriever_nodes_carry_keys_without_changing_tokens(rag: RagKV) -> None:
    nodes = RagkvRetriever(rag, similarity_top_k=3).retrieve(QUESTION)
    chunks = rag.retrieve(QUESTION, 3)
    assert len(nodes) == 3
    for n, c in zip(nodes, chunks, strict=True):
        assert n.node.metadata[KEY] == c.key and n.node.metadata[N_TOKENS] == len(c.token_ids)
        for mode in (MetadataMode.LLM, MetadataMode.EMBED):
            assert n.node.get_content(metadata_mode=mode) == c.text  # keys stay invisible
        assert node_chunk(rag, n.node).token_ids == c.token_ids


def test_retriever_wraps_any_llamaindex_index(rag: RagKV) -> None:
    nodes = [TextNode(text=topics[t][:300], metadata={"topic": t}) for t in ("for", "if")]
    index = SummaryIndex(nodes)  # a retriever that needs neither embeddings nor an LLM
    out = RagkvRetriever(rag, source=index).retrieve(QUESTION)
    assert len(out) == 2
    for n in out:
        llm_text = n.node.get_content(metadata_mode=MetadataMode.LLM)
        assert "topic:" in llm_text and KEY not in llm_text  # user metadata kept, keys hidden
        assert n.node.metadata[KEY] == rag.key_for(tokenize_chunk(llm_text, rag.tokenizer))
    assert all(KEY not in n.metadata for n in nodes)  # the index's own nodes are untouched


def test_ingestion_pipeline_precomputes_and_annotates(rag: RagKV, collector: Any) -> None:
    tok = rag.tokenizer
    splitter = SentenceSplitter(chunk_size=80, chunk_overlap=0,
                                tokenizer=lambda t: tokenize_chunk(t, tok))
    transform = RagkvKVTransform(rag)
    docs = [Document(text=topics["while"], metadata={"source": "pydoc:while"})]
    nodes = IngestionPipeline(transformations=[splitter, transform]).run(documents=docs)
    assert len(nodes) >= 2 and transform.computed == len(nodes)
    keys = [n.metadata[KEY] for n in nodes]
    assert all(rag.backend.store.contains(keys).values())
    assert all(KEY not in n.get_content(metadata_mode=MetadataMode.LLM) for n in nodes)
    misses = [e for e in collector.events if isinstance(e, RagkvCacheMissEvent)]
    assert {e.key for e in misses} == set(keys) and {e.stage for e in misses} == {"ingest"}
    again = RagkvKVTransform(rag)
    again(nodes)  # the KV is stored now: nothing to compute
    assert again.computed == 0


def test_the_transform_hands_the_engine_batches_and_shows_progress(rag: RagKV, monkeypatch,
                                                                   capsys) -> None:
    from ragkv.ingest import PRECOMPUTE_BATCH

    batches: list[int] = []
    real = rag.precompute_many

    def counted(chunks):  # the real precompute, with the batch sizes it was handed
        batches.append(len(chunks))
        return real(chunks)

    monkeypatch.setattr(rag, "precompute_many", counted)
    nodes = [TextNode(text=f"{topics['for'][:200]} ({i})") for i in range(PRECOMPUTE_BATCH + 3)]
    transform = RagkvKVTransform(rag, show_progress=True)
    IngestionPipeline(transformations=[transform]).run(nodes=nodes)
    assert batches == [PRECOMPUTE_BATCH, 3] and transform.computed == len(nodes)
    assert all(rag.backend.store.contains([n.metadata[KEY] for n in nodes]).values())
    err = capsys.readouterr().err
    assert "Precomputing KV" in err and f"{len(nodes)}/{len(nodes)}" in err
    quiet = RagkvKVTransform(rag)
    assert quiet.to_dict() == RagkvKVTransform(rag, show_progress=True).to_dict()  # cache hash
    quiet(nodes)
    assert "Precomputing KV" not in capsys.readouterr().err and quiet.computed == 0


@pytest.mark.parametrize("mode,ratio", [("blend", 0.15), ("full", 0.15), ("blend", 1.0)])
def test_query_engine_matches_api(rag: RagKV, mode: str, ratio: float) -> None:
    engine = RagkvQueryEngine(rag=rag, similarity_top_k=3, mode=mode, ratio=ratio,
                              max_new_tokens=NEW)
    response = engine.query(QUESTION)
    expected = api_answer(rag, mode, ratio)
    assert isinstance(response, Response)
    assert response.metadata["ragkv_tokens"] == expected.tokens
    assert response.response == expected.text
    trace = response.metadata["ragkv_trace"]
    assert trace["mode"] == mode and len(response.source_nodes) == 3
    if mode == "blend":
        assert trace["hits"] == 3 and trace["misses"] == 0 and trace["ttft_s"] > 0
        assert trace["recomputed_tokens"] == expected.trace.recomputed_tokens


@pytest.mark.parametrize(("query", "error", "says"), [
    (None, TypeError, "the question"), (42, TypeError, "the question"),
    ("  ", ValueError, "the question is empty"),
])
def test_a_bad_question_is_the_facades_one_line_error(rag: RagKV, query: Any,
                                                      error: type, says: str) -> None:
    import asyncio

    from llama_index.core import QueryBundle

    engine = RagkvQueryEngine(rag=rag, max_new_tokens=NEW)
    for call in (lambda q: engine.query(q), lambda q: asyncio.run(engine.aquery(q))):
        with pytest.raises(error, match=says) as info:
            call(query)
        assert len(str(info.value).splitlines()) == 1
    if isinstance(query, str):
        with pytest.raises(error, match=says):
            engine.query(QueryBundle(query))


@pytest.mark.parametrize(("setting", "says"), [
    ({"mode": "fastest"}, "mode must be one of"), ({"policy": "nope"}, "unknown selection policy"),
    ({"similarity_top_k": 0}, "similarity_top_k must be >= 1"),
    ({"max_new_tokens": 0}, "greater than or equal to 1"), ({"ratio": -1.0}, "recompute ratio"),
])
def test_a_bad_setting_fails_at_construction(rag: RagKV, setting: dict, says: str) -> None:
    """Not at the first query."""
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match=says):
        RagkvQueryEngine(rag=rag, **setting)


def test_streaming_and_async_match_api(rag: RagKV) -> None:
    expected = api_answer(rag)
    engine = RagkvQueryEngine(rag=rag, similarity_top_k=3, max_new_tokens=NEW, streaming=True)
    response = engine.query(QUESTION)
    assert isinstance(response, StreamingResponse)
    assert response.metadata["ragkv_trace"]["hits"] == 3  # prefill is done before streaming
    assert "".join(response.response_gen) == expected.text
    assert response.metadata["ragkv_tokens"] == expected.tokens
    sync = RagkvQueryEngine(rag=rag, similarity_top_k=3, max_new_tokens=NEW)
    response = asyncio.run(sync.aquery(QUESTION))
    assert response.metadata["ragkv_tokens"] == expected.tokens


def test_query_engine_over_a_foreign_retriever(rag: RagKV) -> None:
    nodes = [TextNode(text=topics[t][:400]) for t in ("for", "if")]
    engine = RagkvQueryEngine(rag=rag, retriever=SummaryIndex(nodes).as_retriever(),
                              max_new_tokens=NEW)
    first = engine.query(QUESTION)
    assert first.metadata["ragkv_trace"]["misses"] == 2  # never ingested: computed and stored
    chunks = [tokenize_chunk(n.text, rag.tokenizer) for n in nodes]
    expected = rag.generate(chunks, QUESTION, mode="blend", max_new_tokens=NEW)
    response = engine.query(QUESTION)
    assert response.metadata["ragkv_trace"]["hits"] == 2
    assert response.metadata["ragkv_tokens"] == expected.tokens


def test_instrumentation_sees_cache_events_and_ttft(rag: RagKV, collector: Any) -> None:
    response = RagkvQueryEngine(rag=rag, similarity_top_k=3, max_new_tokens=NEW).query(QUESTION)
    trace = response.metadata["ragkv_trace"]
    hits = [e for e in collector.events if isinstance(e, RagkvCacheHitEvent)]
    ttft = [e for e in collector.events if isinstance(e, RagkvTTFTEvent)]
    assert len(hits) == trace["hits"] == 3
    assert {e.key for e in hits} == {c["key"] for c in trace["chunks"]}
    assert len(ttft) == 1 and ttft[0].ttft_s == trace["ttft_s"]
    assert ttft[0].span_id is not None and "_fuse" in ttft[0].span_id  # inside ragkv's span


def test_query_engine_keeps_the_configured_blend_settings(rag: RagKV, monkeypatch) -> None:
    """The engine's ratio and policy override the app's BlendConfig; its other settings hold."""
    monkeypatch.setattr(rag.config, "blend", BlendConfig(correction="none", coverage=0.9))
    blend = RagkvQueryEngine(rag=rag, similarity_top_k=3, ratio=0.3, policy="hkvd")._blend()
    assert (blend.ratio, blend.policy, blend.correction, blend.coverage) == (
        0.3, "hkvd", "none", 0.9)
    # a facade configured for ratio 0.5 ran its queries at the default 0.12
    monkeypatch.setattr(rag.config, "blend", BlendConfig(ratio=0.5))
    assert RagkvQueryEngine(rag=rag, similarity_top_k=3)._blend().ratio == 0.5
    assert RagkvQueryEngine(rag=rag, similarity_top_k=3, ratio="auto")._blend().ratio == "auto"


def test_node_postprocessors_run_before_fusion_and_unknown_settings_are_refused(
        rag: RagKV) -> None:
    from llama_index.core.postprocessor import SimilarityPostprocessor
    from pydantic import ValidationError

    engine = RagkvQueryEngine(rag=rag, similarity_top_k=3, max_new_tokens=NEW,
                              node_postprocessors=[SimilarityPostprocessor(
                                  similarity_cutoff=0.0)])
    kept = engine.query(QUESTION)
    assert len(kept.source_nodes) == 3
    top = max(n.score for n in kept.source_nodes)
    engine = RagkvQueryEngine(rag=rag, similarity_top_k=3, max_new_tokens=NEW,
                              node_postprocessors=[SimilarityPostprocessor(
                                  similarity_cutoff=top - 1e-6)])
    one = engine.query(QUESTION)
    assert len(one.source_nodes) == 1 and one.metadata["ragkv_trace"]["hits"] == 1
    with pytest.raises(ValidationError, match="similarity_topk"):
        RagkvQueryEngine(rag=rag, similarity_topk=1)


def test_sources_are_the_nodes_the_prompt_holds(rag: RagKV) -> None:
    """A node too long for the window is left out of the prompt, and out of the sources."""
    huge = TextNode(text=(topics["for"] + topics["if"]) * (rag.backend.max_model_len // 400))
    short = TextNode(text=topics["pass"][:400])
    engine = RagkvQueryEngine(rag=rag, retriever=SummaryIndex([huge, short]).as_retriever(),
                              max_new_tokens=NEW)
    response = engine.query(QUESTION)
    assert len(response.metadata["ragkv_trace"]["left_out"]) == 1
    assert [n.node.text for n in response.source_nodes] == [short.text]


def test_async_streaming_is_an_async_stream(rag: RagKV) -> None:
    from llama_index.core.base.response.schema import AsyncStreamingResponse

    expected = api_answer(rag)
    engine = RagkvQueryEngine(rag=rag, similarity_top_k=3, max_new_tokens=NEW, streaming=True)

    async def ask() -> tuple[Any, str]:
        response = await engine.aquery(QUESTION)
        return response, "".join([piece async for piece in response.async_response_gen()])

    response, text = asyncio.run(ask())
    assert isinstance(response, AsyncStreamingResponse)
    assert text.strip() == expected.text
    assert response.metadata["ragkv_tokens"] == expected.tokens


def test_a_pipeline_cache_never_hands_out_another_setups_nodes(rag: RagKV) -> None:
    """The pipeline's cache hashed only the weights: a rerun for another precompute context
    got the first run's nodes back, nothing precomputed, every key naming the other entry."""
    from llama_index.core.ingestion import IngestionCache

    cache, node = IngestionCache(), TextNode(text=topics["with"][:500] + " cache probe", id_="n")
    for facade in (rag.with_config(precompute_context="prefix"), rag):
        transform = RagkvKVTransform(facade)
        (out,) = IngestionPipeline(transformations=[transform], cache=cache).run(
            nodes=[node.model_copy()])
        key = facade.key_for(tokenize_chunk(out.get_content(MetadataMode.LLM), rag.tokenizer))
        assert out.metadata[KEY] == key and facade.backend.stored([key]) == {key: True}


def test_a_top_k_the_retriever_given_would_ignore_is_refused(rag: RagKV) -> None:
    """``similarity_top_k`` reached only ragkv's own retriever or an index: with a retriever
    given, every node it returned went into the prompt."""
    nodes = [TextNode(text=topics[t][:300]) for t in ("for", "if", "while")]
    with pytest.raises(ValueError, match="similarity_top_k=2 does not reach the retriever"):
        RagkvQueryEngine(rag=rag, retriever=SummaryIndex(nodes).as_retriever(),
                         similarity_top_k=2)
    with pytest.raises(ValueError, match="similarity_top_k=2 does not reach the retriever"):
        RagkvQueryEngine(rag=rag, retriever=RagkvRetriever(rag, 4), similarity_top_k=2)
    engine = RagkvQueryEngine(rag=rag, retriever=RagkvRetriever(rag, 2), similarity_top_k=2,
                              max_new_tokens=1)
    assert len(engine.query(QUESTION).source_nodes) == 2


def test_a_node_with_invalid_text_is_the_facades_error(rag: RagKV) -> None:
    bad = TextNode(text="good text \ud800 then", id_="bad")
    engine = RagkvQueryEngine(rag=rag, retriever=SummaryIndex([bad]).as_retriever(),
                              max_new_tokens=1)
    with pytest.raises(ValueError, match="^node bad's text is not valid text"):
        engine.query(QUESTION)
