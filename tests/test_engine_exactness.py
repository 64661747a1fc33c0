"""Exactness of the fusion: ratio 1.0, prefix and first-chunk reuse equal full prefill; RoPE
re-encoding and the causal mask are exact (tiny model matrix from ``engine_cases``)."""

from __future__ import annotations

import math
import sys

import pytest
import torch
from engine_cases import (  # noqa: F401 - fixtures are used by name
    TOL,
    _engine,
    _ids,
    _one_thread,
    assemble,
    assert_same_prefill,
    blend,
    case,
    engine,
    max_diff,
)
from transformers import (
    DynamicCache,
)

from ragkv.config import POLICIES, BlendConfig
from ragkv.engine.hf import cache_kwarg
from ragkv.engine.kv import ChunkKV
from ragkv.engine.policies import ComputeAll, make_policy
from ragkv.engine.runner import LlamaFamilyRunner

# ---- ratio 1.0, prefix, reuse == full ------------------------------------------------------

def test_fixture_prompt_is_not_trivial(engine, case):
    """Cold chunk caches really differ from in-context KV, so equality tests below mean
    something: plain reuse must not already match full prefill. On these models reuse is 1.3
    to 3.2 off in the logits (max |logit| ~3-4), so 1.0 is near the real gap and 10^4 x TOL."""
    reuse = blend(engine, case, BlendConfig(), mode="reuse")
    assert max_diff(reuse.logits, case.full.logits) > 1.0
    assert torch.isfinite(case.full.logits).all()


def test_blend_ratio_one_equals_full(engine, case):
    got = blend(engine, case, BlendConfig(ratio=1.0))
    assert_same_prefill(got, case.full)
    T = len(case.prompt)
    assert got.recomputed_per_layer == [T - case.prompt.prefix_len] * engine.runner.n_layers


@pytest.mark.parametrize("policy", POLICIES)
def test_ratio_one_is_compute_all_for_every_policy(policy):
    """Why ratio 1.0 is tested once per model, not once per policy: every policy becomes
    compute-all there (if that ever changes, this fails and per-policy cases are due)."""
    assert type(make_policy(BlendConfig(ratio=1.0, policy=policy), 4)) is ComputeAll


def test_prefix_mode_equals_full(engine, case):
    # Only the template prefix is exact; everything after it is computed.
    got = engine.prefill(case.prompt, case.cached[:1], "prefix", BlendConfig(),
                         case.prompt.prefix_len)
    assert_same_prefill(got, case.full)
    # Nothing cached at all: the fusion loop runs plain causal attention over every token.
    got = engine.prefill(case.prompt, [], "prefix", BlendConfig(), 0)
    assert_same_prefill(got, case.full)


def test_reuse_of_one_chunk_placed_first_equals_full(engine):
    g = torch.Generator().manual_seed(7)
    chunk, suffix = _ids(g, 30), _ids(g, 6)
    prompt = assemble([], [chunk], suffix)
    assert prompt.prefix_len == 0 and prompt.chunk_spans == [(0, 30)]
    full = engine.prefill(prompt, [], "full", BlendConfig(), 0)
    got = engine.prefill(prompt, [(0, engine.precompute(chunk))], "reuse", BlendConfig(), 0)
    assert max_diff(got.logits, full.logits) < TOL
    assert_same_prefill(got, full)
    assert got.final_positions.tolist() == list(range(30, 36))
    assert got.recomputed_per_layer == [6] * engine.runner.n_layers


def test_chunk_precomputed_after_prefix_is_exact(engine, case):
    pre_kv = case.cached[0][1]
    c1 = case.chunks[0]
    c1_after = engine.precompute(c1, past=pre_kv)
    p = case.prompt
    s1, e1 = p.chunk_spans[0]
    assert s1 == p.prefix_len

    # prefix + chunk + suffix, where the chunk's KV was computed after the same prefix.
    two = assemble(case.prefix, [c1], case.suffix)
    full_two = engine.prefill(two, [], "full", BlendConfig(), 0)
    cached = [(0, pre_kv), (s1, c1_after)]
    reuse = engine.prefill(two, cached, "reuse", BlendConfig(), e1)
    assert_same_prefill(reuse, full_two)
    # exact_until only at the end of the prefix: reuse must still be exact here.
    reuse = engine.prefill(two, cached, "reuse", BlendConfig(), p.prefix_len)
    assert_same_prefill(reuse, full_two)

    # prefix mode over the 3-chunk prompt with prefix + first chunk exact.
    got = engine.prefill(p, cached, "prefix", BlendConfig(), e1)
    assert_same_prefill(got, case.full)
    assert got.recomputed_per_layer == [len(p) - e1] * engine.runner.n_layers


