"""LangChain connector on real LangChain classes: the standard retriever suite, the LCEL runnable
(invoke/batch/stream and async forms, per-call mode and ratio) and cache events in callbacks.

A tiny random Llama saved as a model folder (with SmolLM2's tokenizer) keeps this fast; what is
checked is that answers through LangChain equal answers from the ragkv API token for token.
"""

from __future__ import annotations

import asyncio
from pydoc_data.topics import topics
from typing import Any

import pytest

pytest.importorskip("langchain_core")
pytest.importorskip("langchain_tests")

from langchain_core.callbacks import BaseCallbackHandler  # noqa: E402
from langchain_core.documents import Document  # noqa: E402
from langchain_core.output_parsers import StrOutputParser  # noqa: E402
from langchain_core.runnables import RunnableLambda, RunnableParallel  # noqa: E402
from langchain_tests.integration_tests import RetrieversIntegrationTests  # noqa: E402

from ragkv import BlendConfig, RagKV  # noqa: E402
from ragkv.chunking import tokenize_chunk  # noqa: E402
from ragkv.connectors.langchain import RagkvRetriever, RagkvRunnable  # noqa: E402

QUESTION = "What does the assert statement do?"
OTHER = "What does the del statement delete?"
NEW = 6  # tokens generated per answer: enough to compare, cheap on the tiny model


@pytest.fixture(scope="module")
def rag(pydoc_rag: RagKV) -> RagKV:
    return pydoc_rag


class TestRagkvRetrieverStandard(RetrieversIntegrationTests):
    """LangChain's own retriever suite (k in the constructor and per call, sync and async)."""

    _rag: RagKV | None = None

    @pytest.fixture(autouse=True)
    def _use_rag(self, rag: RagKV) -> None:
        # Autouse fixtures run before the suite's `retriever` fixture reads the params below.
        type(self)._rag = rag

    @property
    def retriever_constructor(self) -> type[RagkvRetriever]:
        return RagkvRetriever

    @property
    def retriever_constructor_params(self) -> dict:
        return {"rag": self._rag, "k": 2}

    @property
    def retriever_query_example(self) -> str:
        return QUESTION


def api(rag: RagKV, question: str = QUESTION, mode: str = "blend", ratio: float = 0.15):
    return rag.ask(question, 3, mode=mode, blend=BlendConfig(ratio=ratio), max_new_tokens=NEW)


def test_documents_carry_cache_keys(rag: RagKV) -> None:
    docs = RagkvRetriever(rag=rag, k=3).invoke(QUESTION)
    chunks = rag.retrieve(QUESTION, 3)
    assert [d.metadata["ragkv_key"] for d in docs] == [c.key for c in chunks]
    assert [d.page_content for d in docs] == [c.text for c in chunks]


@pytest.mark.parametrize("mode,ratio", [("blend", 0.15), ("full", 0.15), ("blend", 0.3)])
def test_invoke_matches_api_with_configurable_mode(rag: RagKV, mode: str, ratio: float) -> None:
    chain = RagkvRunnable(rag=rag, k=3, max_new_tokens=NEW)
    out = chain.invoke({"question": QUESTION},
                       config={"configurable": {"ragkv_mode": mode, "ragkv_ratio": ratio}})
    expected = api(rag, mode=mode, ratio=ratio)
    assert out["tokens"] == expected.tokens and out["answer"] == expected.text
    assert out["trace"]["mode"] == mode
    assert [c["key"] for c in out["chunks"]] == [c.key for c in rag.retrieve(QUESTION, 3)]
    if mode == "blend":
        assert out["trace"]["ratio"] == ratio and out["trace"]["hits"] == 3
        assert out["trace"]["recomputed_tokens"] == expected.trace.recomputed_tokens


def test_batch_stream_and_async_match_api(rag: RagKV) -> None:
    chain = RagkvRunnable(rag=rag, k=3, max_new_tokens=NEW)
    first, second = api(rag), api(rag, OTHER)
    outs = chain.batch([QUESTION, {"question": OTHER}])
    assert [o["tokens"] for o in outs] == [first.tokens, second.tokens]
    streamed = list(chain.stream(QUESTION))  # pieces of invoke's dict, adding up to it
    whole, out = sum(streamed[1:], streamed[0]), chain.invoke(QUESTION)
    assert set(whole) == set(out) and whole["trace"]["mode"] == out["trace"]["mode"]
    assert {k: whole[k] for k in out if k != "trace"} == {k: out[k] for k in out if k != "trace"}
    assert "".join(chain.pick("answer").stream(QUESTION)) == first.text

    async def run_async() -> tuple[Any, ...]:
        one = await chain.ainvoke(QUESTION)
        many = await chain.abatch([QUESTION, OTHER])
        pieces = [p["answer"] async for p in chain.astream(OTHER) if "answer" in p]
        return one, many, pieces

    one, many, pieces = asyncio.run(run_async())
    assert one["tokens"] == first.tokens
    assert [o["tokens"] for o in many] == [first.tokens, second.tokens]
    assert "".join(pieces) == second.text


