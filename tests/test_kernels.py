"""Each Triton kernel against its PyTorch reference (docs/design.md §3: exact re-encoding and mask).

Without a GPU the kernels run through Triton's interpreter (conftest sets TRITON_INTERPRET), so
shapes stay small; on a CUDA device the same tests run at full size.
"""

from __future__ import annotations

import pytest
import torch
from engine_cases import MODEL_SPECS, _engine, max_diff
from kernel_spy import LaunchSpy, spy_launches

from ragkv.engine.kernels import TorchOps, make_ops

pytest.importorskip("triton")
from ragkv.engine.kernels import attention  # noqa: E402 - needs triton

CUDA = torch.cuda.is_available()
DEV = "cuda" if CUDA else "cpu"
REF = TorchOps()
TRI = make_ops("triton", DEV)
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# Worst-case elementwise error of one rounding of the output, by dtype.
TOL = {torch.float32: 1e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}
BIG = 8 if CUDA else 1  # scale of the shapes


@pytest.fixture
def launches(monkeypatch) -> dict[str, LaunchSpy]:
    """Every test of a kernel asserts the kernel itself ran (``launches[name].calls``)."""
    return spy_launches(monkeypatch)


def _rand(*shape, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g).to(DEV, dtype)


# ---- RoPE re-encoding ------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("D", [64, 96, 128])
@pytest.mark.parametrize("where", ["prefix", "offsets", "scattered"])
def test_rope_matches_reference(launches, dtype, D, where):
    R, N, P = 6 * BIG, 37 * BIG, 200 * BIG
    x = _rand(R, N, D, dtype=dtype)
    cos, sin = _rand(P, D, dtype=dtype, seed=1), _rand(P, D, dtype=dtype, seed=2)
    pos = {"prefix": None, "offsets": torch.arange(N) + 55 * BIG,
           "scattered": torch.randperm(P, generator=torch.Generator().manual_seed(3))[:N]}[where]
    pos = None if pos is None else pos.to(DEV)
    got = TRI.rope(x, cos, sin, pos)
    assert launches["rope"].calls == 1
    want = REF.rope(x.float(), cos.float(), sin.float(), pos)
    assert got.dtype == dtype and got.shape == x.shape
    scale = want.abs().max().item()
    assert max_diff(got, want) <= TOL[dtype] * max(1.0, scale)


@pytest.mark.parametrize("ops", [REF, TRI], ids=["torch", "triton"])
def test_rope_into_a_given_buffer_equals_a_fresh_result(launches, ops):
    x = _rand(2, 3, 19, 64)
    cos, sin = _rand(40, 64, seed=1), _rand(40, 64, seed=2)
    out = torch.full((2 * 3 * 19 * 64 + 5,), float("nan"), device=DEV)[:-5].view(2, 3, 19, 64)
    got = ops.rope(x, cos, sin, out=out)
    assert got.data_ptr() == out.data_ptr()
    assert torch.equal(got, ops.rope(x, cos, sin))
    assert launches["rope"].calls == (2 if ops is TRI else 0)


@pytest.mark.parametrize("name", [m for m in MODEL_SPECS if "rope" in m] + ["llama-headdim32"])
def test_rope_uses_the_models_own_tables(launches, name):
    """Scaled RoPE variants stay exact: the kernel reads the model's tables, it derives none."""
    runner = _engine(name).runner
    k = _rand(runner.n_layers, runner.kv_heads, 30, runner.head_dim, seed=4).cpu()
    pos = torch.arange(30) + 400
    cos, sin = runner.cos_sin(torch.arange(512))
    want = runner.rotate(k, *runner.cos_sin(pos))
    got = TRI.rope(k.to(DEV), cos.to(DEV), sin.to(DEV), pos.to(DEV)).cpu()
    assert launches["rope"].calls == 1
    assert max_diff(got, want) < 1e-5


# ---- deviation and selection -----------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("H,D", [(2, 64), (3, 64), (8, 128), (1, 48)])
def test_deviation_matches_reference(launches, dtype, H, D):
    T, n = 90 * BIG, 50 * BIG
    new, buf = _rand(H, n, D, dtype=dtype), _rand(H, T, D, dtype=dtype, seed=1)
    idx = torch.sort(torch.randperm(T)[:n]).values.to(DEV)
    want = REF.deviation(new, buf, idx)
    got = TRI.deviation(new, buf, idx)
    assert got.dtype == torch.float32
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-4)
    both = TRI.deviation(new, buf, idx, got.clone())  # K and V deviations add up
    assert torch.allclose(both, 2 * want, rtol=1e-5, atol=1e-4)
    assert launches["deviation"].calls == 2


