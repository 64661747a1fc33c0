"""RagKV end to end on a tiny random Llama that speaks SmolLM2's tokenizer (real chat template).

Ingestion runs once per module into a seed home folder; each test works on its own copy, so
faults injected into one test's blobs or index never leak into another.
"""

from __future__ import annotations

import time

import pytest
from api_cases import (  # noqa: F401 - fixtures are used by name
    MAX_NEW,
    MODES,
    QUESTION,
    _docs,
    _one_thread,
    blob_path,
    engine,
    make_config,
    rag,
    seed,
    three_chunks,
)

from ragkv.api import RagKV, RetrievedChunk
from ragkv.cache_index.blobs import BlobStore
from ragkv.config import BlendConfig
from ragkv.keys import KV_LAYOUT, chunk_key, context_digest

# ---- ingestion -----------------------------------------------------------------------------

def test_ingest_stores_chunks_and_kv(seed, rag):
    _, results, again, stats = seed
    assert [r.new_document for r in results] == [True, True]
    n_chunks = sum(r.n_chunks for r in results)
    assert all(r.n_chunks >= 1 for r in results) and n_chunks >= 4
    assert [r.precomputed for r in results] == [r.n_chunks for r in results]
    assert stats["documents"] == 2
    assert stats["chunks"] == n_chunks
    # One entry per chunk plus the template prefix (the chunks are all distinct).
    assert stats["kv_entries"] == n_chunks + 1
    assert stats["kv_tokens"] == sum(c.n_tokens for c in rag.index.chunks()) + len(
        rag.template.prefix_ids)
    # Re-ingesting the same document computes nothing.
    assert not again.new_document and again.precomputed == 0
    assert again.precomputed_tokens == 0
    assert sum(r.precomputed_tokens for r in results) == sum(
        c.n_tokens for c in rag.index.chunks()), "every computed chunk's tokens, once"
    assert again.n_chunks == results[0].n_chunks
    # Stored chunks carry the key the API computes, and every key has a readable entry.
    for c in rag.index.chunks():
        assert c.cache_key == rag.key_for(c.token_ids)
        assert 0 < c.n_tokens <= 64 * 1.1 + 1
        entry = rag.index.get_entry(c.cache_key)
        assert entry is not None and entry.n_tokens == c.n_tokens
        assert entry.model_fp == rag.fingerprint and entry.layout == KV_LAYOUT
        assert blob_path(rag, c.cache_key).is_file()
        assert rag.precompute(c.token_ids) is False


def test_empty_document_rejected(rag):
    with pytest.raises(ValueError, match="empty"):
        rag.ingest_text("blank", "  \n ")


def test_a_chunk_retrieved_twice_is_loaded_or_computed_once(rag, tokenizer, monkeypatch):
    ids = list(tokenizer("A chunk a retriever returned twice, about caching.",
                         add_special_tokens=False).input_ids)
    other = three_chunks(rag)[0]
    computed = []
    compute = rag.backend.engine.precompute

    def counting(span, *args, **kwargs):
        computed.append(list(span))
        return compute(span, *args, **kwargs)

    monkeypatch.setattr(rag.backend.engine, "precompute", counting)
    twice = rag.generate([other, ids, ids, ids], QUESTION, max_new_tokens=MAX_NEW, keep_kv=True)
    assert computed == [ids]
    assert [c.hit for c in twice.trace.chunks] == [True, False, False, False]
    full = rag.generate([other, ids, ids, ids], QUESTION, mode="full", max_new_tokens=MAX_NEW)
    assert twice.tokens == full.tokens
    assert twice.score([]) == []  # no target: no rows
    assert len(twice.score(twice.tokens[:2])) == 2


# ---- generation ----------------------------------------------------------------------------

