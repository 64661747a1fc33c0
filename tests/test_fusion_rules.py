"""Rules of the selection policies and of the fusion loop that the model-level tests
(test_engine_selection, test_engine_exactness) do not pin down: budgets per check layer, which
check layers a configuration gives, the guards ``fuse`` keeps, and ``compute_span`` after a
one-token past and across dtypes (docs/design.md §3)."""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import pytest
import torch
from engine_cases import (  # noqa: F401 - fixtures are used by name
    TOL,
    _engine,
    _ids,
    _one_thread,
    _Tok,
    make_case,
    make_model,
    max_diff,
)
from policy_cases import kept_chunk_tokens, make_ctx

from ragkv.config import POLICIES, BlendConfig
from ragkv.engine.blend import fuse
from ragkv.engine.hf import HFEngine
from ragkv.engine.kv import ChunkKV
from ragkv.engine.loading import Workspace
from ragkv.engine.plan import plan_prefill
from ragkv.engine.policies import (
    HKVD,
    REGISTRY,
    ChunkHead,
    ComputeAll,
    GradualFilter,
    HKVDWithHeads,
    QueryAwareHKVD,
    SelectionPolicy,
    covering_budget,
    make_policy,
    policy_class,
    reads_question,
    register,
)

# ---- selection context ---------------------------------------------------------------------

def test_context_defaults_and_budget():
    ctx = make_ctx(0.15)
    assert ctx.suffix_start == 109, "without a suffix start, the last position is the question"
    assert make_ctx(0.15, suffix_start=100).suffix_start == 100
    assert ctx.chunk_tokens == 100
    assert ctx.budget() == 15 and ctx.budget(0.333) == 33 and ctx.budget(1.0) == 100
    assert ctx.all_uncached_and_chunks().tolist() == list(range(5, 110))
    assert ctx.forced_positions().tolist() == list(range(105, 110))


def test_heads_are_each_chunks_first_positions():
    ctx = make_ctx(0.15, spans=((5, 7), (8, 20)), n_tokens=25)
    assert ctx.heads(4).tolist() == [5, 6, 8, 9, 10, 11]  # a short chunk gives what it has
    none = make_ctx(0.15, spans=(), n_tokens=10).heads(4)
    assert none.dtype == torch.long and none.numel() == 0


# ---- policies ------------------------------------------------------------------------------

def test_base_policy_keeps_every_active_position():
    ctx = make_ctx(0.3)
    policy = SelectionPolicy()
    assert policy.check_layers == () and not policy.reads_question
    assert policy.initial(ctx).tolist() == ctx.forced_positions().tolist()
    n, kept = kept_chunk_tokens(policy, ctx, 1)
    assert n == 100 and kept.tolist() == ctx.all_uncached_and_chunks().tolist()


def test_hkvd_keeps_the_budgets_largest_deviations_at_its_check_layer():
    policy = HKVD(layers=(2,))
    assert policy.check_layers == (2,)
    ctx = make_ctx(0.15)
    assert policy.initial(ctx).tolist() == list(range(5, 110))
    n, kept = kept_chunk_tokens(policy, ctx, 2)
    assert n == 15 and kept.tolist() == [*range(90, 105), *range(105, 110)]


@pytest.mark.parametrize("cls", [HKVD, QueryAwareHKVD, HKVDWithHeads])
def test_deviation_policies_narrow_over_several_check_layers(cls):
    """A wider preselection at the first check layer, the ratio at the last."""
    policy = cls(layers=(1, 2), start_factor=2.5, head_tokens=0) if cls is HKVDWithHeads \
        else cls(layers=(1, 2), start_factor=2.5)
    assert policy.check_layers == (1, 2)
    ctx = make_ctx(0.12)
    assert [kept_chunk_tokens(policy, ctx, layer)[0] for layer in (1, 2)] == [30, 12]
    cfg = BlendConfig(policy=cls.name, check_layers=(2, 1), start_factor=3.0)
    assert make_policy(cfg, 30).check_layers == (1, 2)
    assert make_policy(cfg, 30).start_factor == 3.0