def _deviations(n: int, kind: str, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    d = torch.rand(n, generator=g) * 10
    if kind == "ties":
        d = torch.randint(0, 5, (n,), generator=g).float()
    elif kind == "zeros":
        d[: n // 2] = 0.0
    elif kind == "wide":
        d = torch.exp(torch.randn(n, generator=g) * 20)  # many binades, inf and tiny values
    return d.to(DEV)


@pytest.mark.parametrize("kind", ["uniform", "ties", "zeros", "wide"])
@pytest.mark.parametrize("n", [1, 7, 1500, 5000])
@pytest.mark.parametrize("frac", [0.0, 0.05, 0.15, 0.5, 1.0, 2.0])
def test_keep_top_matches_reference(launches, kind, n, frac):
    d = _deviations(n, kind)
    must = (torch.rand(n, generator=torch.Generator().manual_seed(9)) < 0.1).to(DEV)
    must[-1] = True  # the last position is always forced
    budget = int(frac * n)
    got = TRI.keep_top(d, must, budget)
    assert launches["keep_top"].calls == 1
    want = REF.keep_top(d, must, budget)
    assert torch.equal(got, want)
    assert int(got.sum()) == int(must.sum()) + min(budget, int((~must).sum()))
    assert bool(got[must].all())


def test_keep_top_counts_nan_as_largest(launches):
    d = torch.tensor([1.0, float("nan"), 3.0, 2.0], device=DEV)
    must = torch.zeros(4, dtype=torch.bool, device=DEV)
    assert TRI.keep_top(d, must, 2).tolist() == [False, True, True, False]
    assert launches["keep_top"].calls == 1
    assert torch.equal(REF.keep_top(d, must, 2), TRI.keep_top(d, must, 2))


# ---- selected-query attention ----------------------------------------------------------------

def _exact_attention(q, k, v, q_pos, scale):
    """The definition: masked softmax in fp64, query i seeing keys <= q_pos[i]."""
    group = q.shape[0] // k.shape[0]
    k = k.double().repeat_interleave(group, 0)
    v = v.double().repeat_interleave(group, 0)
    s = q.double() @ k.transpose(1, 2) * scale
    mask = torch.arange(k.shape[1], device=q.device)[None, :] > q_pos[:, None]
    p = torch.softmax(s.masked_fill(mask, float("-inf")), dim=-1)
    return (p @ v).transpose(0, 1)  # [n, Hq, D]


def _positions(T: int, n: int, pattern: str) -> torch.Tensor:
    g = torch.Generator().manual_seed(5)
    if pattern == "tail":
        return torch.arange(T - n, T)
    if pattern == "long-tail":  # all but an exact prefix: the layers before the check
        return torch.arange(5, T)
    if pattern == "one":
        return torch.tensor([T - 1])
    if pattern == "first":
        return torch.tensor([0, 1, 2])
    pos = torch.sort(torch.randperm(T - 1, generator=g)[: n - 1]).values
    return torch.cat([pos, torch.tensor([T - 1])])  # the last position is always computed


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("Hq,Hkv,D", [(4, 2, 64), (6, 6, 32), (8, 2, 128), (3, 1, 80)])
@pytest.mark.parametrize("pattern", ["sparse", "tail", "long-tail", "one", "first"])
def test_selected_attention_matches_exact_mask(launches, dtype, Hq, Hkv, D, pattern):
    T = 150 * BIG
    n = 24 * BIG
    q_pos = _positions(T, n, pattern).to(DEV)
    q = _rand(Hq, len(q_pos), D, dtype=dtype)
    k, v = _rand(Hkv, T, D, dtype=dtype, seed=1), _rand(Hkv, T, D, dtype=dtype, seed=2)
    scale = D**-0.5
    want = _exact_attention(q, k, v, q_pos, scale)
    # The kernel itself, called directly: the kernel set would route a long contiguous tail to
    # the reference (padded causal SDPA), and this test is about the kernel.
    got = attention.selected_attention(q, k, v, q_pos, scale)
    assert launches["attention"].calls == 1
    assert got.shape == (len(q_pos), Hq, D) and got.dtype == dtype
    assert max_diff(got, want) < TOL[dtype]
    # The kernel set: the kernel wherever the queries are not most of the prompt as one tail.
    via_ops = TRI.attend_selected(q, k, v, q_pos, scale)
    if pattern != "long-tail":
        assert launches["attention"].calls == 2
    assert max_diff(via_ops, want) < TOL[dtype]
    assert max_diff(REF.attend_selected(q, k, v, q_pos, scale), want) < TOL[dtype]


def test_selected_attention_ignores_keys_beyond_each_position(launches):
    """Keys after a query's position must not leak into its output, however large."""
    T, Hq, Hkv, D = 64, 4, 2, 32
    q_pos = torch.tensor([3, 17, 40], device=DEV)
    q = _rand(Hq, 3, D)
    k, v = _rand(Hkv, T, D, seed=1), _rand(Hkv, T, D, seed=2)
    clean = TRI.attend_selected(q, k, v, q_pos, D**-0.5)
    for i, p in enumerate(q_pos.tolist()):
        kg, vg = k.clone(), v.clone()
        kg[:, p + 1:], vg[:, p + 1:] = 1e4, -1e4
        got = TRI.attend_selected(q, kg, vg, q_pos, D**-0.5)
        assert max_diff(got[i], clean[i]) == 0.0
    assert launches["attention"].calls == 1 + len(q_pos)


def test_selected_attention_large_scores_stay_finite(launches):
    """Scores of 1e4 and more: the online softmax must not overflow."""
    T, D = 96, 64
    q_pos = torch.arange(T - 8, T, device=DEV)
    q, k, v = _rand(2, 8, D) * 300, _rand(1, T, D, seed=1) * 300, _rand(1, T, D, seed=2)
    got = TRI.attend_selected(q, k, v, q_pos, D**-0.5)
    assert launches["attention"].calls == 1
    assert torch.isfinite(got).all()
    assert max_diff(got, _exact_attention(q, k, v, q_pos, D**-0.5)) < 1e-4


# ---- choosing the kernel set -----------------------------------------------------------------

def test_make_ops_choices(monkeypatch):
    assert make_ops("torch", DEV).name == "torch"
    assert make_ops("auto", "cpu").name == "torch"
    if CUDA:
        assert make_ops("auto", "cuda").name == "triton"
    with pytest.raises(ValueError, match="kernels must be one of"):
        make_ops("cuda-graphs", DEV)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="CUDA devices"):
        make_ops("triton", "cpu")
