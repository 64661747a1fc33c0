"""Ingestion's prefill: many chunks per forward pass, each after the same past (or none).

Chunks of a batch are padded on the right to the longest and run as one batch through the
model's own layer pieces: every chunk sees the shared past and its own earlier tokens (the
causal mask), never another chunk, so each chunk's KV is what prefilling it alone gives
(tested against :func:`ragkv.engine.blend.compute_span`). Padding rows are dropped.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from ragkv.engine.blend import compute_span
from ragkv.engine.kv import ChunkKV

#: chunks per forward pass on a GPU, where one ~512-token chunk leaves it mostly idle. On a
#: CPU one chunk already saturates the cores (measured on 2 cores, SmolLM2: 443 tokens/s one
#: at a time, 433 in batches of 8, 518 in 4), and one at a time is bit-identical to the
#: prefill that recomputes a miss, so a repaired entry changes no answer by a single bit.
BATCH = 8


def _batch(runner, chunks: Sequence[Sequence[int]], past: ChunkKV | None) -> list[ChunkKV]:
    dev, dt = runner.device, runner.dtype
    B, n = len(chunks), max(len(c) for c in chunks)
    P = 0 if past is None else past.n_tokens
    runner.check_length(P + n)
    ids = torch.zeros(B, n, dtype=torch.long, device=dev)
    for i, c in enumerate(chunks):
        ids[i, :len(c)] = torch.tensor(list(c), device=dev)
    positions = torch.arange(P + n, device=dev)
    cos, sin = runner.cos_sin(positions)
    H, D, L = runner.kv_heads, runner.head_dim, runner.n_layers
    ks = torch.empty(L, B, H, n, D, device=dev, dtype=dt)
    vs = torch.empty(L, B, H, n, D, device=dev, dtype=dt)
    past_k = None if past is None else runner.rotate(past.k.to(dev, dt), cos[:P], sin[:P])
    # query i (at position P + i) sees the whole past and chunk keys 0..i: plain causal
    # attention over [past; chunk] once the queries are padded in front (below)
    h = runner.embed(ids.reshape(-1))  # [B*n, hidden]: row-wise pieces see a flat batch
    for layer in range(L):
        q, k, v = runner.qkv(layer, h)  # [heads, B*n, D]
        q = q.reshape(q.shape[0], B, n, D).transpose(0, 1)
        k = k.reshape(H, B, n, D).transpose(0, 1)
        v = v.reshape(H, B, n, D).transpose(0, 1)
        ks[layer], vs[layer] = k, v
        if layer == L - 1:  # nothing reads the last layer's output
            break
        q, k = runner.rotate(q, cos[P:], sin[P:]), runner.rotate(k, cos[P:], sin[P:])
        if past is not None:
            k = torch.cat([past_k[layer].expand(B, -1, -1, -1), k], dim=2)
            v = torch.cat([past.v[layer].to(dev, dt).expand(B, -1, -1, -1), v], dim=2)
        if P:  # zero queries in front for the past: the plain causal kernel applies (fast)
            q = torch.cat([q.new_zeros(B, q.shape[1], P, D), q], dim=2)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=runner.scaling,
                                             enable_gqa=True)[:, :, P:]
        h = runner.finish(layer, h, out.permute(0, 2, 1, 3).reshape(B * n, -1))
    return [ChunkKV(ks[:, i, :, :len(c)].contiguous(), vs[:, i, :, :len(c)].contiguous())
            for i, c in enumerate(chunks)]


@torch.inference_mode()
def compute_spans(runner, chunks: Sequence[Sequence[int]], past: ChunkKV | None = None,
                  batch: int | None = None) -> list[ChunkKV]:
    """Each chunk's pre-RoPE K and V ``[layers, kv_heads, n, head_dim]`` as prefilled after
    ``past`` alone, ``batch`` chunks per forward pass (default: :data:`BATCH` on a GPU, one
    on a CPU; similar lengths together, so little is padded); in the order given."""
    if batch is None:
        batch = BATCH if runner.device.type == "cuda" else 1
    if batch == 1:
        dev = runner.device
        return [compute_span(runner, torch.tensor(list(c), device=dev), past) for c in chunks]
    order = sorted(range(len(chunks)), key=lambda i: len(chunks[i]))
    out: list[ChunkKV | None] = [None] * len(chunks)
    for start in range(0, len(order), batch):
        group = order[start:start + batch]
        for i, kv in zip(group, _batch(runner, [chunks[i] for i in group], past), strict=True):
            out[i] = kv
    return [kv for kv in out if kv is not None]
