"""The CPU split kernel for selected-query attention (unmasked prefix + masked diagonal,
merged by log-sum-exp) against the masked-SDPA reference and a float64 naive attention
(docs/design.md §3: exact mask)."""

from __future__ import annotations

import pytest
import torch
from engine_cases import MODELS, _case, _engine, assert_same_prefill, blend

from ragkv.config import BlendConfig
from ragkv.engine.kernels import TorchOps
from ragkv.engine.kernels.split_attention import BLOCKS, MIN_KEYS, split_attention

REF = TorchOps()
# Elementwise error of one rounding of the output, by dtype (as in test_kernels.py).
TOL = {torch.float32: 1e-5, torch.bfloat16: 3e-2, torch.float16: 4e-3}


def naive(q, k, v, q_pos, scale):
    """float64 attention with the exact mask: query i sees keys <= q_pos[i]."""
    g = q.shape[0] // k.shape[0]
    kk, vv = (x.double().repeat_interleave(g, 0) for x in (k, v))
    s = q.double() @ kk.transpose(1, 2) * scale
    s = s.masked_fill(torch.arange(k.shape[1])[None, :] > q_pos[:, None], float("-inf"))
    return (s.softmax(-1) @ vv).transpose(0, 1)


def _positions(T: int, pattern: str, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if pattern == "first":
        return torch.tensor([0])
    if pattern == "last":
        return torch.tensor([T - 1])
    if pattern == "first-and-last":
        return torch.tensor([0, T - 1])
    if pattern == "all":
        return torch.arange(T)
    if pattern == "contiguous-middle":
        return torch.arange(T // 3, T // 3 + 40)
    if pattern == "short-tail":
        return torch.arange(T - 24, T)
    if pattern == "blend":  # ~15% scattered, then the question suffix
        body = torch.randperm(T - 30, generator=g)[: (T - 30) * 15 // 100].sort().values
        return torch.cat([body, torch.arange(T - 30, T)])
    if pattern == "clustered":  # dense runs far apart: leaf spans of very different sizes
        runs = [torch.arange(s, s + 20) for s in (3, 150, 151 + 20, T // 2, T - 40)]
        return torch.unique(torch.cat(runs)).clamp(max=T - 1).unique()
    return torch.randperm(T, generator=g)[: T // 5].sort().values  # scattered


def _qkv(hq, hkv, n, T, d, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(hq, n, d, generator=g).to(dtype),
            torch.randn(hkv, T, d, generator=g).to(dtype),
            torch.randn(hkv, T, d, generator=g).to(dtype))


PATTERNS = ["first", "last", "first-and-last", "all", "contiguous-middle", "short-tail", "blend",
            "clustered", "scattered"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("hq,hkv,d", [(9, 3, 64), (4, 4, 32), (8, 1, 16), (6, 2, 80)])
@pytest.mark.parametrize("pattern", PATTERNS)
def test_split_matches_masked_reference(dtype, hq, hkv, d, pattern):
    T = 700
    q_pos = _positions(T, pattern, seed=hq * 31 + d)
    q, k, v = _qkv(hq, hkv, q_pos.numel(), T, d, dtype, seed=hq + d)
    scale = d**-0.5
    got = split_attention(q, k, v, q_pos, scale)
    assert got.shape == (q_pos.numel(), hq, d) and got.dtype == dtype
    want = REF.attend_selected_masked(q, k, v, q_pos, scale)
    exact = naive(q, k, v, q_pos, scale)
    tol = TOL[dtype]
    assert (got.double() - exact).abs().max() < tol
    assert (got.float() - want.float()).abs().max() < 2 * tol
    # What the engine calls: the split kernel on sparse queries, the padded causal kernel on a
    # long contiguous tail; exact either way.
    assert (REF.attend_selected(q, k, v, q_pos, scale).double() - exact).abs().max() < tol


@pytest.mark.parametrize("blocks", [(1,), (7,), (64,), (256, 32), (512, 128, 32), (64, 8, 1),
                                    (2048, 512)])
@pytest.mark.parametrize("T", [1, 5, 300, 2100])
def test_any_block_ladder_is_exact(blocks, T):
    """Every block ladder (one level or several, blocks larger than the query count) gives
    the same attention."""
    q_pos = _positions(T, "blend", seed=T) if T > 40 else torch.arange(T)[::2]
    q, k, v = _qkv(9, 3, q_pos.numel(), T, 64, torch.float32, seed=T)
    got = split_attention(q, k, v, q_pos, 0.125, blocks=blocks)
    assert (got.double() - naive(q, k, v, q_pos, 0.125)).abs().max() < 1e-5


def test_default_blocks_each_divide_the_one_before():
    assert all(a % b == 0 for a, b in zip(BLOCKS, BLOCKS[1:], strict=False))
    with pytest.raises(ValueError, match="divide"):
        split_attention(*_qkv(2, 1, 3, 10, 8, torch.float32, 0), torch.tensor([1, 5, 9]), 1.0,
                        blocks=(48, 32))


def test_keys_beyond_each_position_never_leak():
    """Huge keys/values after a query's position change nothing in its output."""
    T = 900
    q_pos = _positions(T, "blend", seed=3)
    q, k, v = _qkv(9, 3, q_pos.numel(), T, 64, torch.float32, seed=3)
    clean = split_attention(q, k, v, q_pos, 0.125)
    for i in (0, 17, q_pos.numel() // 2, q_pos.numel() - 2):
        p = int(q_pos[i])
        kg, vg = k.clone(), v.clone()
        kg[:, p + 1:], vg[:, p + 1:] = 1e4, -1e4
        got = split_attention(q, kg, vg, q_pos, 0.125)
        assert torch.equal(got[: i + 1], clean[: i + 1])


def test_large_scores_stay_finite():
    T = 400
    q_pos = _positions(T, "blend", seed=4)
    q, k, v = _qkv(4, 2, q_pos.numel(), T, 64, torch.float32, seed=4)
    q, k = q * 300, k * 300
    got = split_attention(q, k, v, q_pos, 0.125)
    assert torch.isfinite(got).all()
    assert (got.double() - naive(q, k, v, q_pos, 0.125)).abs().max() < 1e-4


def test_heads_must_group():
    with pytest.raises(ValueError, match="group"):
        split_attention(*_qkv(5, 2, 2, 10, 8, torch.float32, 0), torch.tensor([3, 9]), 1.0)


def test_reference_routes_sparse_queries_to_the_split_kernel(monkeypatch):
    """attend_selected on the CPU: sparse queries over MIN_KEYS keys or more and short tails
    through the split kernel, fewer keys through masked SDPA, a tail of more than half the
    prompt through padded causal SDPA; exact on every path."""
    from ragkv.engine.kernels import reference

    calls = []

    def spy(*args, **kwargs):
        calls.append(args[3].numel())
        return split_attention(*args, **kwargs)

    monkeypatch.setattr(reference, "split_attention", spy)
    big = MIN_KEYS
    sparse_big = torch.randperm(big - 1, generator=torch.Generator().manual_seed(2))[:40]
    for T, q_pos, routed in [(200, _positions(200, "scattered", 1), False),
                             (big, torch.cat([sparse_big.sort().values,
                                              torch.tensor([big - 1])]), True),
                             (200, torch.arange(190, 200), True),
                             (200, torch.arange(50, 200), False),
                             (200, torch.arange(200), False)]:
        calls.clear()
        q, k, v = _qkv(4, 2, q_pos.numel(), T, 32, torch.float32, seed=5)
        got = REF.attend_selected(q, k, v, q_pos, 0.2)
        assert bool(calls) == routed, (T, q_pos.numel())
        assert (got.double() - naive(q, k, v, q_pos, 0.2)).abs().max() < 1e-5


# ---- end to end: the blend through the split kernel ----------------------------------------

@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("ratio", [0.15, 0.5, 1.0])
def test_blend_through_the_split_kernel_equals_the_masked_blend(monkeypatch, name, ratio):
    """The engine's blend with every sparse attention through the split kernel (the short
    test prompts are under MIN_KEYS, so it is forced) selects the same tokens at every layer
    as the blend through masked SDPA, with logits and KV within the exactness tolerance; at
    ratio 1.0 both equal full prefill."""
    from ragkv.engine.kernels import reference

    engine, case = _engine(name), _case(name)
    ops = engine.runner.ops
    cfg = BlendConfig(ratio=ratio)
    calls = []

    def spy(*args, **kwargs):
        calls.append(args[3].numel())
        return split_attention(*args, **kwargs)

    monkeypatch.setattr(ops, "attend_selected", ops.attend_selected_masked)
    want = blend(engine, case, cfg, record=True)
    monkeypatch.undo()
    monkeypatch.setattr(reference, "MIN_KEYS", 0)
    monkeypatch.setattr(reference, "split_attention", spy)
    got = blend(engine, case, cfg, record=True)
    assert calls or ratio == 1.0  # the split kernel ran wherever queries were sparse
    assert [s.tolist() for s in got.layer_sets] == [s.tolist() for s in want.layer_sets]
    assert_same_prefill(got, want)
    if ratio == 1.0:
        assert_same_prefill(got, case.full)


def test_nothing_holds_the_keys_once_it_returns():
    """The fused K/V passed in are views of a pooled workspace, lent again only once nothing
    references them: the kernel must leave no reference cycle behind for the garbage
    collector to break later (its recursion once was a closure calling itself)."""
    import gc

    from ragkv.engine.loading import _storage_refs

    q, k, v = _qkv(6, 2, 40, 300, 16, torch.float32, seed=3)
    q_pos = _positions(300, "scattered", seed=3)[:40]
    fused_k, fused_v = k[None], v[None]  # [layers, Hkv, T, D], as the workspace holds them
    before = _storage_refs(k), _storage_refs(v)
    gc.disable()
    try:
        out = split_attention(q, fused_k[0], fused_v[0], q_pos, 0.25)  # one layer's views
        del out
        assert (_storage_refs(k), _storage_refs(v)) == before
    finally:
        gc.enable()