@pytest.mark.parametrize("mode", MODES)
def test_generate_every_mode(rag, mode):
    chunks = three_chunks(rag)
    ans = rag.generate(chunks, QUESTION, mode=mode, max_new_tokens=MAX_NEW)
    t = ans.trace
    assert 1 <= len(ans.tokens) <= MAX_NEW
    assert isinstance(ans.text, str)
    assert t.mode == mode and t.context_tokens == len(ans.prompt)
    assert t.ttft_s > 0 and t.fuse_s > 0
    assert t.ttft_s >= t.lookup_s + t.load_s + t.precompute_s + t.fuse_s
    assert len(t.recomputed_per_layer) == rag.backend.engine.runner.n_layers
    looked_up = {"full": 0, "prefix": 1, "reuse": 3, "blend": 3}[mode]
    assert t.hits + t.misses == looked_up and len(t.chunks) == 3  # hit=None: never looked up
    assert [c.start for c in t.chunks] == [s for s, _ in ans.prompt.chunk_spans]
    assert [c.key for c in t.chunks] == [c.key for c in chunks]
    T = len(ans.prompt)
    first_end = ans.prompt.chunk_spans[0][1]
    if mode == "full":
        assert t.recomputed_per_layer == [T] * rag.backend.engine.runner.n_layers
    elif mode == "prefix":
        # The first chunk was precomputed after the template prefix: exact, never recomputed.
        assert t.chunks[0].hit
        assert t.recomputed_per_layer == [T - first_end] * rag.backend.engine.runner.n_layers
    elif mode == "reuse":
        assert t.hits == 3
        assert t.recomputed_per_layer == [len(ans.prompt.uncached_positions())] * len(
            t.recomputed_per_layer)
        assert all(c.recomputed == 0 for c in t.chunks)
    else:
        assert t.hits == 3 and t.ratio == rag.config.blend.ratio and t.policy == "qhkvd"
        assert t.recomputed_per_layer[0] == T - first_end
        assert t.recomputed_per_layer[-1] < T - first_end
        assert t.recomputed_tokens == t.recomputed_per_layer[-1]
        assert t.chunks[0].recomputed == 0  # exact prefix chunk
        assert 0 < sum(c.recomputed for c in t.chunks) < sum(c.n_tokens for c in t.chunks)
        assert t.load_s > 0
    assert rag.index.stats()["queries"] == 1
    logged = rag.index.recent_queries(1)[0]
    assert logged["mode"] == mode and logged["hits"] == t.hits


def test_blend_at_ratio_one_matches_full(rag):
    chunks = three_chunks(rag)
    full = rag.generate(chunks, QUESTION, mode="full", max_new_tokens=MAX_NEW, keep_kv=True)
    one = rag.generate(chunks, QUESTION, mode="blend", blend=BlendConfig(ratio=1.0),
                       max_new_tokens=MAX_NEW, keep_kv=True)
    prefix = rag.generate(chunks, QUESTION, mode="prefix", max_new_tokens=MAX_NEW,
                          keep_kv=True)
    assert one.tokens == full.tokens == prefix.tokens
    assert (one.first.logits - full.first.logits).abs().max() < 1e-4
    assert (prefix.first.logits - full.first.logits).abs().max() < 1e-4
    assert full.generation is not None and rag.generate(chunks, QUESTION, mode="full",
                                                   max_new_tokens=1).generation is None


def test_reuse_of_single_chunk_matches_full_with_prefix_context(rag):
    """precompute_context=prefix: a lone chunk was prefilled after the very template prefix it
    follows, so plain reuse is exact."""
    chunk = three_chunks(rag)[:1]
    full = rag.generate(chunk, QUESTION, mode="full", max_new_tokens=MAX_NEW, keep_kv=True)
    reuse = rag.generate(chunk, QUESTION, mode="reuse", max_new_tokens=MAX_NEW, keep_kv=True)
    assert reuse.trace.hits == 1
    assert reuse.tokens == full.tokens
    assert (reuse.first.logits - full.first.logits).abs().max() < 1e-4


def test_generate_with_plain_token_lists(rag):
    ids = [c.token_ids for c in three_chunks(rag)]
    ans = rag.generate(ids, QUESTION, mode="blend", max_new_tokens=2)
    assert ans.trace.hits == 3
    assert [c.key for c in ans.trace.chunks] == [rag.key_for(i) for i in ids]


