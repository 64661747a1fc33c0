"""The prefill planner: what a fused prefill loads, what is exact, and what it computes.

Every engine plans a ``prefix``/``reuse``/``blend`` prefill here (the transformers engine in
process, the vLLM connector's worker in vLLM's process), so the rules live in one place:

* the template prefix is a true prefix: its cached KV is exact and never recomputed;
* with prefix-context precompute, the first chunk was computed after that same prefix at the
  same positions, so it is exact too;
* positions no cached span covers (separators, the question suffix) are computed from layer 0;
* the mode picks the policy: ``prefix`` computes everything past the exact part, ``reuse``
  nothing more, ``blend`` what the configured selection policy keeps.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ragkv.config import BlendConfig
from ragkv.engine.correction import Correction, make_correction
from ragkv.engine.kv import ChunkKV
from ragkv.engine.policies import ComputeAll, SelectionContext, SelectionPolicy, make_policy
from ragkv.keys import position_context

FUSED_MODES = ("prefix", "reuse", "blend")


def _exact_first(context: str) -> bool:
    """Whether the first chunk is read from an entry prefilled after the template prefix
    alone (``keys.position_context``): exact where it stands."""
    return position_context(context, 0) == "prefix"


def chunks_to_load(mode: str, context: str, n_chunks: int) -> range:
    """Indices of the chunks whose cached KV a prefill uses.

    ``prefix`` mode reuses only an exact leading chunk, which only a prefix-context entry
    gives (``prefix`` and ``anchor`` precompute; a cold-computed chunk never is the prompt's
    exact prefix).
    """
    if mode == "full":
        return range(0)
    if mode == "prefix":
        return range(1 if _exact_first(context) and n_chunks else 0)
    if mode in ("reuse", "blend"):
        return range(n_chunks)
    raise ValueError(f"unknown mode {mode!r}; choose full, prefix, reuse or blend")


def exact_end(prefix_len: int, chunk_spans: Sequence[tuple[int, int]], context: str,
              loaded: Sequence[int]) -> int:
    """First position whose KV is not exact: past the template prefix, and past the first
    chunk too when its entry was precomputed after the same prefix and is loaded (``loaded``: the
    indices of chunks whose cached KV is used)."""
    if (_exact_first(context) and 0 in loaded and chunk_spans
            and chunk_spans[0][0] == prefix_len):
        return chunk_spans[0][1]
    return prefix_len


@dataclass
class PrefillPlan:
    """What :func:`ragkv.engine.blend.fuse` needs: the selection context, the policy and the
    correction of the KV kept from the cache."""

    ctx: SelectionContext
    policy: SelectionPolicy
    correction: Correction

    @property
    def exact_until(self) -> int:
        return self.ctx.exact_until


def scores_of(cached: Sequence[tuple[int, ChunkKV]]) -> dict[int, torch.Tensor]:
    """Span start -> context score, for the placed spans whose entry holds one."""
    return {s: kv.score for s, kv in cached if kv.score is not None}


def plan_prefill(n_tokens: int, chunk_spans: Sequence[tuple[int, int]], suffix_start: int,
                 cached: Sequence[tuple[int, int]], exact_until: int, mode: str,
                 blend: BlendConfig, n_layers: int,
                 scores: dict[int, torch.Tensor] | None = None) -> PrefillPlan:
    """Plan a fused prefill of ``n_tokens`` positions.

    cached: ``(start, n_tokens)`` of every span whose KV is placed (prefix and chunks).
    exact_until: positions before it hold exact KV (see :func:`exact_end`).
    scores: the placed chunks' context scores by span start (:func:`scores_of`).
    """
    if mode not in FUSED_MODES:
        raise ValueError(f"unknown mode {mode!r}; a fused prefill is one of "
                         f"{', '.join(FUSED_MODES)}")
    forced = torch.ones(n_tokens, dtype=torch.bool)
    for start, n in cached:
        forced[start:start + n] = False
    forced[:exact_until] = False
    spans = [(s, e) for s, e in chunk_spans if s >= exact_until]
    ratio = float(blend.ratio) if mode == "blend" else 0.0
    starts = {s for s, _ in spans}
    ctx = SelectionContext(n_tokens, exact_until, spans, forced, ratio, suffix_start,
                           {s: sc for s, sc in (scores or {}).items() if s in starts})
    policy: SelectionPolicy
    correction = Correction()
    if mode == "prefix":
        policy = ComputeAll()
    elif mode == "reuse":
        policy = SelectionPolicy()
    else:
        policy = make_policy(blend, n_layers)
        correction = make_correction(blend)
    return PrefillPlan(ctx, policy, correction)
