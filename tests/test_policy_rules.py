"""The rules ``ragkv.engine.policies`` decides at their edges: where the guard judges, what it
may never lower, what a per-prompt budget may spare, what the gradual policy takes from the
config and which models the default check layer fits. Written for the mutants that survived
them."""

from __future__ import annotations

import pytest
import torch
from policy_cases import kept_chunk_tokens, make_ctx

from ragkv.config import BlendConfig
from ragkv.engine.policies import HKVD, make_policy


def test_the_guard_judges_the_last_check_layer_only():
    """Uniform deviation needs nearly every token for 99% of its mass: only the last check
    layer's budget may be raised for it."""
    ctx = make_ctx(0.1)
    policy = HKVD(layers=(1, 2), coverage=0.99, max_ratio=1.0)
    uniform = torch.ones(ctx.all_uncached_and_chunks().numel())
    first, _ = kept_chunk_tokens(policy, ctx, 1, uniform)
    assert first == ctx.budget(policy.ratio_at(1, 0.1)) == 20  # twice the ratio, no more
    last, _ = kept_chunk_tokens(policy, ctx, 2, uniform)
    assert last == 99


def test_a_guard_without_a_floor_never_lowers_the_budget():
    ctx = make_ctx(0.2)
    active = ctx.all_uncached_and_chunks()
    one = torch.zeros(active.numel())
    one[50] = 1.0  # all the mass on one token: the guard needs one
    policy = HKVD(layers=(1,), coverage=0.9)
    for reserved in (0, 5, 30):
        assert policy.guarded(ctx, active, one, ctx.forced_positions(), 20, reserved) == 20
        assert policy.raised == 0


def test_a_per_prompt_budget_spares_every_token_when_nothing_deviates():
    ctx = make_ctx(0.2)
    active = ctx.all_uncached_and_chunks()
    policy = HKVD(layers=(1,), coverage=0.9, floor_ratio=0.0)
    kept = policy.guarded(ctx, active, torch.zeros(active.numel()), ctx.forced_positions(), 20)
    assert kept == 0 and policy.raised == -20


def test_the_gradual_policy_takes_its_start_factor_from_the_config():
    policy = make_policy(BlendConfig(policy="gradual", start_factor=3.0), 30)
    assert policy.start_factor == 3.0 and policy.check_layers == (2, 3, 4, 5)
    assert policy.ratio_at(2, 0.1) == pytest.approx(0.3)


def test_the_default_check_layer_fits_a_shallow_model_but_not_a_single_layer():
    assert make_policy(BlendConfig(), 2).check_layers == (1,)
    with pytest.raises(ValueError, match="check layer 2 does not exist"):
        make_policy(BlendConfig(), 1)


def test_with_chunk_heads_too_the_guard_judges_the_last_check_layer_only():
    ctx = make_ctx(0.1, spans=((5, 55), (55, 105)))
    policy = make_policy(BlendConfig(policy="hkvd+head", check_layers=(1, 2), coverage=0.99,
                                     max_ratio=1.0, head_tokens=2), 4)
    uniform = torch.ones(ctx.all_uncached_and_chunks().numel())
    first, _ = kept_chunk_tokens(policy, ctx, 1, uniform)
    assert first == ctx.budget(policy.ratio_at(1, 0.1)) == 20  # the heads within the budget
    last, _ = kept_chunk_tokens(policy, ctx, 2, uniform)
    assert last > 20