def test_chunks_given_as_text_read_the_ingested_kv(rag):
    """A chunk's text is tokenized as ingestion tokenized it, so it names the same KV."""
    chunks = three_chunks(rag)
    by_ids = rag.generate(chunks, QUESTION, mode="blend", max_new_tokens=MAX_NEW)
    by_text = rag.generate([c.text for c in chunks], QUESTION, mode="blend",
                           max_new_tokens=MAX_NEW)
    assert by_text.trace.hits == 3 and by_text.trace.misses == 0
    assert [c.key for c in by_text.trace.chunks] == [c.key for c in by_ids.trace.chunks]
    assert by_text.tokens == by_ids.tokens
    assert rag.precompute(chunks[0].text) is False  # stored already


def test_unknown_chunks_are_computed_and_stored(rag, tokenizer):
    ids = list(tokenizer("A chunk nobody ingested, about caching.", add_special_tokens=False)
               .input_ids)
    key = rag.key_for(ids)
    assert rag.index.get_entry(key) is None
    first = rag.generate([ids], QUESTION, mode="blend", max_new_tokens=MAX_NEW)
    assert first.trace.misses == 1 and first.trace.precompute_s > 0
    assert rag.index.get_entry(key) is not None
    second = rag.generate([ids], QUESTION, mode="blend", max_new_tokens=MAX_NEW)
    assert second.trace.hits == 1
    assert second.tokens == first.tokens


# ---- precompute contexts -------------------------------------------------------------------

def test_cold_and_prefix_contexts(tmp_path, engine, rag):
    ids = three_chunks(rag)[0].token_ids
    cold = RagKV(make_config(tmp_path / "cold", precompute_context="cold"), engine=engine)
    assert cold.key_for(ids) != rag.key_for(ids)
    assert rag.key_for(ids) == chunk_key(engine.fingerprint, ids,
                                         context=context_digest(rag.template.prefix_ids),
                                         kv_dtype="float32")
    assert cold.key_for(ids) == chunk_key(engine.fingerprint, ids, kv_dtype="float32")
    chunks = [c.token_ids for c in three_chunks(rag)]
    assert all(cold.precompute(c) for c in chunks)
    assert not any(cold.precompute(c) for c in chunks)
    full = cold.generate(chunks, QUESTION, mode="full", max_new_tokens=MAX_NEW)
    for mode in MODES:
        a = cold.generate(chunks, QUESTION, mode=mode, max_new_tokens=MAX_NEW, keep_kv=True)
        assert 1 <= len(a.tokens) <= MAX_NEW and a.trace.ttft_s > 0
        if mode in ("reuse", "blend"):
            assert a.trace.hits == 3
    # Cold context: prefix mode has only the template prefix exact and must still equal full.
    pre = cold.generate(chunks, QUESTION, mode="prefix", max_new_tokens=MAX_NEW)
    assert pre.tokens == full.tokens
    T, P = pre.trace.context_tokens, len(cold.template.prefix_ids)
    assert pre.trace.recomputed_per_layer == [T - P] * engine.runner.n_layers
    # ... and blend at 1.0 recomputes every chunk token, first chunk included.
    one = cold.generate(chunks, QUESTION, mode="blend", blend=BlendConfig(ratio=1.0),
                        max_new_tokens=MAX_NEW)
    assert one.tokens == full.tokens
    assert one.trace.recomputed_per_layer == [T - P] * engine.runner.n_layers
    # The two contexts never read each other's entries.
    assert cold.index.get_entry(rag.key_for(chunks[0])) is None
    cold.index.close()


def test_cold_prefix_mode_reads_no_chunk_kv(tmp_path, engine, rag):
    chunks = [c.token_ids for c in three_chunks(rag)]
    cold = RagKV(make_config(tmp_path / "cold", precompute_context="cold"), engine=engine)
    try:
        ans = cold.generate(chunks, QUESTION, mode="prefix", max_new_tokens=2)
        P = len(cold.template.prefix_ids)
        assert ans.trace.recomputed_per_layer[-1] == len(ans.prompt) - P  # only prefix reused
        assert ans.trace.precompute_s == 0.0 and ans.trace.load_s == 0.0
        assert cold.index.get_entry(cold.key_for(chunks[0])) is None
    finally:
        cold.index.close()


# ---- ask -----------------------------------------------------------------------------------