def test_composes_in_lcel(rag: RagKV) -> None:
    """A chain that read the answer from the output dict failed when streamed: the runnable
    streamed plain text, not pieces of its output."""
    chain = (RunnableLambda(lambda q: {"question": q})
             | RagkvRunnable(rag=rag, k=3, max_new_tokens=NEW)
             | RunnableLambda(lambda out: out["answer"]))
    assert chain.invoke(QUESTION) == "".join(chain.stream(QUESTION)) == api(rag).text
    text = RagkvRunnable(rag=rag, k=3, max_new_tokens=NEW).pick("answer") | StrOutputParser()
    assert text.invoke(QUESTION) == "".join(text.stream(QUESTION)) == api(rag).text


def test_differently_set_up_runnables_share_one_chain_schema(rag: RagKV) -> None:
    """Each runnable declared its own settings as its per-call defaults, so a full-against-
    blend comparison in one chain had conflicting config specs and its schema raised."""
    both = RunnableParallel(full=RagkvRunnable(rag=rag, mode="full", k=2, max_new_tokens=2),
                            blend=RagkvRunnable(rag=rag, ratio=0.3, k=3, max_new_tokens=2))
    fields = both.config_schema().model_json_schema()["$defs"]["Configurable"]["properties"]
    assert {"ragkv_mode", "ragkv_ratio", "ragkv_policy", "ragkv_k"} <= set(fields)
    out = both.invoke(QUESTION, config={"configurable": {"ragkv_mode": None}})
    assert (out["full"]["trace"]["mode"], out["blend"]["trace"]["mode"]) == ("full", "blend")
    assert len(out["full"]["chunks"]) == 2 and out["blend"]["trace"]["ratio"] == 0.3


def test_a_bad_question_or_document_text_is_the_facades_error(rag: RagKV) -> None:
    """A custom retriever was sent an empty question before it was checked; a Document
    holding half a surrogate pair (as a JSON escape leaves) failed in the tokenizer."""
    asked: list[str] = []
    chain = RagkvRunnable(rag=rag, retriever=RunnableLambda(lambda q: asked.append(q) or []))
    with pytest.raises(ValueError, match="^the question is empty$"):
        chain.invoke("   ")
    assert asked == []
    bad = RagkvRunnable(rag=rag, retriever=RunnableLambda(
        lambda _q: [Document(page_content="good text \ud800 then")]))
    with pytest.raises(ValueError, match="page_content is not valid text"):
        bad.invoke(QUESTION)


def test_any_retriever_runnable_feeds_the_chunks(rag: RagKV) -> None:
    chain = RagkvRunnable(rag=rag, retriever=RagkvRetriever(rag=rag, k=3), k=3,
                          max_new_tokens=NEW)
    assert chain.invoke(QUESTION)["tokens"] == api(rag).tokens
    docs = [Document(page_content=topics[t][:300]) for t in ("for", "if")]
    chain = RagkvRunnable(rag=rag, retriever=RunnableLambda(lambda _q: docs),
                          max_new_tokens=NEW)
    assert chain.invoke(QUESTION)["trace"]["misses"] == 2  # never ingested: computed, stored
    ids = [tokenize_chunk(d.page_content, rag.tokenizer) for d in docs]
    expected = rag.generate(ids, QUESTION, mode="blend", max_new_tokens=NEW)
    out = chain.invoke(QUESTION)
    assert out["trace"]["hits"] == 2 and out["tokens"] == expected.tokens


class Recorder(BaseCallbackHandler):
    """A real LangChain callback handler that keeps the custom events it is sent."""

    def __init__(self) -> None:
        self.events: list[tuple[str, dict]] = []

    def on_custom_event(self, name: str, data: Any, **kwargs: Any) -> None:
        self.events.append((name, data))


def test_cache_events_reach_callbacks_and_event_stream(rag: RagKV) -> None:
    recorder = Recorder()
    chain = RagkvRunnable(rag=rag, k=3, max_new_tokens=NEW)
    out = chain.invoke(QUESTION, config={"callbacks": [recorder]})
    events = dict(recorder.events)
    assert events["ragkv_cache"]["hits"] == out["trace"]["hits"] == 3
    assert events["ragkv_ttft"]["ttft_s"] == out["trace"]["ttft_s"]

    async def names() -> list[str]:
        return [e["name"] async for e in chain.astream_events(QUESTION, version="v2")
                if e["event"] == "on_custom_event"]

    assert asyncio.run(names()) == ["ragkv_cache", "ragkv_ttft"]


