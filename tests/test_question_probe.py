"""The question probe behind ``qhkvd``'s preselection (:func:`ragkv.engine.blend.probe_question`).

Before any chunk token is computed, the question (with the other positions no cache covers)
runs through the layers up to the check layer over the cached KV, and its attention there
weights the stored context scores: the preselection then favours what the question reads.
These tests pin the probe against the model's own forward, the product rule, and that the
weights are what reaches the blend's first layer, on a tiny random Llama.
"""

from __future__ import annotations

import pytest
import torch
from engine_cases import (  # noqa: F401 - fixtures are used by name
    _engine,
    _one_thread,
    make_case,
    max_diff,
)
from policy_cases import make_ctx

from ragkv.config import CONTEXT_PRESELECT_FROM, BlendConfig
from ragkv.engine.blend import compute_span, fuse, probe_question
from ragkv.engine.context_score import preselected
from ragkv.engine.kv import ChunkKV
from ragkv.engine.loading import LayerFeed
from ragkv.engine.plan import plan_prefill, scores_of
from ragkv.engine.policies import HKVD, QueryAwareHKVD, make_policy


@pytest.fixture(scope="module")
def llama():
    return _engine("llama")


def _plan(engine, case, cached, cfg: BlendConfig):
    p = case.prompt
    return plan_prefill(len(p), p.chunk_spans, p.suffix_start,
                        [(s, kv.n_tokens) for s, kv in cached], p.prefix_len, "blend", cfg,
                        engine.runner.n_layers, scores_of(cached))


def _probe(engine, ids: torch.Tensor, cached, ctx, upto: int) -> torch.Tensor:
    r = engine.runner
    T = ids.shape[0]
    cos, sin = r.cos_sin(torch.arange(T))
    feed = LayerFeed(r, cached, T, cos, sin, pipelined=False)
    try:
        return probe_question(r, ids, ctx, feed, cos, sin, upto)
    finally:
        feed.close()


def _forward_question_attention(engine, ids: torch.Tensor, suffix_start: int,
                                upto: int) -> torch.Tensor:
    """The question's attention ``[T]`` at layer ``upto`` in the model's own causal forward."""
    r = engine.runner
    T = ids.shape[0]
    pos = torch.arange(T)
    cos, sin = r.cos_sin(pos)
    h = r.embed(ids)
    for layer in range(upto + 1):
        q, k, v = r.qkv(layer, h)
        q, k = r.rotate(q, cos, sin), r.rotate(k, cos, sin)
        if layer == upto:
            tail = pos >= suffix_start
            return r.attention_probs(q[:, tail], k, pos[tail]).mean(dim=(0, 1))
        h = r.finish(layer, h, r.attend(q, k, v, None))
    raise AssertionError


@torch.inference_mode()
def test_over_exact_kv_the_probe_is_the_forward_passes_question_attention(llama):
    """Chunk KV cut from full prefill's own: the probe must read what the forward reads (the
    chunks' keys rotated to their positions, the question's own fresh keys, the exact mask)."""
    case = make_case(llama, seed=7, lengths=[24, 24, 24])
    p = case.prompt
    ids = torch.tensor(p.ids)
    full = compute_span(llama.runner, ids)  # pre-RoPE K/V of every position, every layer
    exact = [(0, ChunkKV(full.k[:, :, :p.prefix_len], full.v[:, :, :p.prefix_len]))]
    exact += [(s, ChunkKV(full.k[:, :, s:e], full.v[:, :, s:e])) for s, e in p.chunk_spans]
    ctx = _plan(llama, case, exact, BlendConfig(ratio=0.2)).ctx
    for upto in (1, 2):
        want = _forward_question_attention(llama, ids, p.suffix_start, upto)
        got = _probe(llama, ids, exact, ctx, upto)
        assert got.shape == (len(p),)
        assert max_diff(got, want) < 1e-5, upto
        assert float(got[p.suffix_start:].sum()) > 0  # the question reads itself too
    # over the chunks' own (cold) KV the weights move: the probe reads the buffers it is given
    cold = _probe(llama, ids, case.cached, ctx, 2)
    assert max_diff(cold, want) > 1e-3


def test_the_preselection_takes_the_top_context_scores_times_the_question_weight():
    ctx = make_ctx(0.1, spans=((5, 25), (26, 46)), n_tokens=50)
    ctx.scores = {5: torch.arange(20, dtype=torch.float32), 26: torch.ones(20)}
    plain = QueryAwareHKVD(layers=(2,), preselect=1.0)  # budget: 0.1 x 40 = 4 tokens
    assert plain.initial(ctx).tolist() == [21, 22, 23, 24, 25, 46, 47, 48, 49]
    w = torch.ones(50)
    w[24], w[30] = 0.0, 100.0  # the top-scored token is never read; a flat one is read most
    ctx.question_weight = w
    assert plain.initial(ctx).tolist() == [21, 22, 23, 25, 30, 46, 47, 48, 49]


