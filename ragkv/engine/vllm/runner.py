"""The blend's layer pieces over a vLLM-built Llama-family model (no second copy of weights).

:func:`ragkv.engine.blend.fuse` and :func:`~ragkv.engine.blend.compute_span` drive a runner
one decoder layer at a time on any subset of tokens; this one calls vLLM's own modules
(merged qkv projection, RMSNorm, MLP, rotary cache, LM head) so numerics are the engine's,
and keeps ragkv's exact-mask attention (from :class:`ragkv.engine.runner.DecoderRunner`).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

from ragkv.engine.kernels import TorchOps, make_ops
from ragkv.engine.runner import DecoderRunner, fusion_window
from ragkv.engine.vllm.paged import PagedAttention


class VLLMRunner(DecoderRunner):
    """Pieces of a forward pass of a vLLM Llama/Mistral/Qwen2 model, batch size 1.

    Inside :meth:`on_paged_cache` the blend's attention runs on vLLM's own kernel over the
    request's paged cache (:class:`~ragkv.engine.vllm.paged.PagedAttention`); elsewhere
    (computing a missing chunk, or a backend ragkv does not know) on ragkv's exact-mask ops.
    """

    paged: PagedAttention | None = None

    def __init__(self, model: torch.nn.Module, ops: TorchOps | None = None) -> None:
        self.model = model
        self.inner = model.model
        attn = self.inner.layers[0].self_attn
        self.n_layers = len(self.inner.layers)
        self.q_heads, self.kv_heads = attn.num_heads, attn.num_kv_heads
        self.head_dim = attn.head_dim
        self.scaling = attn.scaling
        rope = attn.rotary_emb
        if not getattr(rope, "is_neox_style", True) or rope.rotary_dim != self.head_dim:
            raise ValueError("ragkv fuses KV for full-width neox-style RoPE (Llama family) only")
        self._rope = rope
        cfg = model.config
        self.window = fusion_window(cfg)
        self.ops = ops if ops is not None else make_ops("auto", self.device)

    @contextmanager
    def on_paged_cache(self, paged: PagedAttention | None) -> Iterator[None]:
        """Attend through ``paged`` (when given) while the block runs."""
        self.paged = paged
        try:
            yield
        finally:
            self.paged = None

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               q_pos: torch.Tensor | None, layer: int | None = None) -> torch.Tensor:
        if self.paged is not None and layer is not None:
            return self.paged.attend(layer, q, k, v, q_pos, self.scaling)
        return super().attend(q, k, v, q_pos)

    def cos_sin(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin ``[n, head_dim]`` in rotate-half form, from vLLM's rotary cache (which
        already holds the model's scaling variant)."""
        cache = getattr(self._rope, "cos_sin_cache", None)
        if cache is None:  # LongRoPE: the short factors' rows come first, and the fusion's
            # window (ragkv.engine.runner.fusion_window) keeps prompts within them
            cache = self._rope.long_short_cos_sin_cache
        cache = cache.to(self.device)[positions]
        cos, sin = cache.chunk(2, dim=-1)
        return (torch.cat([cos, cos], -1).to(self.dtype), torch.cat([sin, sin], -1).to(self.dtype))

    @staticmethod
    def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """Apply neox-style RoPE to ``x [..., n, head_dim]`` with cos/sin ``[n, head_dim]``."""
        x1, x2 = x.chunk(2, dim=-1)
        return x * cos + torch.cat([-x2, x1], dim=-1) * sin

    def rotate_qk(self, q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor,
                  cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """vLLM's own RoPE op on the projection's rows (in place where the backend's op is):
        one fused call instead of the reference's temporaries."""
        n = q.shape[1]
        q2, k2 = self._rope(positions, q.transpose(0, 1).reshape(n, -1),
                            k.transpose(0, 1).reshape(n, -1))
        return (q2.view(n, self.q_heads, self.head_dim).transpose(0, 1),
                k2.view(n, self.kv_heads, self.head_dim).transpose(0, 1))

    def qkv(self, layer: int, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Pre-RoPE q ``[Hq, n, D]``, k and v ``[Hkv, n, D]`` of layer ``layer``."""
        blk = self.inner.layers[layer]
        attn = blk.self_attn
        qkv, _ = attn.qkv_proj(blk.input_layernorm(h))
        q, k, v = qkv.split([attn.q_size, attn.kv_size, attn.kv_size], dim=-1)
        n = h.shape[0]
        return (q.reshape(n, self.q_heads, self.head_dim).transpose(0, 1),
                k.reshape(n, self.kv_heads, self.head_dim).transpose(0, 1),
                v.reshape(n, self.kv_heads, self.head_dim).transpose(0, 1))

    def finish(self, layer: int, h: torch.Tensor, attn_out: torch.Tensor) -> torch.Tensor:
        """o_proj, residual, MLP, residual for the same rows as ``h``."""
        blk = self.inner.layers[layer]
        out, _ = blk.self_attn.o_proj(attn_out.contiguous())
        h = h + out
        return h + blk.mlp(blk.post_attention_layernorm(h))

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """Vocabulary logits ``[n, vocab]`` of final hidden states ``[n, hidden]``."""
        return self.model.compute_logits(self.inner.norm(h)).float()