def test_bad_input_and_mode_are_rejected(rag: RagKV) -> None:
    chain = RagkvRunnable(rag=rag, max_new_tokens=NEW)
    with pytest.raises(TypeError):
        chain.invoke({"query": QUESTION})
    with pytest.raises(ValueError):
        chain.invoke(QUESTION, config={"configurable": {"ragkv_mode": "fastest"}})
    with pytest.raises(ValueError, match="unknown selection policy 'nope'"):
        chain.invoke(QUESTION, config={"configurable": {"ragkv_policy": "nope"}})


@pytest.mark.parametrize(("setting", "says"), [
    ({"mode": "fastest"}, "mode must be one of"), ({"policy": "nope"}, "unknown selection policy"),
    ({"k": 0}, "greater than or equal to 1"), ({"max_new_tokens": 0}, "greater than or equal"),
    ({"ratio": 2.0}, "recompute ratio must be within"),
])
def test_a_bad_setting_fails_at_construction(rag: RagKV, setting: dict, says: str) -> None:
    """Not at the first call, possibly deep inside a served chain."""
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match=says):
        RagkvRunnable(rag=rag, **setting)


def test_runnable_keeps_the_configured_blend_settings(rag: RagKV, monkeypatch) -> None:
    """Per-call mode and ratio override the app's BlendConfig; its other settings hold."""
    monkeypatch.setattr(rag.config, "blend", BlendConfig(correction="none", coverage=0.9,
                                                          policy="hkvd"))
    mode, blend, k = RagkvRunnable(rag=rag, k=3)._options(
        {"configurable": {"ragkv_ratio": 0.3, "ragkv_mode": "reuse"}})
    assert (mode, k, blend.ratio, blend.policy) == ("reuse", 3, 0.3, "hkvd")
    assert blend.correction == "none" and blend.coverage == 0.9


def test_runnable_takes_the_configured_ratio_unless_given_one(rag: RagKV, monkeypatch) -> None:
    """A facade configured for ratio 0.5 ran its chains at the default 0.12."""
    monkeypatch.setattr(rag.config, "blend", BlendConfig(ratio=0.5, policy="hkvd"))
    _, blend, _ = RagkvRunnable(rag=rag)._options(None)
    assert (blend.ratio, blend.policy) == (0.5, "hkvd")
    _, blend, _ = RagkvRunnable(rag=rag, ratio=0.2)._options(
        {"configurable": {"ragkv_ratio": "auto"}})
    assert blend.ratio == "auto"


def test_the_output_names_the_chunks_the_prompt_holds(rag: RagKV) -> None:
    """A document too long for the window is left out of the prompt, and out of "chunks"."""
    longer_than_the_window = (topics["for"] + topics["if"]) * (rag.backend.max_model_len // 400)
    huge = Document(page_content=longer_than_the_window)
    short = Document(page_content=topics["pass"][:400])
    chain = RagkvRunnable(rag=rag, retriever=RunnableLambda(lambda _: [huge, short]),
                          max_new_tokens=NEW)
    out = chain.invoke(QUESTION)
    assert len(out["trace"]["left_out"]) == 1
    assert [c["text"] for c in out["chunks"]] == [short.page_content]


@pytest.mark.parametrize("k", [0, -1, 2.9, True, "2"])
def test_a_per_call_k_is_checked_as_the_facade_checks_it(rag: RagKV, k: Any) -> None:
    chain = RagkvRunnable(rag=rag, retriever=RunnableLambda(lambda _: []), max_new_tokens=NEW)
    with pytest.raises(ValueError, match="ragkv_k must be a whole number of chunks >= 1"):
        chain.invoke(QUESTION, config={"configurable": {"ragkv_k": k}})
    with pytest.raises((ValueError, TypeError), match="k must be"):
        RagkvRetriever(rag=rag).invoke(QUESTION, k=k)


def test_runnables_on_facades_sharing_one_engine_take_turns(rag: RagKV, monkeypatch) -> None:
    """``with_config`` facades share their engine: their runnables must not drive it at once
    (the lock was the facade's, so the two ran inside the engine together)."""
    import threading
    import time

    other = rag.with_config(blend=BlendConfig(ratio=0.3))
    inside, most, guard = 0, 0, threading.Lock()
    generate = rag.backend.generate

    def counted(request):
        nonlocal inside, most
        with guard:
            inside += 1
            most = max(most, inside)
        time.sleep(0.05)  # long enough for the other thread to arrive
        try:
            return generate(request)
        finally:
            with guard:
                inside -= 1

    monkeypatch.setattr(rag.backend, "generate", counted)
    chains = [RagkvRunnable(rag=r, k=2, max_new_tokens=2) for r in (rag, other)]
    threads = [threading.Thread(target=c.batch, args=([QUESTION, OTHER],)) for c in chains]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert most == 1
    other.index.close()
