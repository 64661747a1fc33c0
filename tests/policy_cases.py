"""Hand-built selection contexts for the policy rule tests (no model involved)."""

from __future__ import annotations

import torch

from ragkv.engine.policies import SelectionContext, SelectionPolicy


def make_ctx(ratio: float, spans=((5, 105),), n_tokens: int = 110, exact_until: int = 5,
             suffix_start: int | None = None) -> SelectionContext:
    """Prefix [0, exact_until), the chunk spans, everything else uncached (forced)."""
    forced = torch.ones(n_tokens, dtype=torch.bool)
    forced[:exact_until] = False
    for s, e in spans:
        forced[s:e] = False
    return SelectionContext(n_tokens, exact_until, list(spans), forced, ratio, suffix_start)


def kept_chunk_tokens(policy: SelectionPolicy, ctx: SelectionContext, layer: int,
                      deviation: torch.Tensor | None = None) -> tuple[int, torch.Tensor]:
    """How many chunk tokens ``policy`` keeps at ``layer``, and every kept position."""
    active = ctx.all_uncached_and_chunks()
    if deviation is None:  # distinct deviations, largest on the last chunk tokens
        deviation = torch.arange(active.numel(), dtype=torch.float32)
    keep = policy.select(layer, ctx, active, deviation)
    assert keep.dtype == torch.bool and keep.shape == active.shape
    kept = active[keep]
    assert torch.isin(ctx.forced_positions(), kept).all(), "forced positions are always kept"
    in_chunks = sum(int(((kept >= s) & (kept < e)).sum()) for s, e in ctx.chunk_spans)
    return in_chunks, kept