@pytest.mark.parametrize(("ratio", "layers", "budgets"), [
    (0.3, (1, 2, 3), [60, 45, 30]),  # from 2x the ratio down to the ratio, linearly
    (0.75, (1, 2, 3), [100, 88, 75]),  # the first budget is capped at every chunk token
    (0.2, (1, 3), [40, 20]),
    (0.2, (2,), [20]),  # one check layer: the ratio itself
])
def test_gradual_budgets_interpolate_per_check_layer(ratio, layers, budgets):
    policy = GradualFilter(layers=layers)
    assert policy.check_layers == layers
    ctx = make_ctx(ratio)
    got = [kept_chunk_tokens(policy, ctx, layer)[0] for layer in layers]
    assert got == budgets


def test_gradual_check_layers_from_config():
    def layers(check_layers, n_layers):
        return make_policy(BlendConfig(policy="gradual", check_layers=check_layers),
                           n_layers).check_layers

    assert layers((1,), 32) == (1, 2, 3, 4)  # one layer named: it and the next three
    assert layers((2,), 4) == (2, 3)  # ... within the model
    assert layers((1, 3), 32) == (1, 3)  # several named: exactly those
    assert layers((1, 2, 5), 32) == (1, 2, 5)


def test_hkvd_with_heads_spends_the_budget_on_heads_first():
    policy = make_policy(BlendConfig(ratio=0.15, policy="hkvd+head", check_layers=(2,),
                                     head_tokens=3), 4)
    assert type(policy) is HKVDWithHeads
    assert policy.check_layers == (2,) and policy.head_tokens == 3
    ctx = make_ctx(0.15, spans=((5, 55), (55, 105)))
    n, kept = kept_chunk_tokens(policy, ctx, 2)
    assert n == 15  # 6 head tokens + the 9 largest deviations
    assert torch.isin(torch.tensor([5, 6, 7, 55, 56, 57]), kept).all()
    assert torch.isin(torch.arange(96, 105), kept).all()
    # More heads than budget: every head, nothing else.
    n, kept = kept_chunk_tokens(HKVDWithHeads(head_tokens=10), make_ctx(0.05, spans=(
        (5, 55), (55, 105))), 2)
    assert n == 20 and kept.tolist() == [*range(5, 15), *range(55, 65), *range(105, 110)]
    # No chunk past the exact part: only the forced positions.
    n, kept = kept_chunk_tokens(HKVDWithHeads(), make_ctx(0.15, spans=(), n_tokens=10), 2)
    assert n == 0 and kept.tolist() == list(range(5, 10))


def test_covering_budget_is_scale_free():
    """The guard asks for a share of the deviation mass, whatever its scale."""
    d = torch.tensor([0.3, 0.1, 0.05, 0.0, 7.0])
    must = torch.tensor([False, False, False, False, True])
    for scale in (1e-4, 1.0, 1e4):
        assert covering_budget(d * scale, must, 0.5) == 1, scale
        assert covering_budget(d * scale, must, 0.9) == 3, scale  # 0.4 of 0.45 falls short


@pytest.mark.parametrize("policy", ["hkvd", "qhkvd"])
def test_guard_raises_the_budget_up_to_max_ratio(policy):
    cfg = BlendConfig(ratio=0.15, policy=policy, coverage=1.0, max_ratio=0.3)
    guarded = make_policy(cfg, 4)
    ctx = make_ctx(0.15)
    n, kept = kept_chunk_tokens(guarded, ctx, 1)
    assert n == 30, "every deviating token is asked for: capped at max_ratio"
    assert guarded.raised == 15
    assert kept.tolist() == [*range(75, 105), *range(105, 110)]
    loose = make_policy(BlendConfig(ratio=0.15, policy=policy, coverage=1e-3), 4)
    assert kept_chunk_tokens(loose, ctx, 1)[0] == 15 and loose.raised == 0


