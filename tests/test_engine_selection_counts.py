"""How many tokens the selection policies recompute, layer by layer: counts and budgets per
policy and ratio, sets that only shrink, gradual's narrowing, reuse and a missing chunk's
forced positions (tiny model matrix from ``engine_cases``)."""

from __future__ import annotations

import math

import pytest
import torch
from engine_cases import (  # noqa: F401 - fixtures are used by name
    RATIOS,
    _one_thread,
    blend,
    case,
    engine,
)

from ragkv.config import POLICIES, BlendConfig

# ---- selection invariants ------------------------------------------------------------------

@pytest.mark.parametrize("ratio", RATIOS)
@pytest.mark.parametrize("policy", POLICIES)
def test_selection_invariants(engine, case, policy, ratio):
    p = case.prompt
    cfg = BlendConfig(ratio=ratio, policy=policy)
    out = blend(engine, case, cfg, record=True)
    L = engine.runner.n_layers
    counts = out.recomputed_per_layer
    assert len(counts) == L == len(out.layer_sets)
    assert torch.isfinite(out.logits).all()
    for layer in range(L):
        assert len(out.layer_sets[layer]) == counts[layer]
    first_check = cfg.check_layers[0]
    after = counts[first_check:]
    assert all(x >= y for x, y in zip(after, after[1:], strict=False)), counts
    # The exact prefix is never recomputed; sets only ever shrink (a dropped token never
    # comes back) and the last set is what final_positions reports.
    for layer, sel in enumerate(out.layer_sets):
        assert int(sel.min()) >= p.prefix_len
        assert torch.equal(sel, torch.unique(sel))
        if layer:
            assert torch.isin(sel, out.layer_sets[layer - 1]).all()
    final = out.final_positions
    assert torch.equal(final, out.layer_sets[-1])
    uncached = torch.tensor(p.uncached_positions())
    assert torch.isin(uncached, final).all(), "separators and suffix must always be computed"
    assert int(final[-1]) == len(p) - 1
    in_chunks = sum(int(((final >= s) & (final < e)).sum()) for s, e in p.chunk_spans)
    n_chunk = p.chunk_tokens
    assert len(final) == in_chunks + len(uncached)
    if policy == "chunk_head":
        expected = sum(math.ceil(ratio * (e - s)) for s, e in p.chunk_spans)
        heads = torch.cat([torch.arange(s, s + math.ceil(ratio * (e - s)))
                           for s, e in p.chunk_spans])
        assert torch.isin(heads, final).all()
        assert counts == [len(final)] * L  # no check layer: same set at every layer
    elif policy == "hkvd+head":
        n_heads = sum(min(cfg.head_tokens, e - s) for s, e in p.chunk_spans)
        expected = max(round(ratio * n_chunk), n_heads)
        heads = torch.cat([torch.arange(s, min(e, s + cfg.head_tokens))
                           for s, e in p.chunk_spans])
        assert torch.isin(heads, final).all()
    else:
        expected = round(ratio * n_chunk)
    assert in_chunks == expected, (counts, n_chunk)
    if policy in ("hkvd", "hkvd+head", "gradual"):
        # Every layer before the first check layer computes every non-prefix token.
        for layer in range(first_check):
            assert counts[layer] == len(p) - p.prefix_len


# ---- per-layer counts of the other policies and modes --------------------------------------

def test_gradual_narrows_over_its_check_layers(engine, case):
    p = case.prompt
    out = blend(engine, case, BlendConfig(ratio=0.15, policy="gradual", check_layers=(1,)))
    counts = out.recomputed_per_layer
    n_unc = len(p.uncached_positions())
    # 4 layers: check layers 1, 2, 3; start at 2x ratio and end at the ratio.
    assert counts[0] == len(p) - p.prefix_len
    assert counts[1] == round(0.3 * p.chunk_tokens) + n_unc
    assert counts[3] == round(0.15 * p.chunk_tokens) + n_unc
    assert counts[1] >= counts[2] >= counts[3]


def test_reuse_recomputes_exactly_uncached_positions(engine, case):
    p = case.prompt
    out = blend(engine, case, BlendConfig(), mode="reuse", record=True)
    assert out.final_positions.tolist() == p.uncached_positions()
    for sel in out.layer_sets:
        assert sel.tolist() == p.uncached_positions()
    assert out.recomputed_per_layer == [len(p.uncached_positions())] * engine.runner.n_layers
    # Cached chunk values are used untouched at every layer.
    for layer in range(engine.runner.n_layers):
        for s, kv in case.cached[1:]:
            assert torch.equal(out.v[layer][:, s:s + kv.n_tokens], kv.v[layer])


def test_uncached_chunk_is_forced(engine, case):
    """A chunk whose KV is missing from ``cached`` is computed from layer 0 in every mode."""
    p = case.prompt
    partial = case.cached[:-1]
    s, e = p.chunk_spans[-1]
    for mode, cfg in (("reuse", BlendConfig()), ("blend", BlendConfig(ratio=0.05))):
        out = engine.prefill(p, partial, mode, cfg, p.prefix_len)
        assert torch.isin(torch.arange(s, e), out.final_positions).all()