def test_only_a_question_aware_preselection_asks_for_the_probe():
    ctx = make_ctx(0.1, spans=((5, 25),), n_tokens=30)
    assert not QueryAwareHKVD(layers=(2,), preselect=4.0).probes_question(ctx)  # no scores
    ctx.scores = {5: torch.ones(20)}
    assert QueryAwareHKVD(layers=(2,), preselect=4.0).probes_question(ctx)
    assert QueryAwareHKVD(layers=(2,), preselect_from=30).probes_question(ctx)
    assert not QueryAwareHKVD(layers=(2,), preselect_from=31).probes_question(ctx)
    assert not QueryAwareHKVD(layers=(2,)).probes_question(ctx)  # no preselection
    assert not HKVD(layers=(2,), preselect=4.0).probes_question(ctx)  # reads no question
    assert not HKVD(layers=(2,), preselect=4.0, preselect_by="question").probes_question(ctx)
    assert not QueryAwareHKVD(layers=(2,), preselect=4.0,
                              preselect_by="context").probes_question(ctx)


def test_auto_weights_by_the_question_below_the_long_prompt_threshold():
    def probes(n: int, by: str = "auto") -> bool:
        ctx = make_ctx(0.1, spans=((5, n - 5),), n_tokens=n)
        ctx.scores = {5: torch.ones(n - 10)}
        return QueryAwareHKVD(layers=(2,), preselect_from=1, preselect_by=by).probes_question(ctx)

    n = CONTEXT_PRESELECT_FROM
    assert probes(n - 1) and not probes(n)  # from the threshold on: the scores alone
    assert probes(n, "question") and not probes(n - 1, "context")


def test_the_config_names_what_the_preselection_ranks_by():
    assert BlendConfig().preselect_by == "auto"
    for by in ("question", "context"):
        assert make_policy(BlendConfig(preselect_by=by), 30).preselect_by == by
        assert make_policy(BlendConfig(policy="gradual", preselect_by=by), 30).preselect_by == by
        assert make_policy(BlendConfig(policy="hkvd+head", preselect_by=by),
                           30).preselect_by == by
    with pytest.raises(ValueError, match="preselect_by must be one of auto, question, context"):
        BlendConfig(preselect_by="answer")  # type: ignore[arg-type]


@torch.inference_mode()
def test_the_probed_weights_are_what_the_blends_first_layer_computes(llama):
    case = make_case(llama, seed=8, lengths=[30, 30, 30])
    p = case.prompt
    ids = torch.tensor(p.ids)
    g = torch.Generator().manual_seed(0)
    scored = [(s, kv.with_score(torch.rand(kv.n_tokens, generator=g)) if s else kv)
              for s, kv in case.cached]
    cfg = BlendConfig(ratio=0.15, preselect=2.0, check_layers=(2,))
    plan = _plan(llama, case, scored, cfg)
    assert set(plan.ctx.scores) == {s for s, _ in p.chunk_spans}
    out = fuse(llama.runner, ids, scored, plan.ctx, plan.policy, record=True)
    w = _probe(llama, ids, scored, plan.ctx, 2)
    budget = round(0.3 * plan.ctx.chunk_tokens)
    weighted = {s: sc * w[s:s + sc.numel()] for s, sc in plan.ctx.scores.items()}
    forced = plan.ctx.forced_positions()
    want = torch.unique(torch.cat([forced, preselected(weighted, p.chunk_spans, budget)]))
    assert out.layer_sets[0].tolist() == want.tolist()
    # the context scores alone (``hkvd``, which reads no question) pick another set
    hplan = _plan(llama, case, scored, BlendConfig(ratio=0.15, preselect=2.0,
                                                   check_layers=(2,), policy="hkvd"))
    alone = fuse(llama.runner, ids, scored, hplan.ctx, hplan.policy, record=True)
    assert alone.layer_sets[0].numel() == want.numel()
    assert alone.layer_sets[0].tolist() != want.tolist()


def test_a_check_layer_before_layer_0_is_refused_by_name(llama):
    case = make_case(llama, seed=3, lengths=[8, 8])
    ids = torch.tensor(case.prompt.ids)
    with pytest.raises(ValueError, match="^check layer -1 is not a layer of the model$"):
        _probe(llama, ids, case.cached, make_ctx(0.1, n_tokens=ids.numel()), -1)