# ---- RoPE re-encoding ----------------------------------------------------------------------

@pytest.mark.parametrize("offset", [0, 7, 513])
def test_rotate_matches_model_apply_rotary(engine, offset):
    runner = engine.runner
    modeling = sys.modules[type(engine.model).__module__]
    g = torch.Generator().manual_seed(offset)
    n, D = 9, runner.head_dim
    q = torch.randn(1, runner.q_heads, n, D, generator=g)
    k = torch.randn(1, runner.kv_heads, n, D, generator=g)
    pos = torch.arange(offset, offset + n)
    cos_m, sin_m = engine.model.model.rotary_emb(k, pos[None])
    q_ref, k_ref = modeling.apply_rotary_pos_emb(q, k, cos_m, sin_m)
    cos, sin = runner.cos_sin(pos)
    assert max_diff(runner.rotate(k[0], cos, sin), k_ref[0]) < 1e-5
    assert max_diff(runner.rotate(q[0], cos, sin), q_ref[0]) < 1e-5


def _rope_tables(rp: dict, D: int, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin ``[n, D]`` in float64 straight from rope parameters ``rp``, by the published
    definitions (no transformers code): default RoPE, linear position interpolation, Llama
    3.1's frequency-band scaling, and YaRN (ramp over the dimension index between the
    correction dims of beta_fast/beta_slow rotations, attention factor 0.1 ln(s) + 1)."""
    kind, base = rp.get("rope_type", "default"), float(rp["rope_theta"])
    inv = 1.0 / base ** (torch.arange(0, D, 2, dtype=torch.float64) / D)
    scale = 1.0
    if kind == "linear":
        inv = inv / rp["factor"]
    elif kind == "llama3":
        s, lo, hi = rp["factor"], rp["low_freq_factor"], rp["high_freq_factor"]
        old = rp["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv
        smooth = (old / wavelen - lo) / (hi - lo)
        mid = (1 - smooth) * inv / s + smooth * inv
        inv = torch.where(wavelen > old / lo, inv / s, torch.where(wavelen < old / hi, inv, mid))
    elif kind == "yarn":
        s, old = rp["factor"], rp["original_max_position_embeddings"]

        def dim_of(rotations: float) -> float:  # the dim that turns `rotations` times in `old`
            return D * math.log(old / (rotations * 2 * math.pi)) / (2 * math.log(base))

        low = max(math.floor(dim_of(rp.get("beta_fast") or 32)), 0)
        high = min(math.ceil(dim_of(rp.get("beta_slow") or 1)), D - 1)
        ramp = ((torch.arange(D // 2, dtype=torch.float64) - low) / max(high - low, 1e-3))
        keep = 1 - ramp.clamp(0, 1)  # 1: original frequency, 0: interpolated by s
        inv = inv / s * (1 - keep) + inv * keep
        scale = 0.1 * math.log(s) + 1.0
    else:
        assert kind == "default", kind
    angles = positions.double()[:, None] * inv[None, :]
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos() * scale, angles.sin() * scale


def test_cos_sin_follows_the_configured_rope_scaling(engine):
    """The runner's tables equal the ones computed from the config's rope parameters, at
    contiguous and scattered positions (a chunk re-placed anywhere): the right scheme, not
    default RoPE. float32 holds an angle of up to ~1000 rad to ~6e-5, hence 2e-4."""
    cfg = engine.model.config
    rp = cfg.rope_parameters
    D = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    positions = torch.cat([torch.arange(0, 64), torch.tensor([900, 5, 513, 200, 1000, 17])])
    cos, sin = engine.runner.cos_sin(positions)
    want_cos, want_sin = _rope_tables(rp, D, positions)
    assert cos.shape == want_cos.shape
    assert max_diff(cos, want_cos) < 2e-4 and max_diff(sin, want_sin) < 2e-4
    if rp.get("rope_type", "default") != "default":
        # The scaled scheme is far from default RoPE at these positions: a runner that used
        # default tables would fail above.
        plain, _ = _rope_tables({"rope_theta": rp["rope_theta"]}, D, positions)
        assert max_diff(plain, want_cos) > 0.1


@pytest.mark.parametrize("offset", [7, 513])
def test_reencoded_keys_match_model_cache_at_shifted_positions(engine, offset):
    """Pre-RoPE keys computed once and rotated to positions p (=0..) or p+d (=offset..) equal
    the keys the model itself caches when the same tokens run at those positions."""
    runner = engine.runner
    g = torch.Generator().manual_seed(100 + offset)
    ids = torch.tensor(_ids(g, 12))

    def model_layer0(pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        cache = DynamicCache(config=engine.model.config)
        engine.model(input_ids=ids[None], position_ids=pos[None], use_cache=True,
                     **{cache_kwarg(engine.model): cache})
        return cache.layers[0].keys[0], cache.layers[0].values[0]

    with torch.inference_mode():
        _, k_pre, v0 = runner.qkv(0, runner.embed(ids))
        p = torch.arange(len(ids))
        k_p, v_p = model_layer0(p)
        k_pd, v_pd = model_layer0(p + offset)
        ours_p = runner.rotate(k_pre, *runner.cos_sin(p))
        ours_pd = runner.rotate(k_pre, *runner.cos_sin(p + offset))
    assert max_diff(ours_p, k_p) < 1e-5
    assert max_diff(ours_pd, k_pd) < 1e-5
    assert max_diff(k_p, k_pd) > 1e-3  # the shift really moves the keys
    assert max_diff(v0, v_p) < 1e-5 and max_diff(v0, v_pd) < 1e-5


def test_cached_chunk_at_offset_matches_model_layer0(engine):
    """precompute() stores pre-RoPE keys: rotating layer 0 to any offset matches the model."""
    g = torch.Generator().manual_seed(5)
    ids = _ids(g, 16)
    kv = engine.precompute(ids)
    for offset in (0, 7, 513):
        pos = torch.arange(offset, offset + len(ids))
        cache = DynamicCache(config=engine.model.config)
        with torch.inference_mode():
            engine.model(input_ids=torch.tensor([ids]), position_ids=pos[None],
                         **{cache_kwarg(engine.model): cache}, use_cache=True)
            ours = engine.runner.rotate(kv.k[0], *engine.runner.cos_sin(pos))
        assert max_diff(ours, cache.layers[0].keys[0]) < 1e-5
        assert max_diff(kv.v[0], cache.layers[0].values[0]) < 1e-5


# ---- exact causal mask ---------------------------------------------------------------------

def test_attend_ignores_keys_after_query_position(engine):
    runner = engine.runner
    g = torch.Generator().manual_seed(3)
    T, D = 40, runner.head_dim
    q = torch.randn(runner.q_heads, 5, D, generator=g)
    k = torch.randn(runner.kv_heads, T, D, generator=g)
    v = torch.randn(runner.kv_heads, T, D, generator=g)
    q_pos = torch.tensor([2, 9, 10, 17, 25])
    last = int(q_pos.max())
    ref = runner.attend(q, k[:, :last + 1], v[:, :last + 1], q_pos)
    k_bad, v_bad = k.clone(), v.clone()
    k_bad[:, last + 1:] = 1e3
    v_bad[:, last + 1:] = 1e4
    got = runner.attend(q, k_bad, v_bad, q_pos)
    assert torch.isfinite(got).all()
    assert max_diff(got, ref) < 1e-6
    # Also per query: garbage right after each query's own position is invisible to it.
    for i, p in enumerate(q_pos.tolist()):
        kb, vb = k.clone(), v.clone()
        kb[:, p + 1:] = 1e3
        vb[:, p + 1:] = 1e4
        row = runner.attend(q[:, i:i + 1], kb, vb, q_pos[i:i + 1])
        assert max_diff(row, ref[i:i + 1]) < 1e-6
    # q_pos=None is plain causal over 0..T-1 and agrees with the explicit mask.
    qa = torch.randn(runner.q_heads, T, D, generator=g)
    assert max_diff(runner.attend(qa, k, v, None), runner.attend(qa, k, v, torch.arange(T))) < 1e-5


def _ref_attend(runner: LlamaFamilyRunner, q, k, v, q_pos) -> torch.Tensor:
    """Naive float64 attention with the exact position mask (the definition attend implements)."""
    rep = runner.q_heads // runner.kv_heads
    k = k.double().repeat_interleave(rep, dim=0)
    v = v.double().repeat_interleave(rep, dim=0)
    scores = q.double() @ k.transpose(1, 2) * runner.scaling
    hidden = torch.arange(k.shape[1])[None, :] > q_pos[:, None]
    probs = torch.softmax(scores.masked_fill(hidden, float("-inf")), dim=-1)
    return (probs @ v).transpose(0, 1).reshape(q.shape[1], -1)


def _qkv(runner: LlamaFamilyRunner, n: int, T: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    D = runner.head_dim
    return (torch.randn(runner.q_heads, n, D, generator=g),
            torch.randn(runner.kv_heads, T, D, generator=g),
            torch.randn(runner.kv_heads, T, D, generator=g))


@pytest.mark.parametrize("kind", ["causal", "tail", "tail-1", "sparse", "sparse-many",
                                  "sparse-with-last"])
def test_attend_matches_naive_reference(engine, kind):
    """Every code path of attend (plain causal, contiguous tail, sparse query blocks) computes
    softmax(q k^T * scale, masked to keys <= q_pos) v."""
    runner = engine.runner
    T = 300
    g = torch.Generator().manual_seed(1)
    q_pos = {
        "causal": torch.arange(T),
        "tail": torch.arange(T - 40, T),
        "tail-1": torch.tensor([T - 1]),
        "sparse": torch.tensor([0, 5, 6, 7, 100, 101, 250]),
        "sparse-many": torch.sort(torch.randperm(T - 1, generator=g)[:200]).values,
        "sparse-with-last": torch.cat([torch.arange(10, 150, 3), torch.arange(T - 20, T)]),
    }[kind]
    q, k, v = _qkv(runner, len(q_pos), T)
    ref = _ref_attend(runner, q, k, v, q_pos)
    got = runner.attend(q, k, v, None if kind == "causal" else q_pos)
    assert got.shape == ref.shape
    assert max_diff(got, ref) < 1e-5
    if kind == "causal":
        assert max_diff(runner.attend(q, k, v, q_pos), ref) < 1e-5


def test_attention_probs_match_reference(engine):
    runner = engine.runner
    q_pos = torch.tensor([3, 40, 41, 79])
    q, k, _ = _qkv(runner, len(q_pos), 80, seed=4)
    probs = runner.attention_probs(q, k, q_pos)
    assert probs.shape == (runner.q_heads, len(q_pos), 80)
    assert max_diff(probs.sum(-1), torch.ones(runner.q_heads, len(q_pos))) < 1e-5
    for i, p in enumerate(q_pos.tolist()[:-1]):  # the last query (79) sees every key
        assert probs[:, i, p + 1:].abs().max() == 0
    rep = runner.q_heads // runner.kv_heads
    scores = q.double() @ k.double().repeat_interleave(rep, 0).transpose(1, 2) * runner.scaling
    hidden = torch.arange(80)[None, :] > q_pos[:, None]
    ref = torch.softmax(scores.masked_fill(hidden, float("-inf")), -1)
    assert max_diff(probs, ref) < 1e-5


def test_attend_with_unsorted_query_positions():
    runner = _engine("llama").runner
    q_pos = torch.tensor([25, 3, 14])
    q, k, v = _qkv(runner, 3, 30, seed=2)
    with pytest.raises(ValueError, match="increasing"):  # the contract: sorted positions
        runner.attend(q, k, v, q_pos)
    order = torch.argsort(q_pos)
    got = runner.attend(q[:, order], k, v, q_pos[order])
    assert max_diff(got, _ref_attend(runner, q[:, order], k, v, q_pos[order])) < 1e-5


def _modes():
    yield "reuse", BlendConfig()
    yield "prefix", BlendConfig()
    yield "blend", BlendConfig(ratio=1.0)
    for policy in POLICIES:
        yield "blend", BlendConfig(ratio=0.3, policy=policy, deviation_on="k")


@pytest.mark.parametrize(("mode", "cfg"), list(_modes()),
                         ids=lambda x: x if isinstance(x, str) else f"{x.policy}@{x.ratio}")
def test_later_chunk_kv_never_changes_earlier_positions(engine, case, mode, cfg):
    """Perturb the last chunk's cached KV. For every layer whose selection of earlier positions
    (at that layer and all before) is unchanged, every earlier position's fused K/V must be
    unchanged: a token at position p only ever sees keys at positions <= p."""
    p = case.prompt
    start = p.chunk_spans[-1][0]
    if mode == "blend" and cfg.ratio < 1.0 and cfg.policy != "chunk_head":
        # Deviation is measured on K; perturbing only values keeps the selection at the first
        # check layer (and the next) fixed, since every token's V is fresh up to there.
        perturb_k = False
    else:
        perturb_k = True
    s, kv = case.cached[-1]
    g = torch.Generator().manual_seed(11)
    bad = ChunkKV(kv.k + (5.0 * torch.randn(kv.k.shape, generator=g) if perturb_k else 0.0),
                  kv.v + 5.0 * torch.randn(kv.v.shape, generator=g))
    cached_bad = [*case.cached[:-1], (s, bad)]
    a = engine.prefill(p, case.cached, mode, cfg, p.prefix_len, record=True)
    b = engine.prefill(p, cached_bad, mode, cfg, p.prefix_len, record=True)
    if mode != "prefix" and not (mode == "blend" and cfg.ratio >= 1.0):
        # The perturbation is visible after the chunk: the test is not vacuous.
        assert max_diff(a.logits, b.logits) > 1e-6
    checked = 0
    for layer in range(engine.runner.n_layers):
        if mode == "prefix" or (mode == "blend" and cfg.ratio >= 1.0):
            same_sel = True
        else:
            sa = [x[x < start] for x in a.layer_sets[:layer + 1]]
            sb = [x[x < start] for x in b.layer_sets[:layer + 1]]
            same_sel = all(torch.equal(x, y) for x, y in zip(sa, sb, strict=True))
        if not same_sel:
            assert cfg.policy == "gradual", "selection before the chunk moved for a fixed policy"
            break
        checked += 1
        assert max_diff(a.k[layer][:, :start], b.k[layer][:, :start]) < 1e-5, layer
        assert max_diff(a.v[layer][:, :start], b.v[layer][:, :start]) < 1e-5, layer
    assert checked >= (3 if cfg.policy == "gradual" else engine.runner.n_layers)


def test_full_prefill_projects_only_the_last_position_to_the_vocabulary(engine):
    """Full prefill is the baseline of every TTFT ratio, so it must not do work a serving
    engine skips: the vocabulary projection runs on the last position alone, and its logits
    are the last row of the all-position logits."""
    g = torch.Generator().manual_seed(11)
    prompt = assemble([], [_ids(g, 20), _ids(g, 12)], _ids(g, 5))
    rows = []
    hook = engine.model.lm_head.register_forward_hook(
        lambda _m, args, _out: rows.append(args[0].shape[-2]))
    try:
        full = engine.prefill(prompt, [], "full", BlendConfig(), 0)
    finally:
        hook.remove()
    assert rows == [1]
    with torch.inference_mode():
        every = engine.model(input_ids=torch.tensor([prompt.ids])).logits[0, -1].float()
    assert max_diff(full.logits, every) < TOL