def test_ask_retrieves_and_answers(rag):
    ans = rag.ask(QUESTION, k=2, mode="blend", max_new_tokens=MAX_NEW)
    t = ans.trace
    assert len(t.chunks) == 2
    assert t.retrieval_s is not None and t.retrieval_s > 0
    assert t.ttft_s > 0
    assert all(c.document in _docs() for c in t.chunks)
    assert t.chunks[0].document == "doc:assert"
    assert 1 <= len(ans.tokens) <= MAX_NEW
    assert t.hits == 2
    logged = rag.index.recent_queries(1)[0]
    assert logged["retrieval_s"] == pytest.approx(t.retrieval_s)
    assert rag.index.stats()["queries"] == 1
    got = rag.retrieve(QUESTION, k=2)
    assert [g.key for g in got] == [c.key for c in t.chunks]
    assert all(g.text and g.score is not None for g in got)


# ---- TTFT is measured (docs/design.md §3.7) ------------------------------------------------

DELAY = 0.3  # seconds injected into one step; far above the tiny model's TTFT (~10-30 ms)


def _parts(t) -> float:
    return t.lookup_s + t.load_s + t.precompute_s + t.fuse_s


def test_ttft_covers_lookup_load_precompute_and_fusion(rag, tokenizer):
    """TTFT runs from the request to the first token, so it contains every measured step."""
    unknown = list(tokenizer("A chunk nobody ingested, about caching.",
                             add_special_tokens=False).input_ids)
    chunks = [*three_chunks(rag)[:2], unknown]
    traces = [rag.generate(chunks, QUESTION, mode=mode, max_new_tokens=1).trace
              for mode in ("reuse", *MODES)]  # reuse first: the unknown chunk misses there
    assert traces[0].misses == 1 and traces[0].precompute_s > 0 and traces[0].load_s > 0
    for t in traces:
        assert t.ttft_s >= _parts(t) > 0, t.mode


def test_a_slow_blob_read_raises_ttft(rag, monkeypatch):
    """A delay in reading the cached KV's blobs is inside TTFT (and load_s), in full."""
    chunks = three_chunks(rag)
    rag.generate(chunks, QUESTION, max_new_tokens=1)  # warm: the backend keeps the prefix KV
    plain = rag.generate(chunks, QUESTION, max_new_tokens=1).trace
    reads: list[str] = []
    get = BlobStore.get

    def slow_get(self, name):
        reads.append(name)
        time.sleep(DELAY)
        return get(self, name)

    monkeypatch.setattr(BlobStore, "get", slow_get)
    slow = rag.generate(chunks, QUESTION, max_new_tokens=1).trace
    assert slow.hits == 3 and len(reads) == 3  # one disk read per chunk, no memory tier
    assert slow.load_s >= len(reads) * DELAY
    assert slow.ttft_s >= len(reads) * DELAY
    assert slow.ttft_s >= plain.ttft_s + DELAY
    assert slow.ttft_s >= _parts(slow)


def test_a_slow_retrieval_shows_in_retrieval_s_not_in_ttft(rag, monkeypatch):
    """Retrieval is reported apart: a delay there moves retrieval_s and leaves TTFT alone."""
    rag.ask(QUESTION, k=2, max_new_tokens=1)  # warm: embedder, FAISS index, prefix KV
    plain = rag.ask(QUESTION, k=2, max_new_tokens=1).trace
    retrieve = rag.retrieve
    calls = []

    def slow_retrieve(question, k=4):
        calls.append(question)
        time.sleep(DELAY)
        return retrieve(question, k)

    monkeypatch.setattr(rag, "retrieve", slow_retrieve)
    slow = rag.ask(QUESTION, k=2, max_new_tokens=1).trace
    assert calls == [QUESTION]
    assert [c.key for c in slow.chunks] == [c.key for c in plain.chunks]
    assert slow.retrieval_s >= DELAY
    # Without the delay in it, TTFT stays where it was (slack for a noisy machine).
    assert slow.ttft_s < max(DELAY, plain.ttft_s + DELAY / 2)
    assert slow.ttft_s >= _parts(slow)


