"""Selected-query attention on the CPU at close to the per-element speed of causal prefill.

The blend's queries sit at scattered, sorted positions and each may see the keys at positions
``<= its own`` only. One masked call over all keys wastes work past each block's queries and
pays for the mask on every score, so here the keys are split instead. For a block of
consecutive queries at positions ``a..b``, every query sees keys ``[0, a)`` whole: those go
through torch's CPU flash-attention kernel with *no* mask, which also returns each row's
log-sum-exp. What is left, the diagonal ``[a, b]``, is split again with smaller blocks
(``blocks``, largest first: big blocks keep the unmasked calls efficient, small ones keep
the masked rest small), and only the last level's diagonals are masked (the same kernel with
an additive mask over exactly their keys). The partial softmaxes merge exactly by their
log-sum-exps.

Grouped-query attention is native: in the unmasked calls the ``Hq / Hkv`` query heads that
share a key head are folded into the rows of one head (no key copy, longer rows).

The block sizes and :data:`MIN_KEYS` were chosen by measurement at 1k-8k keys with 15%
scattered queries plus a question tail, SmolLM2's shape (9 q heads, 3 kv heads, head_dim 64),
fp32: ``python benchmarks/split_attention_bench.py``.
"""

from __future__ import annotations

import torch

# Queries per block at each level, largest first; each a multiple of the next.
BLOCKS: tuple[int, ...] = (256, 32)
# Below this many keys the masked-SDPA reference was as fast for the blend's scattered
# queries (its few large calls beat the split's many small ones); from here on the split
# kernel wins, by more the longer the prompt. A short contiguous tail (``reuse``: only the
# question) goes to the split kernel at any length: the reference would pad it to a full
# causal prefill.
MIN_KEYS = 2560

_flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu


class _Acc:
    """Running output ``[Hq, n, D]`` and log-sum-exp ``[Hq, n, 1]`` of each query (fp32)."""

    def __init__(self, hq: int, n: int, d: int, device: torch.device) -> None:
        self.out = torch.zeros(hq, n, d, device=device)
        self.lse = torch.full((hq, n, 1), float("-inf"), device=device)
        self.fresh = [True] * n  # nothing merged into the row yet: a plain copy

    def merge(self, i0: int, i1: int, out: torch.Tensor, lse: torch.Tensor) -> None:
        """Merge a partial softmax (``out [Hq, m, D]``, ``lse [Hq, m, 1]``) into rows
        ``i0:i1`` (the general formula also holds for fresh rows: lse -inf, out 0)."""
        fresh = all(self.fresh[i0:i1])
        self.fresh[i0:i1] = [False] * (i1 - i0)
        if fresh:
            self.out[:, i0:i1], self.lse[:, i0:i1] = out, lse
            return
        o, l_ = self.out[:, i0:i1], self.lse[:, i0:i1]
        new = torch.logaddexp(l_, lse)
        o.mul_(torch.exp(l_ - new)).add_(out * torch.exp(lse - new))
        l_.copy_(new)


def _unmasked(acc: _Acc, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, i0: int, i1: int,
              lo: int, hi: int, scale: float) -> None:
    """Queries ``i0:i1`` over keys ``[lo, hi)``, all visible to all of them: flash attention,
    the query heads of each key head folded into its rows."""
    hq, _, d = q.shape
    hkv, m = k.shape[0], i1 - i0
    qf = q[:, i0:i1].reshape(1, hkv, (hq // hkv) * m, d)
    out, lse = _flash(qf, k[None, :, lo:hi], v[None, :, lo:hi], scale=scale)
    acc.merge(i0, i1, out.reshape(hq, m, d).float(), lse.reshape(hq, m, 1).float())


def _diagonal(acc: _Acc, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
              q_pos: torch.Tensor, i0: int, i1: int, a: int, b: int, scale: float) -> None:
    """Queries ``i0:i1`` (positions ``a..b``) over their diagonal keys ``[a, b]`` with the
    exact mask: an additive one, into the same flash kernel, shared by every head."""
    hidden = torch.arange(a, b + 1, device=q.device)[None, :] > q_pos[i0:i1, None]
    mask = torch.zeros(1, 1, i1 - i0, b + 1 - a, dtype=q.dtype, device=q.device)
    mask[0, 0].masked_fill_(hidden, float("-inf"))
    out, lse = _flash(q[None, :, i0:i1], k[None, :, a:b + 1], v[None, :, a:b + 1],
                      attn_mask=mask, scale=scale)
    acc.merge(i0, i1, out[0].float(), lse[0, :, :, None].float())


def _cover(acc: _Acc, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_pos: torch.Tensor,
           pos: list[int], blocks: tuple[int, ...], scale: float, i0: int, i1: int, lo: int,
           level: int) -> None:
    """Queries ``i0:i1`` have seen keys ``[0, lo)`` already; give them ``[lo, their
    position]``: unmasked up to each block's first position, then the next level's blocks
    (or, at the last level, the masked diagonal).

    A module function, not a closure: a nested function that calls itself is a reference
    cycle holding ``k`` and ``v``, views of a pooled workspace, until the garbage collector
    runs, and the pool lends only a workspace nothing references."""
    size = blocks[level]
    for j0 in range(i0, i1, size):
        j1 = min(j0 + size, i1)
        a = pos[j0]
        if a > lo:
            _unmasked(acc, q, k, v, j0, j1, lo, a, scale)
        if level + 1 < len(blocks):
            _cover(acc, q, k, v, q_pos, pos, blocks, scale, j0, j1, a, level + 1)
        else:
            _diagonal(acc, q, k, v, q_pos, j0, j1, a, pos[j1 - 1], scale)


def split_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_pos: torch.Tensor,
                    scale: float, blocks: tuple[int, ...] = BLOCKS) -> torch.Tensor:
    """Attention of ``q [Hq, n, D]`` at strictly increasing positions ``q_pos [n]`` over
    ``k, v [Hkv, T, D]`` (key j at position j), query i seeing keys ``<= q_pos[i]`` only.
    Returns ``[n, Hq, D]`` in ``q``'s dtype; exact up to the rounding of the merges."""
    hq, n, d = q.shape
    if hq % k.shape[0]:
        raise ValueError(f"{hq} query heads do not group over {k.shape[0]} key heads")
    if any(big % small for big, small in zip(blocks, blocks[1:], strict=False)):
        raise ValueError(f"block sizes {blocks} must each divide the one before")
    if n == 0:
        return q.new_empty(0, hq, d)
    acc = _Acc(hq, n, d, q.device)
    _cover(acc, q, k, v, q_pos, q_pos.tolist(), blocks, scale, 0, n, 0, 0)
    return acc.out.transpose(0, 1).to(q.dtype)
