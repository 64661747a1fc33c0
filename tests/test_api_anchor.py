"""Anchor-context precompute (``precompute_context="anchor"``) on a tiny random Llama.

Every chunk has two entries: prefilled after the template prefix (read when the chunk comes
first, where it is exact) and after the prefix and the anchor passage (read everywhere else).
Each entry must hold exactly what prefilling those tokens gives, on ingestion and on a miss.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import torch
from api_cases import (  # noqa: F401 - fixtures are used by name
    MAX_NEW,
    QUESTION,
    _one_thread,
    engine,
    make_config,
    rag,
    seed,
    three_chunks,
)

from ragkv.anchor import ANCHOR_SETTING, ANCHOR_TEXT, MIN_CORPUS_ANCHOR_TOKENS, corpus_anchor
from ragkv.api import RagKV
from ragkv.config import BlendConfig, RagkvConfig
from ragkv.engine.kv import ChunkKV


@pytest.fixture
def anchored(tmp_path, engine):
    r = RagKV(make_config(tmp_path / "anchor", precompute_context="anchor"), engine=engine)
    yield r
    r.index.close()


def stored_kv(rag: RagKV, key: str, n: int) -> ChunkKV:
    loaded = rag.backend.chunks.load(key, n)
    assert loaded is not None, f"no entry for {key[:12]}"
    return loaded[0]


def prefilled_after(rag: RagKV, before: list[int], ids: list[int]) -> ChunkKV:
    """The chunk's KV from one plain prefill of ``before + ids`` from position 0."""
    kv = rag.backend.engine.precompute(before + ids)
    return ChunkKV(kv.k[:, :, len(before):], kv.v[:, :, len(before):])