def test_ask_with_nothing_ingested(tmp_path, engine):
    rag = RagKV(make_config(tmp_path / "empty"), engine=engine)
    with pytest.raises(LookupError):
        rag.ask(QUESTION)
    assert rag.retrieve(QUESTION) == []
    with pytest.raises(ValueError):
        rag.retrieve(QUESTION, k=0)
    # The (empty) retriever built by that ask learns about documents ingested afterwards.
    rag.ingest_text("doc:pass", _docs()["doc:pass"])
    ans = rag.ask("What does pass do?", k=1, max_new_tokens=2)
    assert [c.document for c in ans.trace.chunks] == ["doc:pass"]
    assert ans.trace.hits == 1
    rag.index.close()


@pytest.mark.parametrize("mode", MODES)
def test_generate_without_chunks(rag, mode):
    ans = rag.generate([], QUESTION, mode=mode, max_new_tokens=3, keep_kv=True)
    assert ans.trace.chunks == [] and ans.prompt.chunk_spans == []
    full = rag.generate([], QUESTION, mode="full", max_new_tokens=3, keep_kv=True)
    assert ans.tokens == full.tokens
    assert (ans.first.logits - full.first.logits).abs().max() < 1e-4


def test_float16_storage_stays_close(tmp_path, engine, rag):
    """Default fp16 storage: answers over cached KV stay close to full prefill."""
    r16 = RagKV(make_config(tmp_path / "h16", kv_dtype="float16"), engine=engine)
    chunks = [c.token_ids for c in three_chunks(rag)]
    full = r16.generate(chunks, QUESTION, mode="full", max_new_tokens=1, keep_kv=True)
    r16.generate(chunks, QUESTION, mode="reuse", max_new_tokens=1)  # stores the entries
    one = r16.generate(chunks, QUESTION, mode="blend", blend=BlendConfig(ratio=1.0),
                       max_new_tokens=1, keep_kv=True)
    assert one.trace.hits == 3
    assert r16.index.get_entry(r16.key_for(chunks[0])).dtype == "float16"
    assert (one.first.logits - full.first.logits).abs().max() < 1e-2
    r16.index.close()


def test_stream_yields_the_same_text_as_generate(rag):
    chunks = three_chunks(rag)
    whole = rag.generate(chunks, QUESTION, mode="blend", max_new_tokens=MAX_NEW)
    stream = rag.stream(chunks, QUESTION, mode="blend", max_new_tokens=MAX_NEW)
    assert stream.trace.ttft_s > 0 and stream.answer is None  # prefill done, nothing decoded
    pieces = list(stream)
    assert "".join(pieces).strip() == whole.text
    assert stream.answer is not None and stream.answer.tokens == whole.tokens


def test_a_wrong_key_handed_in_never_loads_another_chunks_kv(rag):
    a, b = three_chunks(rag)[:2]
    n = min(len(a.token_ids), len(b.token_ids))
    honest = RetrievedChunk(a.token_ids[:n], rag.key_for(a.token_ids[:n]))
    lying = RetrievedChunk(a.token_ids[:n], rag.key_for(b.token_ids[:n]))  # b's key, a's ids
    rag.precompute(b.token_ids[:n])
    want = rag.generate([honest], QUESTION, mode="reuse", max_new_tokens=MAX_NEW)
    got = rag.generate([lying], QUESTION, mode="reuse", max_new_tokens=MAX_NEW)
    assert got.tokens == want.tokens
    assert got.trace.chunks[0].key == honest.key


def test_a_streams_pieces_join_to_the_answers_text(rag):
    """Streamed as decoded, an answer's pieces began with the "\\n\\n" or space its text does
    not have, and ended with what it strips; every front end that streamed them showed it."""
    from ragkv.api import TokenStream

    class Given(TokenStream):
        def __init__(self, pieces: list[str]) -> None:
            self.given, self.answer = pieces, None

        def _pieces(self):
            yield from self.given

    pieces = ["\n\n", " The", " answer", " ", "\n", "is", " 4", ".", " \n"]
    assert list(Given(pieces)) == ["The", " answer", " \nis", " 4", "."]
    assert list(Given([" ", "\n"])) == []
    for question in (QUESTION, "Why?", "What is a with statement?"):
        stream = rag.ask_stream(question, k=2, max_new_tokens=MAX_NEW)
        assert "".join(stream) == stream.answer.text
