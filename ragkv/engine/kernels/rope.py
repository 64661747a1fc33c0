"""Fused RoPE re-encoding: every layer's and head's cached keys rotated in one launch.

Rows of ``x [R, N, D]`` (R = layers x kv heads) are rotated to ``positions [N]`` with the
model's own cos/sin tables, so scaled RoPE variants (llama3, YaRN, linear) stay exact: the
kernel only gathers table rows, it never derives frequencies. Arithmetic is fp32 whatever the
storage dtype; each program reuses its table rows for ``ROWS`` rows of x.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ragkv.engine.kernels import interpreting, tuned

_CONFIGS = [triton.Config({"BN": bn, "ROWS": rows}, num_warps=w)
            for bn, rows, w in [(32, 4, 4), (32, 16, 4), (64, 8, 4), (16, 32, 4), (128, 4, 8),
                                (64, 16, 8), (256, 4, 8), (128, 8, 16)]]


@tuned(_CONFIGS, key=["HALF", "n_bucket", "r_bucket", "HAS_POS"])
@triton.jit
def _rope_kernel(X, Y, COS, SIN, POS, R, N, n_bucket, r_bucket, sxr, sxn, syr, syn, sc,
                 HALF: tl.constexpr, BH: tl.constexpr, BN: tl.constexpr, ROWS: tl.constexpr,
                 HAS_POS: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_r = tl.program_id(1)
    offs_n = pid_n * BN + tl.arange(0, BN)
    mask_n = offs_n < N
    if HAS_POS:
        pos = tl.load(POS + offs_n, mask=mask_n, other=0).to(tl.int64)
    else:
        pos = offs_n.to(tl.int64)
    offs_d = tl.arange(0, BH)
    m2 = mask_n[:, None] & (offs_d < HALF)[None, :]
    t = pos[:, None] * sc + offs_d[None, :]
    c1 = tl.load(COS + t, mask=m2, other=0.0).to(tl.float32)
    c2 = tl.load(COS + t + HALF, mask=m2, other=0.0).to(tl.float32)
    s1 = tl.load(SIN + t, mask=m2, other=0.0).to(tl.float32)
    s2 = tl.load(SIN + t + HALF, mask=m2, other=0.0).to(tl.float32)
    for i in tl.static_range(ROWS):
        r = pid_r * ROWS + i
        if r < R:
            xo = X + r.to(tl.int64) * sxr + offs_n[:, None].to(tl.int64) * sxn + offs_d[None, :]
            # x is read once and y written once: keep them from evicting the tables in L2.
            x1 = tl.load(xo, mask=m2, other=0.0, eviction_policy="evict_first").to(tl.float32)
            x2 = tl.load(xo + HALF, mask=m2, other=0.0,
                         eviction_policy="evict_first").to(tl.float32)
            yo = Y + r.to(tl.int64) * syr + offs_n[:, None].to(tl.int64) * syn + offs_d[None, :]
            tl.store(yo, (x1 * c1 - x2 * s1).to(Y.dtype.element_ty), mask=m2,
                     cache_modifier=".cs")
            tl.store(yo + HALF, (x2 * c2 + x1 * s2).to(Y.dtype.element_ty), mask=m2,
                     cache_modifier=".cs")


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
         positions: torch.Tensor | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """RoPE of ``x [..., N, D]`` to ``positions [N]`` (default ``0..N-1``) from the tables
    ``cos/sin [P, D]``, into ``out`` (contiguous, shaped like ``x``) or a new tensor; never
    into ``x`` itself (the autotuner reruns the kernel)."""
    D = x.shape[-1]
    if D % 2:
        raise ValueError(f"head_dim must be even for RoPE, got {D}")
    N = x.shape[-2]
    x3 = x.reshape(-1, N, D)
    if x3.stride(-1) != 1:
        x3 = x3.contiguous()
    y = out if out is not None else torch.empty_like(x, memory_format=torch.contiguous_format)
    if not y.is_contiguous() or y.shape != x.shape:
        raise ValueError("out must be contiguous and shaped like x")
    y3 = y.view(-1, N, D)
    cos, sin = cos.contiguous(), sin.contiguous()
    if positions is None and cos.shape[0] < N:
        raise ValueError(f"RoPE tables hold {cos.shape[0]} positions, {N} needed")
    R = x3.shape[0]
    meta = dict(BN=32, ROWS=4) if interpreting() else {}
    pos = positions.contiguous() if positions is not None else cos  # unused when not HAS_POS
    _rope_kernel[lambda m: (triton.cdiv(N, m["BN"]), triton.cdiv(R, m["ROWS"]))](
        x3, y3, cos, sin, pos, R, N, triton.next_power_of_2(N), triton.next_power_of_2(R),
        x3.stride(0), x3.stride(1), y3.stride(0), y3.stride(1), cos.stride(0), HALF=D // 2,
        BH=max(16, triton.next_power_of_2(D // 2)), HAS_POS=positions is not None, **meta)
    return y