def assert_same(a: ChunkKV, b: ChunkKV) -> None:
    torch.testing.assert_close(a.k, b.k, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(a.v, b.v, atol=2e-5, rtol=1e-4)


def test_the_anchor_is_the_default_passage_and_can_be_replaced(anchored, rag, engine, tmp_path):
    keys = anchored.backend.keys
    sep = list(anchored.template.sep_ids)
    anchor = list(keys.before("anchor"))[len(anchored.template.prefix_ids):]
    assert anchor[-len(sep):] == sep and len(anchor) > 300
    assert anchored.tokenizer.decode(anchor[:-len(sep)]) == ANCHOR_TEXT
    ids = three_chunks(rag)[0].token_ids
    other = RagKV(make_config(tmp_path / "other", precompute_context="anchor",
                              anchor_text="A different passage."), engine=engine)
    try:
        assert other.key_for(ids) != anchored.key_for(ids)
    finally:
        other.index.close()
    # retrievers hand out the anchor entry's key; the prefix entry is the prefix context's
    assert anchored.key_for(ids) == keys.chunk(ids, "anchor") != rag.key_for(ids)
    assert keys.chunk(ids, "prefix") == rag.key_for(ids)


def test_ingestion_stores_both_entries_as_prefilling_gives_them(anchored, rag):
    chunks = [c.token_ids for c in three_chunks(rag)]
    assert anchored.precompute_many(chunks) == [True] * 3
    assert anchored.precompute_many(chunks) == [False] * 3
    keys, P = anchored.backend.keys, list(anchored.template.prefix_ids)
    for ids in chunks:
        assert_same(stored_kv(anchored, keys.chunk(ids, "anchor"), len(ids)),
                    prefilled_after(anchored, list(keys.before("anchor")), ids))
        assert_same(stored_kv(anchored, keys.chunk(ids, "prefix"), len(ids)),
                    prefilled_after(anchored, P, ids))
    # a chunk that lost one entry is computed again (that entry only)
    anchored.backend.chunks.store.delete(keys.chunk(chunks[1], "prefix"))
    assert anchored.precompute_many(chunks) == [False, True, False]
    assert anchored.index.get_entry(keys.chunk(chunks[1], "prefix")) is not None


def test_first_chunk_reads_its_exact_prefix_entry(anchored, rag, engine):
    chunks = [c.token_ids for c in three_chunks(rag)]
    anchored.precompute_many(chunks)
    full = anchored.generate(chunks, QUESTION, mode="full", max_new_tokens=MAX_NEW)
    pre = anchored.generate(chunks, QUESTION, mode="prefix", max_new_tokens=MAX_NEW)
    assert pre.tokens == full.tokens and pre.trace.hits == 1
    T, P = pre.trace.context_tokens, len(anchored.template.prefix_ids)
    assert pre.trace.recomputed_per_layer == [T - P - len(chunks[0])] * engine.runner.n_layers
    blend = anchored.generate(chunks, QUESTION, mode="blend", max_new_tokens=MAX_NEW)
    keys = anchored.backend.keys
    assert [c.key for c in blend.trace.chunks] == [keys.chunk(chunks[0], "prefix"),
                                                   *(keys.chunk(c, "anchor") for c in chunks[1:])]
    assert blend.trace.hits == 3 and blend.trace.chunks[0].recomputed == 0
    # every non-exact token recomputed: full prefill's answer
    one = anchored.generate(chunks, QUESTION, mode="blend", blend=BlendConfig(ratio=1.0),
                            max_new_tokens=MAX_NEW)
    assert one.tokens == full.tokens


def test_a_miss_is_prefilled_after_the_anchor_and_stored(anchored, rag):
    chunks = [c.token_ids for c in three_chunks(rag)]
    a = anchored.generate(chunks, QUESTION, mode="blend", max_new_tokens=MAX_NEW)
    assert a.trace.misses == 3
    keys = anchored.backend.keys
    assert_same(stored_kv(anchored, keys.chunk(chunks[2], "anchor"), len(chunks[2])),
                prefilled_after(anchored, list(keys.before("anchor")), chunks[2]))
    assert anchored.index.get_entry(keys.chunk(chunks[0], "anchor")) is None  # not asked for
    b = anchored.generate(chunks, QUESTION, mode="blend", max_new_tokens=MAX_NEW)
    assert b.trace.hits == 3 and b.tokens == a.tokens


def test_a_miss_is_scored_as_ingestion_scores_it(anchored, rag, tmp_path, engine):
    """With both of a chunk's entries missing, the anchor entry a query computed was stored
    unscored, and every preselection it was later in chose otherwise than with the entries
    ingestion stores."""
    chunks = [c.token_ids for c in three_chunks(rag)]
    anchored.generate(chunks, QUESTION, mode="blend", max_new_tokens=1)  # all missing
    ingested = RagKV(make_config(tmp_path / "ingested", precompute_context="anchor"),
                     engine=engine)
    try:
        ingested.precompute_many(chunks)
        keys = anchored.backend.keys
        for ids in chunks[1:]:
            key = keys.chunk(ids, "anchor")
            score = stored_kv(anchored, key, len(ids)).score
            assert score is not None
            torch.testing.assert_close(score, stored_kv(ingested, key, len(ids)).score)
    finally:
        ingested.index.close()


@pytest.mark.parametrize("bad, match", [
    ({"precompute_context": "neighbours"}, "'cold', 'prefix' or 'anchor', got 'neighbours'"),
    ({"anchor_text": "  "}, "anchor_text is empty"),
    ({"anchor_source": "documents"}, "'corpus' or 'builtin', got 'documents'"),
])
def test_bad_anchor_settings_are_refused(tmp_path, bad, match):
    with pytest.raises(ValueError, match=match):
        RagkvConfig(home=tmp_path, **bad)


def test_the_anchor_is_the_engines_and_cannot_change_under_it(anchored):
    with pytest.raises(ValueError, match="fixed when the engine is built"):
        anchored.with_config(anchor_text="Another passage.")
    assert anchored.with_config(precompute_context="prefix").config.anchor_text is None


# ---- the corpus anchor (anchor_source="corpus", the default) -------------------------------
def _corpus() -> dict[str, str]:
    from pydoc_data.topics import topics

    return {name: topics[name][:1500] for name in ("assert", "pass", "del", "return")}


def test_corpus_anchor_picks_the_most_typical_text_within_its_budget(rag):
    tok = rag.tokenizer
    texts = ["the cat sat on the mat with the dog", "a cat and a dog sat on a mat",
             "the dog and the cat sat together on the mat today",
             "quarterly revenue rose in all regions of the company"]
    picked = corpus_anchor(texts, tok, tokens=MIN_CORPUS_ANCHOR_TOKENS)
    assert picked is None  # under 64 tokens in all: the neutral passage stays
    long = [t * 12 for t in texts]
    picked = corpus_anchor(long, tok, tokens=200)
    assert picked is not None and picked == corpus_anchor(long[::-1], tok, tokens=200)
    assert not picked.startswith("quarterly") and "quarterly" not in picked  # the outlier
    assert 150 < len(tok(picked, add_special_tokens=False)["input_ids"]) <= 201
    docs = list(_corpus().values())
    assert len(tok(corpus_anchor(docs, tok), add_special_tokens=False)["input_ids"]) <= 513


def test_first_ingestion_records_the_corpus_anchor_and_every_facade_reads_it(tmp_path, engine):
    home, docs = tmp_path / "corpus", _corpus()
    first = RagKV(make_config(home, precompute_context="anchor"), engine=engine)
    builtin_before = first.backend.keys.before("anchor")
    chosen = first.choose_anchor(list(docs.values()))
    assert chosen is not None and chosen[:60] in "\n\n".join(docs.values())
    assert first.index.setting(ANCHOR_SETTING) == chosen
    for name, text in docs.items():
        first.ingest_text(name, text)
    assert first.choose_anchor(["another corpus " * 50]) == chosen  # recorded once
    keys = first.backend.keys
    assert keys.before("anchor") != builtin_before
    assert keys.anchor_ids == first.template.anchor_ids(chosen)
    chunk = first.index.chunks()[1]
    assert chunk.cache_key == keys.chunk(chunk.token_ids, "anchor")  # retrievers hand it out
    assert_same(stored_kv(first, chunk.cache_key, len(chunk.token_ids)),
                prefilled_after(first, list(keys.before("anchor")), chunk.token_ids))
    chunks = [c.token_ids for c in first.index.chunks()[:3]]
    first.index.close()
    # another process on the same cache reads the recorded passage: every chunk a hit
    second = RagKV(make_config(home, precompute_context="anchor"), engine=engine)
    try:
        assert second.key_for(chunk.token_ids) == chunk.cache_key
        ans = second.generate(chunks, QUESTION, mode="blend", max_new_tokens=MAX_NEW)
        assert ans.trace.hits == 3 and ans.trace.misses == 0
        with pytest.raises(ValueError, match="fixed when the engine is built"):
            second.with_config(anchor_source="builtin")
    finally:
        second.index.close()
    neutral = RagKV(make_config(home, precompute_context="anchor", anchor_source="builtin"),
                    engine=engine)
    try:
        assert neutral.backend.keys.before("anchor") == builtin_before
        assert neutral.choose_anchor(list(docs.values())) is None
    finally:
        neutral.index.close()


def test_a_facade_opened_before_the_first_ingestion_adopts_the_recorded_passage(tmp_path,
                                                                                 engine):
    home, docs = tmp_path / "late", _corpus()
    early = RagKV(make_config(home, precompute_context="anchor"), engine=engine)
    writer = RagKV(make_config(home, precompute_context="anchor"), engine=engine)
    try:
        neutral = early.backend.keys.anchor_ids
        for name, text in docs.items():
            writer.ingest_text(name, text)
        recorded = writer.index.setting(ANCHOR_SETTING)
        assert recorded is not None and early.backend.keys.anchor_ids == neutral
        chunks = [c.token_ids for c in writer.index.chunks()[:3]]
        # its next query reads the passage: the writer's entries are hits, none recomputed
        ans = early.generate(chunks, QUESTION, mode="blend", max_new_tokens=MAX_NEW)
        assert early.backend.keys.anchor_ids == early.template.anchor_ids(recorded)
        assert ans.trace.hits == 3 and ans.trace.misses == 0
        late = RagKV(make_config(home, precompute_context="anchor"), engine=engine)
        try:  # a precompute reads it too: nothing to compute
            assert late.precompute_many(chunks) == [False] * 3
        finally:
            late.index.close()
    finally:
        early.index.close()
        writer.index.close()


def test_a_cache_emptied_of_documents_picks_its_next_corpus_passage(tmp_path, engine):
    home, docs = tmp_path / "replaced", _corpus()
    old, new = dict(list(docs.items())[:2]), dict(list(docs.items())[2:])
    writer = RagKV(make_config(home, precompute_context="anchor"), engine=engine)
    reader = RagKV(make_config(home, precompute_context="anchor"), engine=engine)
    try:
        writer.choose_anchor(list(old.values()))
        for name, text in old.items():
            writer.ingest_text(name, text)
        first = writer.index.setting(ANCHOR_SETTING)
        chunks = [c.token_ids for c in writer.index.chunks()[:2]]
        assert reader.generate(chunks, QUESTION, mode="blend", max_new_tokens=1).trace.hits == 2
        writer.remove_document(next(iter(old)))
        assert writer.index.setting(ANCHOR_SETTING) == first  # chunks are left
        for name in old:
            writer.remove_document(name)
        assert writer.index.setting(ANCHOR_SETTING) is None  # none left: forgotten
        writer.choose_anchor(list(new.values()))
        for name, text in new.items():
            writer.ingest_text(name, text)
        second = writer.index.setting(ANCHOR_SETTING)
        assert second is not None and second != first
        assert second == corpus_anchor(list(new.values()), writer.tokenizer)
        assert writer.backend.keys.anchor_ids == writer.template.anchor_ids(second)
        # the other process, which held the first passage, reads the new one at its next query
        chunks = [c.token_ids for c in writer.index.chunks()[:3]]
        ans = reader.generate(chunks, QUESTION, mode="blend", max_new_tokens=1)
        assert reader.backend.keys.anchor_ids == reader.template.anchor_ids(second)
        assert ans.trace.hits == 3 and ans.trace.misses == 0
    finally:
        writer.index.close()
        reader.index.close()


@contextmanager
def facades(home, engine, n: int) -> Iterator[list[RagKV]]:
    """``n`` facades with anchor precompute on one cache, as ``n`` processes would hold it."""
    opened = [RagKV(make_config(home, precompute_context="anchor"), engine=engine)
              for _ in range(n)]
    try:
        yield opened
    finally:
        for rag in opened:
            rag.index.close()


def test_a_facade_lets_go_of_a_passage_the_cache_forgot(tmp_path, engine):
    """A cache emptied of documents, then given a corpus too short to pick a passage from:
    every facade on it reads chunks after the neutral passage, the one that held the old
    corpus's passage included (it went on keying chunks after a passage nobody records)."""
    home, docs = tmp_path / "forgot", _corpus()
    with facades(home, engine, 2) as (holder, reader):
        neutral = holder.backend.keys.anchor_ids
        for name, text in docs.items():
            holder.ingest_text(name, text)
        assert holder.backend.keys.anchor_ids != neutral
        reader.retrieve(QUESTION, 1)  # the reader holds the corpus passage too
        assert reader.backend.keys.anchor_ids == holder.backend.keys.anchor_ids
        for name in docs:
            holder.remove_document(name)
        holder.ingest_text("short", "A note far shorter than a passage.")
        assert holder.index.setting(ANCHOR_SETTING) is None
        assert holder.backend.keys.anchor_ids == neutral
        [chunk] = holder.index.chunks()
        with facades(home, engine, 1) as (fresh,):
            assert fresh.backend.keys.anchor_ids == neutral
            assert chunk.cache_key == fresh.key_for(chunk.token_ids)
            [got] = reader.retrieve(QUESTION, 1)  # keys it hands out: the cache's own
            assert got.key == chunk.cache_key and reader.backend.keys.anchor_ids == neutral


def test_retrieved_keys_name_the_passage_another_process_recorded(tmp_path, engine):
    home, docs = tmp_path / "keys", _corpus()
    with facades(home, engine, 2) as (early, writer):
        for name, text in docs.items():
            writer.ingest_text(name, text)
        stored = {tuple(c.token_ids): c.cache_key for c in writer.index.chunks()}
        got = early.retrieve(QUESTION, 3)  # before any query of its own
        assert [c.key for c in got] == [stored[tuple(c.token_ids)] for c in got]
        assert early.precompute_many(got) == [False] * 3  # and those entries are there


def test_the_prefix_context_records_no_anchor(rag):
    assert rag.index.setting(ANCHOR_SETTING) is None  # ingested with precompute "prefix"
    assert rag.choose_anchor(list(_corpus().values())) is None


def test_a_setting_is_written_once(rag):
    assert rag.index.record_setting("probe", "first") == "first"
    assert rag.index.record_setting("probe", "second") == "first"
    assert rag.index.setting("probe") == "first" and rag.index.setting("absent") is None


def test_the_bench_picks_its_own_passage_and_records_none(tmp_path, engine):
    home, docs = tmp_path / "bench", _corpus()
    rag = RagKV(make_config(home, precompute_context="anchor"), engine=engine)
    try:
        recorded = rag.choose_anchor([docs["assert"], docs["pass"]])
        own = rag.choose_anchor([docs["del"], docs["return"]], record=False)
        assert own is not None and own != recorded
        assert rag.index.setting(ANCHOR_SETTING) == recorded  # the cache's stays
        assert rag.backend.keys.anchor_ids == rag.template.anchor_ids(own)
        ids = rag.tokenizer(docs["pass"][:400], add_special_tokens=False)["input_ids"]
        rag.generate([ids], QUESTION, mode="blend", max_new_tokens=MAX_NEW)
        assert rag.backend.keys.anchor_ids == rag.template.anchor_ids(own)  # not re-read
    finally:
        rag.index.close()
