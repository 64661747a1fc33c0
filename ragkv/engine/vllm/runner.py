"""The blend's layer pieces over a vLLM-built Llama-family model (no second copy of weights).

:func:`ragkv.engine.blend.fuse` and :func:`~ragkv.engine.blend.compute_span` drive a runner
one decoder layer at a time on any subset of tokens; this one calls vLLM's own modules
(merged qkv projection, RMSNorm, MLP, rotary cache, LM head) so numerics are the engine's,
and keeps ragkv's exact-mask attention. It meets the same interface as
:class:`ragkv.engine.runner.LlamaFamilyRunner`.
"""

from __future__ import annotations

import torch

from ragkv.engine.kernels import TorchOps, make_ops
from ragkv.engine.kernels.reference import sdpa


class VLLMRunner:
    """Pieces of a forward pass of a vLLM Llama/Mistral/Qwen2 model, batch size 1.

    Hidden states are ``[n, hidden]``; per-layer q is ``[q_heads, n, head_dim]``, k and v are
    ``[kv_heads, n, head_dim]``; positions are int64 ``[n]``.
    """

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
        self.sliding_window = getattr(cfg, "sliding_window", None) if getattr(
            cfg, "use_sliding_window", True) else None
        self.ops = ops if ops is not None else make_ops("auto", self.device)

    @property
    def device(self) -> torch.device:
        return self.inner.embed_tokens.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.inner.embed_tokens.weight.dtype

    def check_length(self, n: int) -> None:
        if self.sliding_window is not None and n > self.sliding_window:
            raise ValueError(f"prompt of {n} tokens exceeds the sliding window "
                             f"({self.sliding_window}); fusion assumes full attention")

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        return self.inner.embed_tokens(ids)

    def cos_sin(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin ``[n, head_dim]`` in rotate-half form, from vLLM's rotary cache (which
        already holds the model's scaling variant)."""
        cache = self._rope.cos_sin_cache.to(self.device)[positions]
        cos, sin = cache.chunk(2, dim=-1)
        return (torch.cat([cos, cos], -1).to(self.dtype), torch.cat([sin, sin], -1).to(self.dtype))

    @staticmethod
    def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """Apply neox-style RoPE to ``x [..., n, head_dim]`` with cos/sin ``[n, head_dim]``."""
        x1, x2 = x.chunk(2, dim=-1)
        return x * cos + torch.cat([-x2, x1], dim=-1) * sin

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

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               q_pos: torch.Tensor | None) -> torch.Tensor:
        """Exact-mask attention, as :meth:`LlamaFamilyRunner.attend`; returns ``[n, Hq*D]``."""
        n = q.shape[1]
        if q_pos is None:
            out = sdpa(q, k, v, None, self.scaling).transpose(0, 1)
        else:
            out = self.ops.attend_selected(q, k, v, q_pos, self.scaling)
        return out.reshape(n, -1)

    def attention_probs(self, q: torch.Tensor, k: torch.Tensor,
                        q_pos: torch.Tensor) -> torch.Tensor:
        """Attention probabilities ``[Hq, n, T]`` of rotated queries over keys, exact mask."""
        k = k.repeat_interleave(self.q_heads // self.kv_heads, dim=0)
        scores = torch.matmul(q.float(), k.float().transpose(1, 2)) * self.scaling
        mask = torch.arange(k.shape[1], device=k.device)[None, :] > q_pos[:, None]
        return torch.softmax(scores.masked_fill(mask, float("-inf")), dim=-1)

    def finish(self, layer: int, h: torch.Tensor, attn_out: torch.Tensor) -> torch.Tensor:
        """o_proj, residual, MLP, residual for the same rows as ``h``."""
        blk = self.inner.layers[layer]
        out, _ = blk.self_attn.o_proj(attn_out.contiguous())
        h = h + out
        return h + blk.mlp(blk.post_attention_layernorm(h))

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """Vocabulary logits ``[n, vocab]`` of final hidden states ``[n, hidden]``."""
        return self.model.compute_logits(self.inner.norm(h)).float()
