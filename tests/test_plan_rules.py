"""The prefill planner's rules (ragkv/engine/plan.py): which chunks a mode loads, where the
exact prefix ends, and what a plan forces, offers the policy and picks as policy.

One prompt layout throughout: template prefix [0, 5), chunk 0 [5, 9), separator 9, chunk 1
[10, 14), question suffix [14, 20).
"""

from __future__ import annotations

import pytest
import torch

from ragkv.config import BlendConfig
from ragkv.engine.plan import chunks_to_load, exact_end, plan_prefill
from ragkv.engine.policies import HKVD, ComputeAll, QueryAwareHKVD, SelectionPolicy

T, PREFIX, SPANS, SUFFIX = 20, 5, [(5, 9), (10, 14)], 14
ALL_CACHED = [(0, 5), (5, 4), (10, 4)]  # (start, n_tokens): the prefix and both chunks


def _positions(mask: torch.Tensor) -> list[int]:
    return mask.nonzero().flatten().tolist()


# ---- chunks_to_load ------------------------------------------------------------------------

def test_full_mode_loads_nothing():
    for context in ("cold", "prefix"):
        assert list(chunks_to_load("full", context, 3)) == []


def test_prefix_mode_loads_only_a_first_chunk_computed_after_the_prefix():
    assert list(chunks_to_load("prefix", "prefix", 3)) == [0]
    assert list(chunks_to_load("prefix", "prefix", 1)) == [0]
    assert list(chunks_to_load("prefix", "prefix", 0)) == []
    assert list(chunks_to_load("prefix", "cold", 3)) == []  # a cold chunk is never exact
    # anchor precompute keeps a prefix-context entry for the first position
    assert list(chunks_to_load("prefix", "anchor", 3)) == [0]


def test_reuse_and_blend_load_every_chunk():
    for mode in ("reuse", "blend"):
        for context in ("cold", "prefix", "anchor"):
            assert list(chunks_to_load(mode, context, 3)) == [0, 1, 2]
            assert list(chunks_to_load(mode, context, 0)) == []


def test_unknown_mode_is_refused_by_name():
    with pytest.raises(ValueError, match="unknown mode 'fastest'; choose full, prefix, reuse"):
        chunks_to_load("fastest", "cold", 2)


# ---- exact_end -----------------------------------------------------------------------------

def test_exact_part_ends_after_the_template_prefix():
    assert exact_end(PREFIX, SPANS, "cold", [0, 1]) == PREFIX
    assert exact_end(PREFIX, [], "prefix", []) == PREFIX


def test_a_loaded_first_chunk_precomputed_after_the_prefix_is_exact():
    assert exact_end(PREFIX, SPANS, "prefix", [0, 1]) == 9
    assert exact_end(PREFIX, SPANS, "prefix", range(1)) == 9
    assert exact_end(PREFIX, SPANS, "anchor", [0, 1]) == 9  # its prefix-context entry
    assert exact_end(PREFIX, SPANS, "anchor", [1]) == PREFIX


def test_the_first_chunk_is_not_exact_unless_loaded_right_after_the_prefix():
    assert exact_end(PREFIX, SPANS, "prefix", [1]) == PREFIX  # its KV is not used
    assert exact_end(PREFIX, [(6, 9), (10, 14)], "prefix", [0, 1]) == PREFIX  # a gap before it


# ---- plan_prefill --------------------------------------------------------------------------

def _plan(mode: str, cached=ALL_CACHED, exact_until: int = PREFIX,
          blend: BlendConfig | None = None, n_layers: int = 4):
    return plan_prefill(T, SPANS, SUFFIX, cached, exact_until, mode,
                        blend or BlendConfig(ratio=0.3, policy="hkvd"), n_layers)


def test_uncached_positions_are_forced():
    plan = _plan("reuse")
    assert plan.ctx.forced.dtype == torch.bool and plan.ctx.forced.shape == (T,)
    assert _positions(plan.ctx.forced) == [9, *range(SUFFIX, T)]  # separator and suffix
    assert plan.ctx.n_tokens == T and plan.ctx.suffix_start == SUFFIX
    assert plan.exact_until == PREFIX and plan.ctx.exact_until == PREFIX
    assert plan.ctx.chunk_spans == SPANS and plan.ctx.chunk_tokens == 8


def test_a_chunk_without_cached_kv_is_forced():
    plan = _plan("blend", cached=[(0, 5), (5, 4)])
    assert _positions(plan.ctx.forced) == [9, *range(10, 14), *range(SUFFIX, T)]
    plan = _plan("blend", cached=[(5, 4), (10, 4)], exact_until=0)  # no prefix KV either
    assert _positions(plan.ctx.forced) == [*range(PREFIX), 9, *range(SUFFIX, T)]


def test_the_exact_part_is_never_forced_nor_offered_to_the_policy():
    plan = _plan("blend", cached=[(0, 5), (5, 4)], exact_until=9)
    assert plan.exact_until == 9
    assert int(_positions(plan.ctx.forced)[0]) == 9
    assert plan.ctx.chunk_spans == [(10, 14)], "only chunks past the exact part are selectable"
    plan = _plan("blend", exact_until=0, cached=[])
    assert _positions(plan.ctx.forced) == list(range(T))
    assert plan.ctx.chunk_spans == SPANS


def test_mode_picks_the_policy_and_only_blend_has_a_ratio():
    prefix = _plan("prefix")
    assert type(prefix.policy) is ComputeAll and prefix.ctx.ratio == 0.0
    assert prefix.policy.initial(prefix.ctx).tolist() == list(range(PREFIX, T))
    reuse = _plan("reuse")
    assert type(reuse.policy) is SelectionPolicy and reuse.ctx.ratio == 0.0
    assert reuse.policy.initial(reuse.ctx).tolist() == [9, *range(SUFFIX, T)]
    blend = _plan("blend", blend=BlendConfig(ratio=0.3, policy="hkvd", check_layers=(2,)))
    assert type(blend.policy) is HKVD and blend.ctx.ratio == 0.3
    assert blend.policy.check_layers == (2,)
    qhkvd = _plan("blend", blend=BlendConfig(ratio=0.15, policy="qhkvd"))
    assert type(qhkvd.policy) is QueryAwareHKVD and qhkvd.ctx.ratio == 0.15
    one = _plan("blend", blend=BlendConfig(ratio=1.0, policy="hkvd"))
    assert type(one.policy) is ComputeAll and one.ctx.ratio == 1.0


def test_only_blend_corrects_the_kv_it_keeps():
    for mode in ("prefix", "reuse"):
        assert _plan(mode, blend=BlendConfig(correction="chunk_mean")).correction.name == "none"
    blend = _plan("blend", blend=BlendConfig(ratio=0.3, correction="chunk_mean",
                                             correction_strength=0.5)).correction
    assert blend.name == "chunk_mean" and blend.strength == 0.5
    assert _plan("blend", blend=BlendConfig(correction="none")).correction.name == "none"


def test_full_and_unknown_modes_are_not_fused_prefills():
    for mode in ("full", "fastest"):
        with pytest.raises(ValueError, match=f"unknown mode '{mode}'; a fused prefill is one "
                                             "of prefix, reuse, blend"):
            _plan(mode)


def test_check_layer_must_exist_in_the_model():
    with pytest.raises(ValueError, match="check layer 4 does not exist"):
        _plan("blend", blend=BlendConfig(ratio=0.3, policy="hkvd", check_layers=(4,)))
