"""The PyTorch reference kernels (ragkv/engine/kernels/reference.py) against their definitions,
written out naively in float64: RoPE (Llama's rotate-half convention, any tables), deviation,
top-k with its tie rule, and attention with the exact position mask. These references are the
contract the Triton kernels are held to (test_kernels.py), so they are pinned here on their
own, every argument combination included."""

from __future__ import annotations

import pytest
import torch

from ragkv.engine.kernels import TorchOps
from ragkv.engine.kernels.reference import sdpa

OPS = TorchOps()


def _randn(*shape: int, seed: int = 0, dtype=torch.float32) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max())


# ---- RoPE ----------------------------------------------------------------------------------

def _rope_def(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x * cos + rotate_half(x) * sin, rotate_half(x) = [-x2, x1] (Llama family)."""
    h = x.shape[-1] // 2
    rotated = torch.cat([-x[..., h:], x[..., :h]], dim=-1)
    return x.double() * cos.double() + rotated.double() * sin.double()


# Arbitrary tables (not only cos/sin of angles): the formula must hold row by row for any
# table, so a kernel cannot lean on a property of the default RoPE. N != D != P throughout.
H, N, D, P = 3, 5, 8, 40


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rope_default_positions_are_the_first_rows(dtype):
    x, cos, sin = _randn(H, N, D, dtype=dtype), _randn(P, D, seed=1, dtype=dtype), _randn(
        P, D, seed=2, dtype=dtype)
    got = OPS.rope(x, cos, sin)
    assert got.dtype == dtype and got.shape == x.shape
    tol = 1e-6 if dtype == torch.float32 else 0.05
    assert _max_diff(got, _rope_def(x, cos[:N], sin[:N])) < tol


def test_rope_at_given_positions():
    x, cos, sin = _randn(H, N, D), _randn(P, D, seed=1), _randn(P, D, seed=2)
    pos = torch.tensor([31, 2, 17, 17, 39])  # any order, repeats allowed
    got = OPS.rope(x, cos, sin, pos)
    assert _max_diff(got, _rope_def(x, cos[pos], sin[pos])) < 1e-6
    # Leading dims are free: one head, or [layers, heads, N, D].
    assert _max_diff(OPS.rope(x[0], cos, sin, pos), got[0]) == 0
    x4 = _randn(2, H, N, D, seed=3)
    assert _max_diff(OPS.rope(x4, cos, sin, pos), _rope_def(x4, cos[pos], sin[pos])) < 1e-6


def test_rope_into_out():
    x, cos, sin = _randn(H, N, D), _randn(P, D, seed=1), _randn(P, D, seed=2)
    pos = torch.tensor([3, 4, 5, 6, 7])
    x_before = x.clone()
    out = torch.full_like(x, float("nan"))
    got = OPS.rope(x, cos, sin, pos, out=out)
    assert got.data_ptr() == out.data_ptr(), "the result is written into out"
    assert _max_diff(out, _rope_def(x, cos[pos], sin[pos])) < 1e-6
    assert torch.equal(x, x_before), "x itself is left alone"
    out = torch.empty_like(x)
    OPS.rope(x, cos, sin, out=out)
    assert _max_diff(out, _rope_def(x, cos[:N], sin[:N])) < 1e-6


# ---- deviation -----------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_deviation_is_the_squared_distance_to_the_indexed_rows(dtype):
    k_new, k_buf = _randn(2, 4, 6, dtype=dtype), _randn(2, 9, 6, seed=1, dtype=dtype)
    index = torch.tensor([8, 0, 3, 3])
    got = OPS.deviation(k_new, k_buf, index)
    assert got.dtype == torch.float32 and got.shape == (4,)
    want = [float(((k_new[:, i].double() - k_buf[:, j].double()) ** 2).sum())
            for i, j in enumerate(index.tolist())]
    assert _max_diff(got, torch.tensor(want)) < 1e-4
    # Into ``out``: added (the K and V deviations sum), in place.
    out = torch.full((4,), 2.0)
    again = OPS.deviation(k_new, k_buf, index, out)
    assert again.data_ptr() == out.data_ptr()
    assert _max_diff(out, torch.tensor(want) + 2.0) < 1e-4


# ---- keep_top ------------------------------------------------------------------------------

def _keep_top_def(deviation: list[float], must: list[bool], budget: int) -> list[bool]:
    free = sorted((i for i, m in enumerate(must) if not m), key=lambda i: (-deviation[i], i))
    chosen = set(free[:max(0, budget)])
    return [m or i in chosen for i, m in enumerate(must)]


@pytest.mark.parametrize("budget", [-1, 0, 1, 3, 5, 100])
def test_keep_top_keeps_must_plus_the_largest_deviations(budget):
    dev = [0.5, 3.0, -1.0, 3.0, 7.0, 0.0, 3.0, 2.0]
    must = [False, False, True, False, True, False, False, False]
    got = OPS.keep_top(torch.tensor(dev), torch.tensor(must), budget)
    assert got.dtype == torch.bool
    assert got.tolist() == _keep_top_def(dev, must, budget)


def test_keep_top_does_not_modify_must():
    must = torch.tensor([True, False, False])
    OPS.keep_top(torch.tensor([1.0, 2.0, 3.0]), must, 1)
    assert must.tolist() == [True, False, False]


def test_keep_top_ties_go_to_the_lower_index():
    """Many equal deviations (a long run of ties, where an unstable sort reorders): the kept
    set is the lowest indices, so every implementation selects the same tokens."""
    n = 4096
    dev = torch.zeros(n)
    dev[::7] = 1.0
    must = torch.zeros(n, dtype=torch.bool)
    must[5] = True
    budget = 700
    got = OPS.keep_top(dev, must, budget)
    assert got.tolist() == _keep_top_def(dev.tolist(), must.tolist(), budget)
    low = OPS.keep_top(torch.zeros(n, dtype=torch.bfloat16), must, 10)
    assert low.nonzero().flatten().tolist() == [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10]


# ---- attention -----------------------------------------------------------------------------

def _attend_def(q, k, v, q_pos, scale) -> torch.Tensor:
    rep = q.shape[0] // k.shape[0]
    k = k.double().repeat_interleave(rep, dim=0)
    v = v.double().repeat_interleave(rep, dim=0)
    scores = q.double() @ k.transpose(1, 2) * scale
    hidden = torch.arange(k.shape[1])[None, :] > q_pos[:, None]
    return (torch.softmax(scores.masked_fill(hidden, float("-inf")), -1) @ v).transpose(0, 1)


def _positions(kind: str) -> tuple[int, torch.Tensor]:
    """(T, query positions) of each shape the attention paths tell apart."""
    T = 300
    return {
        "tail": (T, torch.arange(T - 70, T)),
        "long-tail": (T, torch.arange(T - 200, T)),
        "all": (T, torch.arange(T)),
        "one-last": (T, torch.tensor([T - 1])),
        "sparse": (T, torch.tensor([0, 1, 9, 64, 65, 200])),
        "blocks": (T, torch.arange(0, T - 1, 2)),  # 150 queries: split in blocks
        "first": (T, torch.tensor([0])),
        # most positions, ending at the last one, but not a contiguous tail
        "dense-with-last": (T, torch.cat([torch.arange(0, 10), torch.arange(11, T)])),
        "short-sparse": (10, torch.tensor([2, 5, 9])),  # first = T - head_dim, not a tail
        "early-block": (T, torch.arange(3, 8)),  # contiguous, ending at head_dim, not at T
    }[kind]


KINDS = ["tail", "long-tail", "all", "one-last", "sparse", "blocks", "first",
         "dense-with-last", "short-sparse", "early-block"]


@pytest.mark.parametrize("method", ["attend_selected", "attend_selected_masked"])
@pytest.mark.parametrize("kind", KINDS)
def test_attend_selected_is_masked_attention(kind, method):
    T, q_pos = _positions(kind)
    n = len(q_pos)
    q, k, v = _randn(4, n, 8), _randn(2, T, 8, seed=1), _randn(2, T, 8, seed=2)
    got = getattr(OPS, method)(q, k, v, q_pos, 0.3)
    assert got.shape == (n, 4, 8)
    assert _max_diff(got, _attend_def(q, k, v, q_pos, 0.3)) < 1e-5


@pytest.mark.parametrize("method", ["attend_selected", "attend_selected_masked"])
def test_attend_selected_refuses_unsorted_or_repeated_positions(method):
    cases = [(20, [4, 2, 9]), (20, [4, 4, 9]), (20, [4, 9, 6]), (20, [9, 4]),
             (6, [2, 4, 3, 5]), (5, [2, 2, 4]),  # shaped like a tail: first T - n, last T - 1
             (2560, [9, 4])]  # long prompts take the split kernel on the CPU
    for T, bad in cases:
        k, v = _randn(1, T, 8, seed=1), _randn(1, T, 8, seed=2)
        q = _randn(2, len(bad), 8)
        with pytest.raises(ValueError, match="^query positions must be strictly increasing$"):
            getattr(OPS, method)(q, k, v, torch.tensor(bad), 0.3)


def test_sdpa_without_mask_is_plain_causal_with_grouped_heads():
    q, k, v = _randn(4, 12, 8), _randn(2, 12, 8, seed=1), _randn(2, 12, 8, seed=2)
    got = sdpa(q, k, v, None, 0.5)
    assert got.shape == (4, 12, 8)
    assert _max_diff(got.transpose(0, 1), _attend_def(q, k, v, torch.arange(12), 0.5)) < 1e-5