def test_guard_counts_the_heads_against_max_ratio():
    cfg = BlendConfig(ratio=0.15, policy="hkvd+head", coverage=1.0, max_ratio=0.3,
                      head_tokens=3)
    guarded = make_policy(cfg, 4)
    n, kept = kept_chunk_tokens(guarded, make_ctx(0.15, spans=((5, 55), (55, 105))), 1)
    assert n == 30  # 6 heads + 24 raised: max_ratio bounds them together
    assert torch.isin(torch.tensor([5, 6, 7, 55, 56, 57]), kept).all()
    assert guarded.raised == 15


def test_chunk_head_computes_each_chunks_head_from_layer_0():
    ctx = make_ctx(0.15, spans=((5, 55), (56, 66)), n_tokens=70)
    policy = ChunkHead()
    assert policy.check_layers == ()
    heads = [*range(5, 5 + math.ceil(0.15 * 50)), *range(56, 56 + math.ceil(0.15 * 10))]
    assert policy.initial(ctx).tolist() == sorted({*heads, 55, *range(66, 70)})


def test_reads_question_only_for_a_query_aware_partial_blend():
    assert reads_question(BlendConfig(ratio=0.15, policy="qhkvd"))
    assert reads_question(BlendConfig(ratio=0.0, policy="qhkvd"))
    assert not reads_question(BlendConfig(ratio=1.0, policy="qhkvd"))  # computes everything
    assert not reads_question(BlendConfig(ratio="auto", policy="qhkvd"))
    for name in POLICIES:
        if name != "qhkvd":
            assert not reads_question(BlendConfig(ratio=0.15, policy=name)), name
    assert QueryAwareHKVD.reads_question and not HKVD.reads_question


def test_policies_by_name():
    assert POLICIES == ("hkvd", "gradual", "chunk_head", "hkvd+head", "qhkvd")
    assert tuple(REGISTRY) == POLICIES  # the config's list and the classes agree
    for name in POLICIES:
        assert policy_class(name).name == name
        assert BlendConfig(policy=name).policy == name
    message = ("^unknown selection policy 'fast'; choose from "
               "hkvd, gradual, chunk_head, hkvd\\+head, qhkvd$")
    with pytest.raises(ValueError, match=message):
        policy_class("fast")
    # a config names a known policy when it is made, not at its first prefill
    for bad in ("fast", "all", "reuse", None, 3):
        with pytest.raises(ValueError, match="^unknown selection policy"):
            BlendConfig(policy=bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=message):
        replace(BlendConfig(), policy="fast")


def test_a_policy_unlisted_in_the_config_is_not_registered():
    @dataclass
    class Unlisted(HKVD):
        name: str = "unlisted"

    with pytest.raises(ValueError, match="^selection policy 'unlisted' is not listed in "
                                         "ragkv.config.POLICIES$"):
        register(Unlisted)
    assert "unlisted" not in REGISTRY
    assert register(HKVD) is HKVD and REGISTRY["hkvd"] is HKVD  # a listed one is (again)


def test_make_policy_at_ratio_one_computes_everything_whatever_the_check_layers():
    assert type(make_policy(BlendConfig(ratio=1.0, check_layers=(9,)), 4)) is ComputeAll
    with pytest.raises(ValueError, match="check layer 4 does not exist"):
        make_policy(BlendConfig(ratio=0.5, policy="hkvd", check_layers=(1, 4)), 4)
    assert make_policy(BlendConfig(ratio=0.5, policy="hkvd", check_layers=(1, 3)),
                       4).check_layers == (1, 3)


# ---- fuse ----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def llama() -> HFEngine:
    return _engine("llama")


def _plan(engine: HFEngine, case, mode: str, cfg: BlendConfig):
    p = case.prompt
    return plan_prefill(len(p), p.chunk_spans, p.suffix_start,
                        [(s, kv.n_tokens) for s, kv in case.cached], p.prefix_len, mode, cfg,
                        engine.runner.n_layers)


class Initial(SelectionPolicy):
    """The reuse policy with chosen initial positions."""

    def __init__(self, positions: list[int]) -> None:
        super().__init__()
        self.positions = positions

    def initial(self, ctx):
        return torch.tensor(self.positions, dtype=torch.long)


