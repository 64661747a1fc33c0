"""Context scores and the preselection they drive (``BlendConfig.preselect``).

An anchor-context entry carries a per-token score: how far the token's pre-RoPE keys move
between its prefix-context and anchor-context entries. It is stored at ingestion, survives every
tier and codec, is a miss when damaged, and with ``preselect`` picks the tokens computed before
the check layer. These tests run on real SQLite and blob folders and a tiny random Llama.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from api_cases import (  # noqa: F401 - fixtures are used by name
    QUESTION,
    _one_thread,
    engine,
    make_config,
    rag,
    seed,
    three_chunks,
)
from policy_cases import make_ctx

from ragkv.api import RagKV
from ragkv.cache_index import BlobStore, CacheIndex, Int8Codec, KVStore, MemoryTier
from ragkv.config import FAST_PRESELECT, BlendConfig
from ragkv.engine.chunk_store import ChunkStore, KVShape
from ragkv.engine.context_score import SCORE_LAYERS, context_score, preselected
from ragkv.engine.kv import ChunkKV
from ragkv.engine.policies import HKVD, QueryAwareHKVD, make_policy

SHAPE = KVShape(layers=3, kv_heads=2, head_dim=4)


def _kv(n: int = 6, seed: int = 0) -> ChunkKV:
    g = torch.Generator().manual_seed(seed)
    shape = (SHAPE.layers, SHAPE.kv_heads, n, SHAPE.head_dim)
    return ChunkKV(torch.randn(shape, generator=g), torch.randn(shape, generator=g))


# ---- the score ---------------------------------------------------------------------------
def test_the_score_ranks_tokens_by_how_far_their_keys_move_after_layer_0():
    ref = _kv()
    moved = ChunkKV(ref.k.clone(), ref.v.clone())
    moved.k[1:, :, 4] += 3.0  # token 4 moves most at layers 1 and 2
    moved.k[1:, :, 1] += 1.0
    moved.k[0] += 100.0  # layer 0 sees no context: never scored
    moved.v += 50.0  # values are not scored
    score = context_score(ref, moved)
    assert score.shape == (6,) and score.dtype == torch.float32
    assert int(score.argmax()) == 4 and sorted(score.tolist())[-2] == pytest.approx(
        float(score[1]))
    # the squared key distance summed over heads, over its chunk mean, averaged over layers
    d = (moved.k[list(SCORE_LAYERS)] - ref.k[list(SCORE_LAYERS)]).pow(2).sum(dim=(1, 3))
    torch.testing.assert_close(score, (d / d.mean(dim=1, keepdim=True)).mean(0))


def test_no_score_for_entries_that_do_not_describe_the_same_tokens():
    assert context_score(_kv(6), _kv(5)) is None
    one_layer = ChunkKV(torch.zeros(1, 2, 6, 4), torch.zeros(1, 2, 6, 4))
    assert context_score(one_layer, one_layer) is None  # no layer after 0 to score


def test_the_preselection_takes_the_top_scored_tokens_and_unscored_chunks_whole():
    spans = [(10, 20), (20, 26), (30, 40)]
    scores = {10: torch.arange(10.0), 30: -torch.arange(10.0)}  # chunk (20, 26) has none
    got = preselected(scores, spans, 4)
    # the four largest scores of both scored chunks (9, 8, 7, 6 at 19..16; 30 scores 0)
    assert sorted(got.tolist()) == [16, 17, 18, 19, 20, 21, 22, 23, 24, 25]
    assert sorted(preselected(scores, spans, 0).tolist()) == list(range(20, 26))
    assert preselected({}, [], 5).numel() == 0


# ---- the policy --------------------------------------------------------------------------
def test_a_deviation_policy_computes_only_the_preselected_tokens_from_layer_0():
    spans = ((5, 55), (55, 105))
    ctx = make_ctx(0.1, spans)
    every = ctx.all_uncached_and_chunks()
    assert torch.equal(HKVD(layers=(2,)).initial(ctx), every)  # no scores: every token
    ctx.scores = {5: torch.rand(50), 55: torch.rand(50)}
    assert torch.equal(HKVD(layers=(2,)).initial(ctx), every)  # no preselection asked
    got = QueryAwareHKVD(layers=(2,), preselect=4.0).initial(ctx)
    chunk = got[(got >= 5) & (got < 105)]
    assert chunk.numel() == 40  # 4 x 0.1 x 100 scored tokens
    top = torch.topk(torch.cat([ctx.scores[5], ctx.scores[55]]), 40).indices + 5
    assert sorted(chunk.tolist()) == sorted(top.tolist())
    assert torch.isin(ctx.forced_positions(), got).all()
    # a preselection past every token is no preselection
    assert torch.equal(torch.sort(HKVD(layers=(2,), preselect=10.0).initial(ctx)).values, every)


def test_the_preselection_reaches_every_deviation_policy_from_the_config():
    for name in ("hkvd", "qhkvd", "gradual", "hkvd+head"):
        assert make_policy(BlendConfig(policy=name, preselect=3.0), 30).preselect == 3.0
        policy = make_policy(BlendConfig(policy=name, preselect_from=500), 30)
        assert policy.preselect_from == 500
    with pytest.raises(ValueError, match="preselect must be a number >= 1"):
        BlendConfig(preselect=0.5)
    for bad in (0, -5, 2.5, True, "6144"):
        with pytest.raises(ValueError, match="preselect_from must be a whole number"):
            BlendConfig(preselect_from=bad)


def test_a_long_prompt_gets_the_fast_preselection_unless_one_is_named():
    spans = ((5, 55), (55, 105))
    ctx = make_ctx(0.1, spans)
    ctx.scores = {5: torch.rand(50), 55: torch.rand(50)}
    every, n = ctx.all_uncached_and_chunks(), ctx.n_tokens
    fast = QueryAwareHKVD(layers=(2,), preselect=FAST_PRESELECT).initial(ctx)
    assert fast.numel() < every.numel()
    for at in (1, n):  # the prompt holds at least that many tokens: preselected
        assert torch.equal(QueryAwareHKVD(layers=(2,), preselect_from=at).initial(ctx), fast)
    assert torch.equal(QueryAwareHKVD(layers=(2,), preselect_from=n + 1).initial(ctx), every)
    assert torch.equal(QueryAwareHKVD(layers=(2,), preselect_from=None).initial(ctx), every)
    # a preselection named by the user wins over the long-prompt one
    named = QueryAwareHKVD(layers=(2,), preselect=2.0, preselect_from=1).initial(ctx)
    assert torch.equal(named, QueryAwareHKVD(layers=(2,), preselect=2.0).initial(ctx))
    assert named.numel() < fast.numel()


# ---- storage -----------------------------------------------------------------------------
@pytest.fixture
def store(tmp_path: Path):
    index = CacheIndex(f"sqlite:///{tmp_path / 'index.sqlite'}")
    yield lambda codec=None, memory=False, dtype="float16": ChunkStore(
        KVStore(index, BlobStore(str(tmp_path / "blobs")),
                memory=MemoryTier(None) if memory else None), "f" * 64, SHAPE, dtype, codec)
    index.close()


@pytest.mark.parametrize("codec, memory", [(None, False), (None, True), (Int8Codec(), False)])
def test_an_entry_is_saved_with_its_score_against_its_twin(store, codec, memory):
    chunks = store(codec, memory)
    ref, kv = _kv(seed=1), _kv(seed=2)
    chunks.save("1" * 64, ref)
    chunks.save("2" * 64, kv, reference="1" * 64)
    chunks.save("3" * 64, kv, reference="9" * 64)  # the twin is missing: no score
    loaded, _ = chunks.load("2" * 64, 6)
    stored_ref, _ = chunks.load("1" * 64, 6)
    assert stored_ref.score is None and chunks.load("3" * 64, 6)[0].score is None
    want = context_score(stored_ref, kv)  # against the twin as stored (fp16 / int8)
    atol = 0.05 * float(want.abs().max()) if codec is not None else 1e-6
    torch.testing.assert_close(loaded.score, want, atol=atol, rtol=0)


@pytest.mark.parametrize("memory", [False, True])
def test_reading_the_twin_is_not_a_use_of_it(store, memory):
    """The twin is read for bookkeeping: no hit counted, its eviction priority unchanged."""
    chunks = store(memory=memory)
    chunks.save("1" * 64, _kv(seed=1))
    index = chunks.store.index
    before = index.get_entry("1" * 64).hits
    chunks.save("2" * 64, _kv(seed=2), reference="1" * 64)
    chunks.save("3" * 64, _kv(seed=3), reference="9" * 64)  # a missing twin: no miss either
    assert chunks.load("2" * 64, 6, record=False)[0].score is not None
    assert chunks.store.counters["hits"] == chunks.store.counters["misses"] == 0
    assert index.get_entry("1" * 64).hits == before
    if memory:
        assert chunks.store.memory._slots["1" * 64].hits == 0
    chunks.load("1" * 64, 6)  # a use
    assert chunks.store.counters["hits"] == 1


def test_a_damaged_score_makes_the_entry_a_miss(store):
    chunks = store()
    kv = _kv()
    chunks.save("1" * 64, kv.with_score(torch.ones(6)))
    assert chunks.load("1" * 64, 6)[0].score is not None
    tensors = kv.to_tensors("float16")
    tensors["score"] = torch.full((1, 6), float("nan"))
    chunks.store.put("2" * 64, tensors, model_fp="f" * 64, layout=chunks_layout(),
                     n_tokens=6)
    tensors["score"] = torch.ones(1, 5)
    chunks.store.put("3" * 64, tensors, model_fp="f" * 64, layout=chunks_layout(),
                     n_tokens=6)
    assert chunks.load("2" * 64, 6) is None and chunks.load("3" * 64, 6) is None


def chunks_layout() -> str:
    from ragkv.keys import KV_LAYOUT

    return KV_LAYOUT


# ---- end to end on the transformers engine ------------------------------------------------
@pytest.fixture
def anchored(tmp_path, engine):
    r = RagKV(make_config(tmp_path / "anchor", precompute_context="anchor"), engine=engine)
    yield r
    r.index.close()


def test_ingestion_scores_every_anchor_entry_against_its_prefix_entry(anchored, rag):
    chunks = [c.token_ids for c in three_chunks(rag)]
    anchored.precompute_many(chunks)
    keys, store = anchored.backend.keys, anchored.backend.chunks
    assert keys.twin(chunks[0], "anchor") == keys.chunk(chunks[0], "prefix")
    assert keys.twin(chunks[0], "prefix") is None and keys.twin(chunks[0], "cold") is None
    for ids in chunks:
        prefix, _ = store.load(keys.chunk(ids, "prefix"), len(ids))
        anchor, _ = store.load(keys.chunk(ids, "anchor"), len(ids))
        assert prefix.score is None
        torch.testing.assert_close(anchor.score, context_score(prefix, anchor))
    # an anchor entry computed again later is scored against the stored prefix entry
    store.store.delete(keys.chunk(chunks[1], "anchor"))
    assert anchored.precompute_many(chunks) == [False, True, False]
    again, _ = store.load(keys.chunk(chunks[1], "anchor"), len(chunks[1]))
    prefix, _ = store.load(keys.chunk(chunks[1], "prefix"), len(chunks[1]))
    torch.testing.assert_close(again.score, context_score(prefix, again))
    # a lost anchor entry computed again on a query's miss is scored too
    store.store.delete(keys.chunk(chunks[2], "anchor"))
    anchored.generate(chunks, QUESTION, mode="blend", max_new_tokens=1)
    again, _ = store.load(keys.chunk(chunks[2], "anchor"), len(chunks[2]))
    assert again.score is not None


def test_a_preselecting_blend_computes_fewer_tokens_before_its_check_layer(anchored, rag):
    chunks = [c.token_ids for c in three_chunks(rag)]
    anchored.precompute_many(chunks)
    plain = anchored.generate(chunks, QUESTION, mode="blend", max_new_tokens=1,
                              blend=BlendConfig(ratio=0.1))
    pre = anchored.generate(chunks, QUESTION, mode="blend", max_new_tokens=1,
                            blend=BlendConfig(ratio=0.1, preselect=3.0))
    a, b = plain.trace.recomputed_per_layer, pre.trace.recomputed_per_layer
    scored = len(chunks[1]) + len(chunks[2])  # the first chunk is exact, never computed
    assert a[0] - b[0] == scored - round(0.3 * scored)
    assert a[0] == a[1] and b[0] == b[1]  # computed alike until the check layer (2)
    assert a[2] == b[2]  # where both keep the ratio's tokens
    # a preselection that covers every token is no preselection: the same logits exactly
    same = anchored.generate(chunks, QUESTION, mode="blend", max_new_tokens=1,
                             blend=BlendConfig(ratio=0.1, preselect=10.0))
    assert same.trace.recomputed_per_layer == a
    assert torch.equal(same.first.logits, plain.first.logits)


def test_a_long_prompt_preselects_by_default(anchored, rag):
    chunks = [c.token_ids for c in three_chunks(rag)]
    anchored.precompute_many(chunks)

    def blend(**kw):
        return anchored.generate(chunks, QUESTION, mode="blend", max_new_tokens=1,
                                 blend=BlendConfig(ratio=0.1, **kw))

    fast = blend(preselect=FAST_PRESELECT, preselect_from=None)
    whole = blend(preselect_from=None)
    assert fast.trace.recomputed_per_layer[0] < whole.trace.recomputed_per_layer[0]
    # from the threshold on, the default is the fast preselection, to the last logit
    n = whole.trace.context_tokens
    long = blend(preselect_from=n)
    assert long.trace.recomputed_per_layer == fast.trace.recomputed_per_layer
    assert torch.equal(long.first.logits, fast.first.logits)
    short = blend(preselect_from=n + 1)
    assert short.trace.recomputed_per_layer == whole.trace.recomputed_per_layer
    assert torch.equal(short.first.logits, whole.first.logits)


def test_without_scores_a_preselecting_blend_computes_every_token(rag):
    chunks = [c.token_ids for c in three_chunks(rag)]  # prefix context: no scores
    plain = rag.generate(chunks, QUESTION, mode="blend", max_new_tokens=1,
                         blend=BlendConfig(ratio=0.1))
    pre = rag.generate(chunks, QUESTION, mode="blend", max_new_tokens=1,
                       blend=BlendConfig(ratio=0.1, preselect=3.0))
    assert pre.trace.recomputed_per_layer == plain.trace.recomputed_per_layer
