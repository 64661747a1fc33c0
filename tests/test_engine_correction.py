"""The correction of cached KV (``ragkv.engine.correction``): what it moves, by how much, and
where it must not reach. Checked from the fused prefill's output against numbers computed here
from the cached spans, so a drift rotated to the wrong position, taken from another chunk or
applied to recomputed tokens fails."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from engine_cases import (  # noqa: F401 - fixtures are used by name
    TOL,
    _case,
    _engine,
    _one_thread,
    blend,
    case,
    engine,
)

from ragkv.config import BlendConfig
from ragkv.engine.correction import (
    ChunkMeanDrift,
    Correction,
    LocalMeanDrift,
    PositionDrift,
    apply_drift,
    chunk_index,
    make_correction,
)
from ragkv.engine.kv import ChunkKV
from ragkv.engine.vllm.params import PARAMS_KEY, FusionParams, ParamsError, Span, fusion_salt, parse


def _blend_beside_cache(engine, case, cfg):
    """The blend's output, the runner, RoPE tables and the cached pre-RoPE K/V of ``case``."""
    out = blend(engine, case, cfg)
    r = engine.runner
    cos, sin = r.cos_sin(torch.arange(len(case.prompt)))
    return out, r, cos, sin, *_cached_pre(case, r.n_layers)


def _unrotated(r, k_rot, cos, sin):
    """RoPE undone: rotation by the opposite angle, over the squared gain that scaled schemes
    (YaRN) fold into cos and sin."""
    return r.rotate(k_rot, cos, -sin) / (cos * cos + sin * sin)


def _cached_pre(case, n_layers):
    """Cached pre-RoPE K and V ``[layers, H, T, D]`` of the prompt (zeros where none)."""
    T = len(case.prompt)
    kv0 = case.cached[0][1]
    L, H, _, D = kv0.k.shape
    k = torch.zeros(L, H, T, D)
    v = torch.zeros(L, H, T, D)
    for start, kv in case.cached:
        k[:, :, start:start + kv.n_tokens] = kv.k.float()
        v[:, :, start:start + kv.n_tokens] = kv.v.float()
    return k, v


@pytest.mark.parametrize("strength", [0.5, 1.0])
def test_stale_tokens_move_by_their_chunks_mean_drift(engine, case, strength):
    cfg = BlendConfig(ratio=0.3, policy="hkvd", correction="chunk_mean",
                      correction_strength=strength)
    out, r, cos, sin, k_pre, v_pre = _blend_beside_cache(engine, case, cfg)
    final = out.final_positions
    check = cfg.check_layers[0]
    moved = 0
    for layer in range(check + 1, r.n_layers):
        k_rot = out.k[layer].float()
        k_fresh_pre = _unrotated(r, k_rot, cos, sin)
        for s, e in case.prompt.chunk_spans:
            pos = torch.arange(s, e)
            anchors = pos[torch.isin(pos, final)]
            stale = pos[~torch.isin(pos, final)]
            assert anchors.numel() and stale.numel()
            dk = (k_fresh_pre[:, anchors] - k_pre[layer][:, anchors]).mean(1, keepdim=True)
            dv = (out.v[layer][:, anchors].float() - v_pre[layer][:, anchors]).mean(1, keepdim=True)
            want_v = v_pre[layer][:, stale] + strength * dv
            want_k = r.rotate(k_pre[layer][:, stale] + strength * dk, cos[stale], sin[stale])
            assert (out.v[layer][:, stale].float() - want_v).abs().max() < TOL, layer
            assert (k_rot[:, stale] - want_k).abs().max() < TOL, layer
            moved += int(dv.abs().max() > 1e-3)
    assert moved, "the recomputed tokens showed no drift: the check above proves nothing"


def _local_mean_by_hand(d: torch.Tensor, anchors: torch.Tensor, pos: int, span: tuple[int, int],
                        window: int, strength: float, mix: float) -> torch.Tensor:
    """What ``local_mean`` moves position ``pos`` of ``span`` by, from the drifts ``d [H, n,
    D]`` of the recomputed positions ``anchors`` (all of the span), spelled out."""
    s, e = span
    near = [j for j, a in enumerate(anchors.tolist()) if s <= a < e and abs(a - pos) <= window]
    mean = strength * d.mean(1)
    local = strength * d[:, near].mean(1) if near else mean
    return mix * local + (1 - mix) * mean