@torch.inference_mode()  # as the engines run it
def test_fuse_refuses_a_plan_that_leaves_the_last_position_or_an_uncached_one(llama):
    case = make_case(llama, seed=3, lengths=[12, 12])
    p = case.prompt
    ids = torch.tensor(p.ids)
    ctx = _plan(llama, case, "reuse", BlendConfig()).ctx
    uncached = p.uncached_positions()
    T = len(p)
    for positions in ([], uncached[:-1]):
        with pytest.raises(AssertionError, match="^the last prompt position must be computed$"):
            fuse(llama.runner, ids, case.cached, ctx, Initial(positions))
    with pytest.raises(AssertionError, match="^positions without cached KV must be computed "
                                             "from layer 0$"):
        fuse(llama.runner, ids, case.cached, ctx, Initial([T - 1]))


@torch.inference_mode()
def test_fuse_with_only_the_last_position_uncached():
    """A one-token question after fully cached KV: the loop computes that token only."""
    engine = _engine("llama")
    case = make_case(engine, seed=4, lengths=[16], n_chunks=1, suffix_len=1)
    p = case.prompt
    plan = _plan(engine, case, "reuse", BlendConfig())
    out = fuse(engine.runner, torch.tensor(p.ids), case.cached, plan.ctx, plan.policy)
    assert out.final_positions.tolist() == [len(p) - 1]
    assert out.recomputed_per_layer == [1] * engine.runner.n_layers
    assert out.layer_sets == [], "per-layer sets are recorded only when asked for"
    assert out.guard_tokens == 0, "a policy without the quality guard raises nothing"
    assert torch.isfinite(out.logits).all()


@torch.inference_mode()
def test_fuse_deviation_defaults_to_keys_and_names_each_layer(llama, monkeypatch):
    case = make_case(llama, seed=5, lengths=[20, 20])
    ids = torch.tensor(case.prompt.ids)
    plan = _plan(llama, case, "blend", BlendConfig(ratio=0.3, policy="hkvd"))
    explicit = fuse(llama.runner, ids, case.cached, plan.ctx, plan.policy, deviation_on="k",
                    record=True)
    layers: list[int | None] = []
    attend = llama.runner.attend

    def spy(q, k, v, q_pos, layer=None):
        layers.append(layer)
        return attend(q, k, v, q_pos, layer=layer)

    monkeypatch.setattr(llama.runner, "attend", spy)
    default = fuse(llama.runner, ids, case.cached, plan.ctx, plan.policy, record=True)
    assert [s.tolist() for s in default.layer_sets] == [s.tolist() for s in explicit.layer_sets]
    assert torch.equal(default.logits, explicit.logits)
    # Each layer's attention is told its layer (runners over an engine's own cache need it).
    assert layers == list(range(llama.runner.n_layers))


@torch.inference_mode()
def test_fuse_runs_the_last_layer_for_the_last_position_only(llama, monkeypatch):
    """After the last layer only the last position's hidden state is read (the logits): that
    layer attends and runs its MLP for one row, the other computed rows' K/V still written.
    ``logits=False`` (vLLM, which computes the last position itself) skips that layer's
    attention and MLP and leaves the same K/V."""
    case = make_case(llama, seed=5, lengths=[20, 20])
    ids = torch.tensor(case.prompt.ids)
    plan = _plan(llama, case, "blend", BlendConfig(ratio=0.3, policy="hkvd"))
    L, T = llama.runner.n_layers, len(case.prompt)
    rows: list[tuple[int, int]] = []
    attend = llama.runner.attend

    def spy(q, k, v, q_pos, layer=None):
        rows.append((layer, q.shape[1]))
        return attend(q, k, v, q_pos, layer=layer)

    monkeypatch.setattr(llama.runner, "attend", spy)
    out = fuse(llama.runner, ids, case.cached, plan.ctx, plan.policy, record=True)
    assert rows[-1] == (L - 1, 1) and rows[-2][1] == out.recomputed_per_layer[-2] > 1
    assert out.recomputed_per_layer[-1] == out.layer_sets[-1].numel() > 1
    # ratio 1.0: every row's K/V and the logits are full prefill's
    full = _plan(llama, case, "blend", BlendConfig(ratio=1.0))
    every = fuse(llama.runner, ids, case.cached, full.ctx, full.policy)
    assert every.recomputed_per_layer == [T - case.prompt.prefix_len] * L  # after the prefix
    for ours, theirs in zip(every.k + every.v, case.full.k + case.full.v, strict=True):
        assert max_diff(ours, theirs) < TOL
    assert max_diff(every.logits, case.full.logits) < TOL
    rows.clear()
    bare = fuse(llama.runner, ids, case.cached, plan.ctx, plan.policy, logits=False)
    assert bare.logits is None and [layer for layer, _ in rows] == list(range(L - 1))
    assert all(torch.equal(a, b) for a, b in zip(bare.k + bare.v, out.k + out.v, strict=True))


