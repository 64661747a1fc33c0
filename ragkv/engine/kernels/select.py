"""Deviation and selection: which tokens the blend keeps recomputing.

``deviation`` sums the squared difference between fresh and cached pre-RoPE K (or V) rows over
heads and head_dim, reading the cached rows in place through an index (no gathered copy).
``keep_top`` selects the ``k`` largest deviations outside the forced set in one program: a
bitwise search for the k-th largest fp32 value (non-negative floats order like their bit
patterns), then a pass that takes every larger value and the lowest-indexed ties, so the
selection is deterministic and equals the reference's stable sort.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _deviation_kernel(KN, KB, IDX, OUT, n, H, snh, snn, sbh, sbt,
                      HD: tl.constexpr, BD: tl.constexpr, BN: tl.constexpr,
                      ACCUM: tl.constexpr):
    offs_n = tl.program_id(0) * BN + tl.arange(0, BN)
    mask_n = offs_n < n
    rows = tl.load(IDX + offs_n, mask=mask_n, other=0).to(tl.int64)
    offs_d = tl.arange(0, BD)
    m2 = mask_n[:, None] & (offs_d < HD)[None, :]
    acc = tl.zeros([BN], dtype=tl.float32)
    for h in range(H):
        a = tl.load(KN + h * snh + offs_n[:, None].to(tl.int64) * snn + offs_d[None, :],
                    mask=m2, other=0.0).to(tl.float32)
        b = tl.load(KB + h * sbh + rows[:, None] * sbt + offs_d[None, :],
                    mask=m2, other=0.0).to(tl.float32)
        diff = a - b
        acc += tl.sum(diff * diff, axis=1)
    if ACCUM:
        acc += tl.load(OUT + offs_n, mask=mask_n, other=0.0)
    tl.store(OUT + offs_n, acc, mask=mask_n)


@triton.jit
def _block(DEV, MUST, offs, n):
    """Sort keys of one block (non-negative fp32 bits; NaN largest, as in torch.sort), which
    positions exist, and which are candidates (not forced)."""
    valid = offs < n
    d = tl.load(DEV + offs, mask=valid, other=0.0)
    key = tl.maximum(tl.where(d != d, 0x7F800000, d.to(tl.int32, bitcast=True)), 0)
    must = tl.load(MUST + offs, mask=valid, other=1) != 0
    return key, valid, must, valid & (must == 0)


@triton.jit
def _keep_top_kernel(DEV, MUST, KEEP, n, k, BLOCK: tl.constexpr):
    prefix = tl.zeros([], dtype=tl.int32)
    for b in tl.static_range(30, -1, -1):
        cand = prefix | (1 << b)
        cnt = tl.zeros([], dtype=tl.int32)
        for start in range(0, n, BLOCK):
            key, valid, must, free = _block(DEV, MUST, start + tl.arange(0, BLOCK), n)
            cnt += tl.sum((free & (key >= cand)).to(tl.int32), axis=0)
        prefix = tl.where(cnt >= k, cand, prefix)
    # prefix is now the k-th largest key: take everything above it, then ties by index.
    above = tl.zeros([], dtype=tl.int32)
    for start in range(0, n, BLOCK):
        key, valid, must, free = _block(DEV, MUST, start + tl.arange(0, BLOCK), n)
        above += tl.sum((free & (key > prefix)).to(tl.int32), axis=0)
    need = k - above
    taken = tl.zeros([], dtype=tl.int32)
    for start in range(0, n, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        key, valid, must, free = _block(DEV, MUST, offs, n)
        tie = free & (key == prefix)
        rank = tl.cumsum(tie.to(tl.int32), axis=0) + taken
        keep = must | (free & (key > prefix)) | (tie & (rank <= need))
        tl.store(KEEP + offs, keep.to(tl.int8), mask=valid)
        taken += tl.sum(tie.to(tl.int32), axis=0)


def deviation(k_new: torch.Tensor, k_buf: torch.Tensor, index: torch.Tensor,
              out: torch.Tensor | None = None) -> torch.Tensor:
    """fp32 ``[n]``: sum over heads and head_dim of ``(k_new - k_buf[:, index])**2``;
    ``k_new [H, n, D]``, ``k_buf [H, T, D]``; added into ``out`` when given."""
    H, n, D = k_new.shape
    if k_new.stride(-1) != 1:
        k_new = k_new.contiguous()
    if k_buf.stride(-1) != 1:
        k_buf = k_buf.contiguous()
    accum = out is not None
    res = out if accum else torch.empty(n, device=k_new.device, dtype=torch.float32)
    BN = 32
    _deviation_kernel[(triton.cdiv(n, BN),)](
        k_new, k_buf, index.contiguous(), res, n, H, k_new.stride(0), k_new.stride(1),
        k_buf.stride(0), k_buf.stride(1), HD=D, BD=triton.next_power_of_2(D), BN=BN,
        ACCUM=accum)
    return res


def keep_top(deviation: torch.Tensor, must: torch.Tensor, budget: int) -> torch.Tensor:
    """Bool ``[n]``: ``must`` plus the ``budget`` largest deviations (fp32 ``[n]``, >= 0)
    among the rest, ties to the lower index."""
    n = deviation.shape[0]
    free = n - int(must.sum())
    k = max(0, min(budget, free))
    keep = torch.empty(n, device=deviation.device, dtype=torch.int8)
    if n:
        _keep_top_kernel[(1,)](deviation.float().contiguous(), must.to(torch.int8).contiguous(),
                               keep, n, k, BLOCK=1024)
    return keep.bool()
