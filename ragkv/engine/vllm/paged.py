"""vLLM's paged KV cache, as the connector's worker sees it: slots, reads, writes, attention.

The CPU backend keeps each layer's cache as ``[blocks, kv_heads, block_size, 2 * head_dim]``:
per block and head, keys transposed (``[head_dim, block_size]``) then values
(``[block_size, head_dim]``). Writes go through the backend's own cache update; reads and the
attention below are proven against it (:func:`check_layout`, :meth:`PagedAttention.probe`)
before they are used, so another layout or kernel version only turns them off.
"""

from __future__ import annotations

import logging

import torch

from ragkv.engine.kernels.reference import TorchOps

log = logging.getLogger("ragkv.vllm")


def slots(block_ids: list[int], block_size: int, lo: int, hi: int) -> torch.Tensor:
    """Paged-cache slot of each position in ``[lo, hi)``: ``[hi - lo]`` int64."""
    pos = torch.arange(lo, hi)
    return torch.tensor(block_ids, dtype=torch.long)[pos // block_size] * block_size \
        + pos % block_size


def read_paged(kv_layer: torch.Tensor, slot: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """K and V ``[kv_heads, n, head_dim]`` at ``slot`` of a CPU-backend layer cache."""
    nb, h, bs, two_d = kv_layer.shape
    d = two_d // 2
    flat = kv_layer.view(nb, h, 2, bs * d)
    b, off = slot // bs, slot % bs
    k = flat[:, :, 0].view(nb, h, d, bs)[b, :, :, off]  # [n, kv_heads, head_dim]
    v = flat[:, :, 1].view(nb, h, bs, d)[b, :, off]
    return k.transpose(0, 1), v.transpose(0, 1)


def write_layer(layer, k: torch.Tensor, v: torch.Tensor, slot: torch.Tensor,
                strided: bool = False) -> None:
    """K/V ``[kv_heads, n, head_dim]`` into ``layer``'s paged cache at ``slot [n]``. The
    backend takes ``[n, kv_heads, head_dim]`` rows; ``strided`` hands it transposed views
    instead of contiguous copies (for callers that proved the backend honours strides)."""
    cache = layer.kv_cache
    k = k.transpose(0, 1).to(cache.dtype)
    v = v.transpose(0, 1).to(cache.dtype)
    if not strided:
        k, v = k.contiguous(), v.contiguous()
    layer.impl.do_kv_cache_update(layer, k, v, cache, slot.to(cache.device))


def write_paged(layers: list, k: list[torch.Tensor], v: list[torch.Tensor], slot: torch.Tensor,
                lo: int, hi: int, skip: list[bool] | None = None) -> None:
    """Positions ``[lo, hi)`` of per-layer K/V ``[kv_heads, T, head_dim]`` into each attention
    layer's paged cache at ``slot``; layers marked in ``skip`` are already there."""
    for i, layer in enumerate(layers):
        if skip is None or not skip[i]:
            write_layer(layer, k[i][:, lo:hi], v[i][:, lo:hi], slot)


def check_layout(layer, kv_layer: torch.Tensor) -> bool:
    """Whether :func:`read_paged` reads back what the layer's backend writes (scratch copy)."""
    nb, h, bs, two_d = kv_layer.shape
    scratch = torch.zeros(1, h, bs, two_d, dtype=kv_layer.dtype, device=kv_layer.device)
    key = torch.randn(bs, h, two_d // 2).to(kv_layer.dtype).to(kv_layer.device)
    value = torch.randn(bs, h, two_d // 2).to(kv_layer.dtype).to(kv_layer.device)
    slot = torch.arange(bs, device=kv_layer.device)
    layer.impl.do_kv_cache_update(layer, key, value, scratch, slot)
    k, v = read_paged(scratch, slot)
    return torch.equal(k.transpose(0, 1), key) and torch.equal(v.transpose(0, 1), value)


def runs(q_pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Runs of consecutive positions in sorted ``q_pos [n]``: int32 ``query_start_loc [r+1]``
    and ``seq_lens [r]`` (a run ``a..b`` is a sequence of ``b + 1`` tokens whose last
    ``b - a + 1`` are queries)."""
    n = q_pos.numel()
    breaks = (q_pos[1:] - q_pos[:-1] != 1).nonzero().flatten() + 1
    edges = torch.cat([breaks.new_zeros(1), breaks, breaks.new_full((1,), n)])
    return edges.to(torch.int32), (q_pos[edges[1:] - 1] + 1).to(torch.int32)


class PagedAttention:
    """The blend's attention on vLLM's CPU kernel, over one request's paged KV cache.

    Before layer ``l``'s attention, positions ``[lo, T)`` of the fused K/V are written into
    the request's blocks: their final state, since the blend never changes a layer's buffers
    after its attention, so the connector need not write them again (``written``). The
    selected queries then run as vLLM sequences: each run of consecutive positions ``a..b``
    is a sequence of length ``b + 1`` with ``b - a + 1`` queries reading the request's block
    table, and vLLM's causal rule for a sequence's last tokens is exactly the blend's mask by
    position. Position ``T - 1`` is written too; vLLM overwrites it when it computes it.
    """

    def __init__(self, layers: list, block_ids: list[int], block_size: int, lo: int,
                 n_tokens: int) -> None:
        self.layers, self.lo = layers, lo
        self.slot = slots(block_ids, block_size, lo, n_tokens)
        self.block_table = torch.tensor(block_ids, dtype=torch.int32)[None]
        self.written = [False] * len(layers)

    @staticmethod
    def supported(layer) -> bool:
        """Whether ``layer`` runs vLLM's CPU attention without features the blend lacks."""
        impl = getattr(layer, "impl", None)
        return (type(impl).__name__ == "CPUAttentionBackendImpl"
                and getattr(impl, "sinks", None) is None
                and getattr(impl, "alibi_slopes", None) is None
                and getattr(impl, "logits_soft_cap", 0) == 0
                and getattr(impl, "sliding_window", -1) == -1
                and getattr(impl, "kv_cache_dtype", None) == "auto"
                and isinstance(getattr(layer, "isa", None), str))

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               q_pos: torch.Tensor | None, scale: float) -> torch.Tensor:
        """Queries ``q [Hq, n, D]`` at sorted ``q_pos [n]`` (None: ``0..T-1``) over layer
        ``layer``'s fused ``k, v [Hkv, T, D]``; returns ``[n, Hq * D]``."""
        lay = self.layers[layer]
        write_layer(lay, k[:, self.lo:], v[:, self.lo:], self.slot, strided=True)
        self.written[layer] = True
        if q_pos is None:
            q_pos = torch.arange(k.shape[1], device=q.device)
        return paged_attention(lay, q, q_pos, self.block_table, scale)

    @staticmethod
    def probe(layer, scale: float) -> bool:
        """Whether :func:`paged_attention` over a scratch cache written as :meth:`attend`
        writes (strided) matches the reference attention of scattered queries (once per
        engine, before first use)."""
        cache = layer.kv_cache
        nb, h, bs, two_d = cache.shape
        d, hq = two_d // 2, getattr(layer, "num_heads", h)
        T = 2 * bs
        g = torch.Generator().manual_seed(0)
        k, v = (torch.randn(h, T, d, generator=g).to(cache.dtype) for _ in "kv")
        q_pos = torch.tensor([0, 5, 6, 7, bs - 1, bs, bs + 3, T - 2, T - 1])
        q = torch.randn(hq, q_pos.numel(), d, generator=g).to(cache.dtype)
        scratch = torch.zeros(2, h, bs, two_d, dtype=cache.dtype, device=cache.device)
        real = layer.kv_cache
        try:
            layer.kv_cache = scratch
            write_layer(layer, k, v, torch.arange(T), strided=True)
            got = paged_attention(layer, q, q_pos, torch.tensor([[0, 1]], dtype=torch.int32),
                                  scale)
        except Exception as exc:  # noqa: BLE001 - an unknown kernel only turns the path off
            log.warning("vLLM's CPU attention kernel is not usable by ragkv (%s)", exc)
            return False
        finally:
            layer.kv_cache = real
        want = TorchOps().attend_selected(q.float(), k.float(), v.float(), q_pos, scale)
        tol = 1e-4 if cache.dtype == torch.float32 else 3e-2
        return bool(torch.allclose(got.float().view_as(want), want, atol=tol, rtol=tol))


def paged_attention(layer, q: torch.Tensor, q_pos: torch.Tensor, block_table: torch.Tensor,
                    scale: float) -> torch.Tensor:
    """vLLM's CPU attention of ``q [Hq, n, D]`` at sorted positions ``q_pos`` over the keys
    at positions ``<= q_pos[i]`` of ``layer``'s cache, through ``block_table [1, blocks]``."""
    from vllm import _custom_ops as ops
    from vllm import envs

    cache = layer.kv_cache
    nb, hkv, bs, two_d = cache.shape
    key_cache, value_cache = cache.view(nb, hkv, bs * 2, two_d // 2).chunk(2, dim=2)
    hq, n, d = q.shape
    qsl, seq = runs(q_pos.cpu())
    r = seq.numel()
    meta = ops.cpu_attn_get_scheduler_metadata(
        num_reqs=r, num_heads=hq, num_kv_heads=hkv, head_dim=d, seq_lens=seq,
        dtype=cache.dtype, query_start_loc=qsl, causal=True, sliding_window_size=-1,
        isa=layer.isa, enable_kv_split=envs.VLLM_CPU_ATTN_SPLIT_KV)
    out = torch.empty(n, hq, d, dtype=cache.dtype, device=cache.device)
    ops.cpu_attention_with_kv_cache(
        query=q.transpose(0, 1).to(cache.dtype).contiguous(), key_cache=key_cache,
        value_cache=value_cache, output=out, query_start_loc=qsl, seq_lens=seq, scale=scale,
        causal=True, alibi_slopes=None, sliding_window=-1,
        block_table=block_table.expand(r, -1).contiguous(), softcap=0.0,
        scheduler_metadata=meta, s_aux=None, k_scale=layer._k_scale_float,
        v_scale=layer._v_scale_float, kv_cache_dtype="auto")
    return out.reshape(n, hq * d).to(q.dtype)
