"""Anchor-context precompute (``precompute_context="anchor"``) on a tiny random Llama.

Every chunk has two entries: prefilled after the template prefix (read when the chunk comes
first, where it is exact) and after the prefix and the anchor passage (read everywhere else).
Each entry must hold exactly what prefilling those tokens gives, on ingestion and on a miss.
"""

from __future__ import annotations

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

from ragkv.anchor import ANCHOR_TEXT
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


@pytest.mark.parametrize("bad, match", [
    ({"precompute_context": "neighbours"}, "'cold', 'prefix' or 'anchor', got 'neighbours'"),
    ({"anchor_text": "  "}, "anchor_text is empty"),
])
def test_bad_anchor_settings_are_refused(tmp_path, bad, match):
    with pytest.raises(ValueError, match=match):
        RagkvConfig(home=tmp_path, **bad)


def test_the_anchor_is_the_engines_and_cannot_change_under_it(anchored):
    with pytest.raises(ValueError, match="fixed when the engine is built"):
        anchored.with_config(anchor_text="Another passage.")
    assert anchored.with_config(precompute_context="prefix").config.anchor_text is None
