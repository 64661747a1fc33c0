"""Attention for the selected queries over the whole fused KV, with the exact causal mask.

Query i sits at position ``q_pos[i]`` and sees keys ``0..q_pos[i]`` only, whatever mix of
cached and fresh keys sits there; upstream blends approximate this mask. One program owns a
block of queries of one head and streams key blocks up to the block's largest position
(flash-attention style online softmax in fp32), so masked work beyond it is never read.
Grouped-query attention maps query head h to key/value head ``h // (Hq / Hkv)``. A row that
has seen no key yet keeps a finite reference maximum, so no ``inf - inf`` can occur. The
numpy interpreter has no bf16 matrix product, so there (tests only) bf16 tiles are upcast.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ragkv.engine.kernels import interpreting, tuned

_CONFIGS = [triton.Config({"BM": bm, "BN": bn}, num_warps=w, num_stages=st)
            for bm, bn, w, st in [(64, 64, 4, 3), (128, 64, 8, 3), (64, 128, 8, 3),
                                  (128, 128, 8, 2)]]


@triton.jit
def _key_blocks(acc, l_i, m_i, q, K, V, pos, kvh, skh, skt, svh, svt, lo, hi, offs_d, mask_d,
                qk_scale, BN: tl.constexpr, MASKED: tl.constexpr, IEEE: tl.constexpr,
                UPCAST: tl.constexpr):
    """Online softmax (base 2) over key blocks ``[lo, hi)``; only blocks that
    straddle a query's position pay for the mask."""
    for start in range(lo, hi, BN):
        offs_n = start + tl.arange(0, BN)
        mask_n = offs_n < hi
        kt = tl.load(K + kvh * skh + offs_n[None, :].to(tl.int64) * skt + offs_d[:, None],
                     mask=mask_n[None, :] & mask_d[:, None], other=0.0)
        if UPCAST:
            kt = kt.to(tl.float32)
        if IEEE:
            s = tl.dot(q, kt, input_precision="ieee")
        else:
            s = tl.dot(q, kt)
        s = s * qk_scale
        if MASKED:
            s = tl.where(offs_n[None, :] <= pos[:, None], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp2(s - m_ref[:, None])
        alpha = tl.exp2(m_i - m_ref)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v = tl.load(V + kvh * svh + offs_n[:, None].to(tl.int64) * svt + offs_d[None, :],
                    mask=mask_n[:, None] & mask_d[None, :], other=0.0)
        if UPCAST:
            v = v.to(tl.float32)
        if IEEE:
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision="ieee")
        else:
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new
    return acc, l_i, m_i


@tuned(_CONFIGS, key=["n_bucket", "t_bucket", "HD", "GROUP", "IEEE"])
@triton.jit
def _selected_attention_kernel(Q, K, V, OUT, POS, n, T, scale, n_bucket, t_bucket,
                               sqh, sqn, skh, skt, svh, svt, soh, son,
                               GROUP: tl.constexpr, HD: tl.constexpr, BD: tl.constexpr,
                               BM: tl.constexpr, BN: tl.constexpr, IEEE: tl.constexpr,
                               UPCAST: tl.constexpr):
    pid_m = tl.program_id(0)
    h = tl.program_id(1)
    kvh = h // GROUP
    offs_m = pid_m * BM + tl.arange(0, BM)
    mask_m = offs_m < n
    pos = tl.load(POS + offs_m, mask=mask_m, other=-1).to(tl.int32)
    offs_d = tl.arange(0, BD)
    mask_d = offs_d < HD
    q = tl.load(Q + h * sqh + offs_m[:, None].to(tl.int64) * sqn + offs_d[None, :],
                mask=mask_m[:, None] & mask_d[None, :], other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
    qk_scale = scale * 1.4426950408889634  # scores in base 2: exp2 is the fast path
    m_i = tl.full([BM], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BM], dtype=tl.float32)
    acc = tl.zeros([BM, BD], dtype=tl.float32)
    hi = tl.minimum(tl.max(pos, axis=0) + 1, T)
    # Keys below every query's position in this block need no mask.
    lo = (tl.minimum(tl.min(tl.where(mask_m, pos, T), axis=0) + 1, hi) // BN) * BN
    acc, l_i, m_i = _key_blocks(acc, l_i, m_i, q, K, V, pos, kvh, skh, skt, svh, svt, 0, lo,
                                offs_d, mask_d, qk_scale, BN, False, IEEE, UPCAST)
    acc, l_i, m_i = _key_blocks(acc, l_i, m_i, q, K, V, pos, kvh, skh, skt, svh, svt, lo, hi,
                                offs_d, mask_d, qk_scale, BN, True, IEEE, UPCAST)
    out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    tl.store(OUT + offs_m[:, None].to(tl.int64) * son + h * soh + offs_d[None, :],
             out.to(OUT.dtype.element_ty), mask=mask_m[:, None] & mask_d[None, :])


def selected_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_pos: torch.Tensor,
                       scale: float) -> torch.Tensor:
    """Queries ``q [Hq, n, D]`` at positions ``q_pos [n]`` over ``k, v [Hkv, T, D]``; query i
    sees keys ``<= q_pos[i]``. Positions need not be sorted (sorted is faster). Returns
    ``[n, Hq, D]`` in q's dtype."""
    Hq, n, D = q.shape
    Hkv, T, _ = k.shape
    if Hq % Hkv:
        raise ValueError(f"{Hq} query heads cannot share {Hkv} key/value heads")
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    out = torch.empty(n, Hq, D, device=q.device, dtype=q.dtype)
    if n == 0:
        return out
    BD = max(16, triton.next_power_of_2(D))
    # Fixed sizes in the interpreter; on a GPU the autotuner picks per shape bucket.
    meta = dict(BM=32, BN=32) if interpreting() else {}
    _selected_attention_kernel[lambda m: (triton.cdiv(n, m["BM"]), Hq)](
        q, k, v, out, q_pos.contiguous(), n, T, scale, triton.next_power_of_2(n),
        triton.next_power_of_2(T), q.stride(0), q.stride(1), k.stride(0), k.stride(1),
        v.stride(0), v.stride(1), out.stride(1), out.stride(0), GROUP=Hq // Hkv, HD=D, BD=BD,
        IEEE=q.dtype == torch.float32, UPCAST=q.dtype == torch.bfloat16 and interpreting(),
        **meta)
    return out