@pytest.mark.parametrize(("window", "mix"), [(2, 0.5), (6, 1.0)])
def test_stale_tokens_move_by_their_neighbourhoods_drift_with_local_mean(engine, case, window,
                                                                       mix):
    cfg = BlendConfig(ratio=0.3, policy="hkvd", correction="local_mean", correction_strength=0.8,
                      correction_window=window, correction_mix=mix)
    out, r, cos, sin, k_pre, v_pre = _blend_beside_cache(engine, case, cfg)
    final = out.final_positions
    differs = 0
    for layer in range(cfg.check_layers[0] + 1, r.n_layers):
        k_rot = out.k[layer].float()
        k_fresh_pre = _unrotated(r, k_rot, cos, sin)
        for s, e in case.prompt.chunk_spans:
            pos = torch.arange(s, e)
            anchors = pos[torch.isin(pos, final)]
            dk = k_fresh_pre[:, anchors] - k_pre[layer][:, anchors]
            dv = out.v[layer][:, anchors].float() - v_pre[layer][:, anchors]
            for p in pos[~torch.isin(pos, final)].tolist():
                mk = _local_mean_by_hand(dk, anchors, p, (s, e), window, 0.8, mix)
                mv = _local_mean_by_hand(dv, anchors, p, (s, e), window, 0.8, mix)
                want_k = r.rotate(k_pre[layer][:, p:p + 1] + mk[:, None], cos[p:p + 1],
                                  sin[p:p + 1])
                assert (out.v[layer][:, p].float() - v_pre[layer][:, p] - mv).abs().max() \
                    < TOL, (layer, p)
                assert (k_rot[:, p:p + 1] - want_k).abs().max() < TOL, (layer, p)
                differs += int((mv - 0.8 * dv.mean(1)).abs().max() > 1e-3)
    assert differs, "every stale token moved by its chunk's mean: the check proves nothing"


def test_local_mean_drift_by_hand():
    chunk_of = torch.tensor([-1, 0, 0, 0, 0, 0, 0, -1, 1, 1, 1])
    anchors = torch.tensor([1, 5, 6, 9])
    dk = torch.tensor([[[4.0], [8.0], [0.0], [2.0]]])  # [H=1, n=4, D=1]
    got = LocalMeanDrift(strength=0.5, window=1, mix=0.5).drift(dk, -dk, anchors, chunk_of, 3)
    assert isinstance(got, PositionDrift)
    mean0 = 0.5 * 4.0  # chunk 0's anchors 4, 8, 0: mean 4, times the strength
    # window 1 around each chunk position 1..6, then 8..10 (chunk 1: one anchor, drift 2)
    local = [4.0, 4.0, None, 8.0, 4.0, 4.0, 2.0, 2.0, 2.0]  # None: no anchor within 1
    want = [0.5 * (0.5 * x) + 0.5 * mean0 if x is not None else mean0 for x in local[:6]]
    want += [0.5 * 0.5 * 2.0 + 0.5 * 0.5 * 2.0] * 3
    assert torch.allclose(got.k[0, :, 0], torch.tensor(want))
    assert torch.equal(got.v, -got.k)
    assert LocalMeanDrift().drift(dk[:, :0], dk[:, :0], anchors[:0], chunk_of, 3) is None