@torch.inference_mode()
def test_fuse_reports_per_layer_timings_and_reuses_a_workspace(llama):
    """The loading controller (``ratio="auto"``) reads one placement and one compute time per
    layer; with a workspace the result's K/V are views into its buffers, reused by the next
    prefill."""
    case = make_case(llama, seed=6, lengths=[20, 20])
    ids = torch.tensor(case.prompt.ids)
    plan = _plan(llama, case, "blend", BlendConfig(ratio=0.3, policy="hkvd"))
    L = llama.runner.n_layers
    ws = Workspace()
    first = fuse(llama.runner, ids, case.cached, plan.ctx, plan.policy, workspace=ws)
    assert len(first.place_s) == len(first.layer_s) == L
    assert min(first.place_s) >= 0 and min(first.layer_s) > 0
    logits = first.logits.clone()

    def storage(t: torch.Tensor) -> int:
        return t.untyped_storage().data_ptr()

    again = fuse(llama.runner, ids, case.cached, plan.ctx, plan.policy, workspace=ws)
    for a, b in zip(first.k + first.v, again.k + again.v, strict=True):
        assert storage(a) == storage(b), "the same workspace buffers"
    fresh = fuse(llama.runner, ids, case.cached, plan.ctx, plan.policy)
    assert storage(fresh.k[0]) != storage(again.k[0])
    assert torch.equal(fresh.logits, logits) and torch.equal(again.logits, logits)


# ---- compute_span --------------------------------------------------------------------------

def test_span_after_a_one_token_past_equals_one_pass(llama):
    g = torch.Generator().manual_seed(11)
    first, rest = _ids(g, 1), _ids(g, 12)
    whole = llama.precompute(first + rest)
    after = llama.precompute(rest, past=llama.precompute(first))
    assert after.n_tokens == 12
    assert max_diff(after.k, whole.k[:, :, 1:]) < TOL
    assert max_diff(after.v, whole.v[:, :, 1:]) < TOL


def test_span_kv_is_in_the_models_dtype_whatever_the_pasts():
    engine = _bf16_engine()
    g = torch.Generator().manual_seed(12)
    prefix, chunk = _ids(g, 5), _ids(g, 10)
    past = engine.precompute(prefix)
    assert past.k.dtype == past.v.dtype == torch.bfloat16
    want = engine.precompute(chunk, past=past)
    assert want.k.dtype == want.v.dtype == torch.bfloat16
    # The past as a float16 or float32 cache entry hands it back.
    for dtype in (torch.float16, torch.float32):
        stored = ChunkKV(past.k.to(dtype), past.v.to(dtype))
        got = engine.precompute(chunk, past=stored)
        assert got.k.dtype == got.v.dtype == torch.bfloat16, dtype
        assert max_diff(got.k, want.k) == 0 and max_diff(got.v, want.v) == 0, dtype


def _bf16_engine() -> HFEngine:
    return HFEngine(make_model("llama").to(torch.bfloat16), _Tok())
