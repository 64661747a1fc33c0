"""The per-prompt budget (``BlendConfig.floor_ratio`` with ``coverage``): a prompt whose check
layer's deviation mass sits on few tokens recomputes fewer than ``ratio``, one whose mass is
spread recomputes more, always within ``[floor_ratio, max_ratio]``; the rest of the guard's
rules (test_fusion_rules) hold unchanged without a floor."""

from __future__ import annotations

import pytest
import torch
from engine_cases import (  # noqa: F401 - fixtures are used by name
    _case,
    _engine,
    _one_thread,
    blend,
    case,
    engine,
)
from policy_cases import kept_chunk_tokens, make_ctx

from ragkv.config import BlendConfig
from ragkv.engine.policies import make_policy
from ragkv.engine.vllm.params import FusionParams, Span, fusion_salt


def _concentrated(ctx) -> torch.Tensor:
    """Deviation over the active positions: 5 chunk tokens (20..24) hold almost all the mass."""
    active = ctx.all_uncached_and_chunks()
    d = torch.full((active.numel(),), 0.01)
    d[torch.isin(active, torch.arange(20, 25))] = 100.0
    return d


@pytest.mark.parametrize("policy", ["hkvd", "qhkvd"])
@pytest.mark.parametrize(("floor", "want"), [(0.0, 5), (0.05, 5), (0.1, 10), (0.5, 15)])
def test_concentrated_mass_spares_tokens_down_to_the_floor(policy, floor, want):
    ctx = make_ctx(0.15)  # 100 chunk tokens: the ratio's budget is 15
    p = make_policy(BlendConfig(ratio=0.15, policy=policy, coverage=0.9, floor_ratio=floor), 4)
    n, kept = kept_chunk_tokens(p, ctx, 1, _concentrated(ctx))
    assert n == want, "what covers 90% of the mass (5 tokens), never below the floor nor " \
                      "above the ratio's budget"
    assert p.raised == want - 15
    assert torch.isin(torch.arange(20, 25), kept).all(), "the heavy tokens are the ones kept"


def test_without_a_floor_the_guard_never_spares():
    ctx = make_ctx(0.15)
    p = make_policy(BlendConfig(ratio=0.15, policy="hkvd", coverage=0.9), 4)
    assert kept_chunk_tokens(p, ctx, 1, _concentrated(ctx))[0] == 15 and p.raised == 0


def test_spread_mass_still_raises_up_to_max_ratio():
    ctx = make_ctx(0.15)
    p = make_policy(BlendConfig(ratio=0.15, policy="hkvd", coverage=0.9, floor_ratio=0.05,
                                max_ratio=0.3), 4)
    flat = torch.ones(ctx.all_uncached_and_chunks().numel())
    assert kept_chunk_tokens(p, ctx, 1, flat)[0] == 30 and p.raised == 15


def test_heads_count_against_the_floor():
    ctx = make_ctx(0.15, spans=((5, 55), (55, 105)))
    p = make_policy(BlendConfig(ratio=0.15, policy="hkvd+head", head_tokens=3, coverage=0.9,
                                floor_ratio=0.1), 4)
    n, kept = kept_chunk_tokens(p, ctx, 1, _concentrated(ctx))
    # 6 heads are kept anyway; the floor (10 tokens) counts them, so 4 more at least, and the
    # 5 heavy tokens are what the mass asks for
    assert n == 6 + 5 and p.raised == 5 - 9
    assert torch.isin(torch.tensor([5, 6, 7, 55, 56, 57, 20, 21, 22, 23, 24]), kept).all()


@pytest.mark.parametrize("policy", ["hkvd", "qhkvd"])
def test_a_spared_budget_recomputes_fewer_tokens_and_says_so(engine, case, policy):
    plain = blend(engine, case, BlendConfig(ratio=0.2, policy=policy))
    # a tiny coverage target asks for one token: the floor decides
    lean = blend(engine, case, BlendConfig(ratio=0.2, policy=policy, coverage=1e-3,
                                           floor_ratio=0.05))
    n_chunk = case.prompt.chunk_tokens
    assert lean.guard_tokens < 0
    assert lean.recomputed_per_layer[-1] == plain.recomputed_per_layer[-1] + lean.guard_tokens
    assert -lean.guard_tokens == round(0.2 * n_chunk) - round(0.05 * n_chunk)
    assert torch.isin(lean.final_positions, plain.final_positions).all(), \
        "the spared tokens are the least deviating of the plain selection"


def test_floor_ratio_is_checked_and_salted():
    for bad in (-0.1, 1.5, True, "0.1"):
        with pytest.raises(ValueError):
            BlendConfig(floor_ratio=bad)  # type: ignore[arg-type]

    def salt(**blend) -> str:
        params = FusionParams("blend", 2, (Span(2, 10, "a" * 64),), 10, "cold",
                              BlendConfig(policy="hkvd", coverage=0.9, **blend))
        return fusion_salt(params, list(range(12)))

    assert len({salt(), salt(floor_ratio=0.05), salt(floor_ratio=0.1)}) == 3