def test_applied_position_drift_is_rotated_to_each_position_in_span_order():
    g = torch.Generator().manual_seed(5)
    H, T, D = 2, 12, 8
    k, v = torch.randn(H, T, D, generator=g), torch.randn(H, T, D, generator=g)
    spans = [(1, 5), (6, 11)]
    dk, dv = torch.randn(H, 9, D, generator=g), torch.randn(H, 9, D, generator=g)
    ang = torch.randn(T, D // 2, generator=g)
    cos, sin = torch.cat([ang.cos()] * 2, -1), torch.cat([ang.sin()] * 2, -1)
    k2, v2 = k.clone(), v.clone()
    apply_drift(k2, v2, PositionDrift(dk, dv), spans, cos, sin)
    order = [p for s, e in spans for p in range(s, e)]
    for p in range(T):
        if p not in order:
            assert torch.equal(k2[:, p], k[:, p]) and torch.equal(v2[:, p], v[:, p])
            continue
        i = order.index(p)
        half = torch.cat([-dk[:, i, D // 2:], dk[:, i, :D // 2]], -1)
        assert torch.allclose(k2[:, p], k[:, p] + dk[:, i] * cos[p] + half * sin[p], atol=1e-6)
        assert torch.allclose(v2[:, p], v[:, p] + dv[:, i], atol=1e-6)


def test_without_correction_stale_tokens_keep_cached_kv(engine, case):
    cfg = BlendConfig(ratio=0.3, policy="hkvd", correction="none")
    out = blend(engine, case, cfg)
    r = engine.runner
    T = len(case.prompt)
    cos, sin = r.cos_sin(torch.arange(T))
    k_pre, v_pre = _cached_pre(case, r.n_layers)
    chunk = chunk_index(T, case.prompt.chunk_spans, torch.device("cpu")) >= 0
    stale = (chunk & ~torch.isin(torch.arange(T), out.final_positions)).nonzero().flatten()
    # layers up to the check layer compute every token; after it the stale ones keep the cache
    for layer in range(cfg.check_layers[-1] + 1, r.n_layers):
        assert (out.v[layer][:, stale].float() - v_pre[layer][:, stale]).abs().max() < TOL
        want_k = r.rotate(k_pre[layer][:, stale], cos[stale], sin[stale])
        assert (out.k[layer][:, stale].float() - want_k).abs().max() < TOL


@pytest.mark.parametrize("correction", ["chunk_mean", "local_mean"])
def test_layer_zero_keeps_the_cached_kv_of_stale_tokens(engine, case, correction):
    """Layer 0's K/V are projections of each token alone, so a cached entry there is exact
    (up to the stored dtype) and a drift could only spread rounding noise: the stale tokens
    keep it as cached there, and move from layer 1 on. ``chunk_head`` checks no layer, so
    its stale tokens are stale from layer 0. The cached layer 0 is rounded as fp16 storage
    rounds it, so a drift there would not be zero."""
    g = torch.Generator().manual_seed(5)
    rounded = []
    for start, kv in case.cached:
        k, v = kv.k.clone(), kv.v.clone()
        k[0] += 1e-3 * torch.randn(k[0].shape, generator=g)
        v[0] += 1e-3 * torch.randn(v[0].shape, generator=g)
        rounded.append((start, ChunkKV(k, v)))
    case = replace(case, cached=rounded)
    cfg = BlendConfig(ratio=0.3, policy="chunk_head", correction=correction)
    out, r, cos, sin, k_pre, v_pre = _blend_beside_cache(engine, case, cfg)
    T = len(case.prompt)
    chunk = chunk_index(T, case.prompt.chunk_spans, torch.device("cpu")) >= 0
    stale = (chunk & ~torch.isin(torch.arange(T), out.final_positions)).nonzero().flatten()
    assert stale.numel()
    assert (out.v[0][:, stale].float() - v_pre[0][:, stale]).abs().max() < TOL
    want_k = r.rotate(k_pre[0][:, stale], cos[stale], sin[stale])
    assert (out.k[0][:, stale].float() - want_k).abs().max() < TOL
    assert (out.v[1][:, stale].float() - v_pre[1][:, stale]).abs().max() > 10 * TOL


def test_correction_changes_the_prefill_and_never_a_compute_all_one(engine, case):
    plain = blend(engine, case, BlendConfig(ratio=0.3, correction="none"))
    fixed = blend(engine, case, BlendConfig(ratio=0.3, correction="chunk_mean"))
    assert (plain.logits - fixed.logits).abs().max() > 10 * TOL
    for mode in ("prefix", "reuse"):  # nothing is recomputed in chunks, or everything is
        a = blend(engine, case, BlendConfig(correction="none"), mode=mode)
        b = blend(engine, case, BlendConfig(correction="chunk_mean"), mode=mode)
        assert torch.equal(a.logits, b.logits), mode
    one = blend(engine, case, BlendConfig(ratio=1.0, correction="chunk_mean"))
    assert (one.logits - case.full.logits).abs().max() < TOL


def test_one_recomputed_chunk_token_is_enough_to_correct(engine, case):
    spans = case.prompt.chunk_spans
    cfg = dict(ratio=1.0 / sum(e - s for s, e in spans), policy="hkvd")
    plain = blend(engine, case, BlendConfig(**cfg, correction="none"))
    fixed = blend(engine, case, BlendConfig(**cfg, correction="chunk_mean"))
    final = fixed.final_positions
    assert sum(int(((final >= s) & (final < e)).sum()) for s, e in spans) == 1
    assert (plain.logits - fixed.logits).abs().max() > 10 * TOL


def test_chunk_mean_drift_by_hand():
    chunk_of = torch.tensor([-1, 0, 0, 0, -1, 1, 1, 2, 2])
    anchors = torch.tensor([1, 5])  # chunk 0 and chunk 1 each have one recomputed token
    dk = torch.tensor([[[1.0, 2.0], [3.0, 4.0]]])  # [H=1, n=2, D=2]
    dv = -dk
    k, v = ChunkMeanDrift(strength=0.5).drift(dk, dv, anchors, chunk_of, 3)
    want = torch.tensor([[[0.5, 1.0], [1.5, 2.0], [0.0, 0.0]]])  # [H, chunks, D]
    assert torch.equal(k, want) and torch.equal(v, -want)  # chunk 2: no anchor, no move
    two = torch.tensor([[[1.0, 0.0], [3.0, 0.0]]])
    k2, _ = ChunkMeanDrift(strength=1.0).drift(two, two, torch.tensor([1, 2]), chunk_of, 3)
    assert torch.equal(k2[0], torch.tensor([[2.0, 0.0], [0.0, 0.0], [0.0, 0.0]]))  # the mean
    assert Correction().drift(dk, dv, anchors, chunk_of, 3) is None


def test_applied_drift_is_the_drift_rotated_to_each_position_of_its_span():
    """Whole spans move, each key by its chunk's drift rotated to its own position (the
    rotate-half RoPE of the drift added to the rotated key); outside spans nothing moves."""
    g = torch.Generator().manual_seed(3)
    H, T, D = 2, 12, 8
    k, v = torch.randn(H, T, D, generator=g), torch.randn(H, T, D, generator=g)
    mk, mv = torch.randn(H, 2, D, generator=g), torch.randn(H, 2, D, generator=g)
    ang = torch.randn(T, D // 2, generator=g)
    cos, sin = torch.cat([ang.cos()] * 2, -1), torch.cat([ang.sin()] * 2, -1)
    spans = [(1, 5), (6, 11)]
    k2, v2 = k.clone(), v.clone()
    apply_drift(k2, v2, (mk, mv), spans, cos, sin)

    def rope(x, pos):
        half = torch.cat([-x[..., D // 2:], x[..., :D // 2]], -1)
        return x * cos[pos] + half * sin[pos]

    for p in range(T):
        chunk = next((i for i, (s, e) in enumerate(spans) if s <= p < e), None)
        if chunk is None:
            assert torch.equal(k2[:, p], k[:, p]) and torch.equal(v2[:, p], v[:, p])
            continue
        assert torch.allclose(k2[:, p], k[:, p] + rope(mk[:, chunk], p), atol=1e-6)
        assert torch.allclose(v2[:, p], v[:, p] + mv[:, chunk], atol=1e-6)


def test_config_names_the_correction():
    assert make_correction(BlendConfig(correction="none")).name == "none"
    assert make_correction(BlendConfig(correction_strength=0.0)).name == "none"
    c = make_correction(BlendConfig(correction="chunk_mean", correction_strength=0.75))
    assert isinstance(c, ChunkMeanDrift) and c.strength == 0.75
    c = make_correction(BlendConfig(correction="local_mean", correction_strength=0.6,
                                    correction_window=7, correction_mix=0.25))
    assert isinstance(c, LocalMeanDrift) and (c.strength, c.window, c.mix) == (0.6, 7, 0.25)
    for bad in ({"correction": "bogus"}, {"correction_strength": -0.1},
                {"correction_strength": 2.5}, {"correction_strength": True},
                {"correction_window": -1}, {"correction_window": 2.5},
                {"correction_window": True}, {"correction_mix": 1.5}, {"correction_mix": "a"}):
        with pytest.raises(ValueError):
            BlendConfig(**bad)


def _params(**blend) -> FusionParams:
    return FusionParams("blend", 2, (Span(2, 10, "a" * 64), Span(11, 20, "b" * 64)), 20,
                        "cold", BlendConfig(policy="hkvd", **blend))


def test_vllm_salt_and_parser_carry_the_correction():
    ids = list(range(30))
    salts = {fusion_salt(_params(correction=c, correction_strength=s), ids)
             for c, s in (("none", 1.0), ("chunk_mean", 1.0), ("chunk_mean", 0.5))}
    salts |= {fusion_salt(_params(correction="local_mean", **kw), ids)
              for kw in ({}, {"correction_window": 8}, {"correction_mix": 1.0})}
    assert len(salts) == 6  # a different correction is a different fused KV
    body = {"mode": "blend", "prefix_end": 2, "suffix_start": 20, "context": "cold",
            "chunks": [[2, 10, "a" * 64], [11, 20, "b" * 64]],
            "blend": {"policy": "hkvd", "ratio": 0.2, "correction": "none"}}
    got = parse({PARAMS_KEY: body}, 30)
    assert got is not None and got.blend.correction == "none"
    for bad in ({"correction": 3}, {"correction": "bogus"}, {"correction_strength": 9}):
        with pytest.raises(ParamsError):
            parse({PARAMS_KEY: {**body, "blend": {"policy": "hkvd", **bad}}}, 30)


# ---- the quality guard (BlendConfig.coverage) --------------------------------------------

def test_covering_budget_by_hand():
    from ragkv.engine.policies import covering_budget

    d = torch.tensor([5.0, 1.0, 3.0, 0.5, 0.5, 100.0])
    must = torch.tensor([False, False, False, False, False, True])  # 100 is forced: not counted
    assert covering_budget(d, must, 0.5) == 1  # 5 of 10
    assert covering_budget(d, must, 0.8) == 2  # 5 + 3
    assert covering_budget(d, must, 0.95) == 4
    assert covering_budget(d, must, 1.0) == 5
    assert covering_budget(torch.zeros(3), torch.zeros(3, dtype=torch.bool), 0.9) == 0


@pytest.mark.parametrize("policy", ["hkvd", "qhkvd", "hkvd+head"])
def test_guard_raises_the_budget_to_cover_the_deviation_mass(engine, case, policy):
    base = BlendConfig(ratio=0.2, policy=policy)
    plain = blend(engine, case, base)
    assert plain.guard_tokens == 0
    strict = blend(engine, case, BlendConfig(ratio=0.2, policy=policy, coverage=0.99,
                                              max_ratio=0.6))
    loose = blend(engine, case, BlendConfig(ratio=0.2, policy=policy, coverage=0.01))
    n_chunk = case.prompt.chunk_tokens
    extra = strict.recomputed_per_layer[-1] - plain.recomputed_per_layer[-1]
    assert extra == strict.guard_tokens > 0
    assert strict.recomputed_per_layer[-1] - (len(case.prompt) - case.prompt.prefix_len
                                              - n_chunk) <= round(0.6 * n_chunk)
    assert loose.guard_tokens == 0  # a low target never lowers the ratio's budget
    assert loose.recomputed_per_layer == plain.recomputed_per_layer
    assert torch.isin(plain.final_positions, strict.final_positions).all()


def test_guard_config_is_checked():
    for bad in ({"coverage": 0.0}, {"coverage": 1.5}, {"coverage": True},
                {"max_ratio": 1.2}):
        with pytest.raises(ValueError):
            BlendConfig(**bad)


def test_local_mean_recomputes_its_windows_when_the_anchor_set_changes():
    """The windows are kept for the anchor tensor the blend passes layer after layer; a new
    set (after a check layer) gets its own."""
    chunk_of = chunk_index(40, [(2, 20), (20, 38)], torch.device("cpu"))
    g = torch.Generator().manual_seed(2)
    one = LocalMeanDrift(window=3)
    for anchors in (torch.tensor([3, 8, 9, 25, 30]), torch.tensor([2, 14, 21, 22, 37]),
                    torch.tensor([5, 6, 7, 33])):
        dk, dv = (torch.randn(2, anchors.numel(), 4, generator=g) for _ in "kv")
        for _ in range(2):  # the same anchor tensor again: the kept windows
            got = one.drift(dk, dv, anchors, chunk_of, 2)
            want = LocalMeanDrift(window=3).drift(dk, dv, anchors, chunk_of, 2)
            assert torch.equal(got.k, want.k) and torch.equal(got.v, want.v)
