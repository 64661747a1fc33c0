"""Layer-level execution for Llama-family decoders (Llama, Mistral, Qwen2, SmolLM).

The blend needs to run one decoder layer on an arbitrary subset of tokens against a fused KV
buffer; transformers' forward only runs whole sequences. This runner calls the model's own
modules (projections, norms, MLP, rotary embedding) so numerics match the model, and owns only
the attention call, where the exact causal mask by position is applied (docs/design.md §3.4).
"""

from __future__ import annotations

import sys

import torch

from ragkv.engine.kernels import TorchOps, make_ops
from ragkv.engine.kernels.reference import sdpa

SUPPORTED = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")


def fusion_window(cfg: object) -> tuple[int, str] | None:
    """The longest prompt the fusion runs exactly, with what limits it; None: any length.

    The fusion attends to every earlier position, so a sliding window limits it; and it
    places KV computed on short spans (a chunk, the template prefix), so a RoPE whose
    frequencies change past a length (LongRoPE past its original length, dynamic NTK past the
    trained one) would leave that KV with other rotations than the long prompt's own."""
    limits = []
    if getattr(cfg, "use_sliding_window", True) and getattr(cfg, "sliding_window", None):
        limits.append((int(cfg.sliding_window), "the sliding window"))
    rope = getattr(cfg, "rope_parameters", None) or getattr(cfg, "rope_scaling", None) or {}
    kind = rope.get("rope_type") or rope.get("type") if isinstance(rope, dict) else None
    if kind == "longrope":
        n = (rope.get("original_max_position_embeddings")
             or getattr(cfg, "original_max_position_embeddings", None))
        if n:
            limits.append((int(n), "LongRoPE's original length, past which its frequencies "
                                   "change"))
    elif kind == "dynamic" and getattr(cfg, "max_position_embeddings", None):
        limits.append((int(cfg.max_position_embeddings), "the trained length, past which "
                                                         "dynamic NTK RoPE's frequencies change"))
    return min(limits) if limits else None


class DecoderRunner:
    """What every runner shares: device, length check, embedding, and the attention the blend
    owns (exact mask by position; the kernel set in ``ops``). Variants set ``model``,
    ``inner``, ``n_layers``, ``q_heads``, ``kv_heads``, ``head_dim``, ``scaling``,
    ``window`` (:func:`fusion_window`) and ``ops``, and supply ``cos_sin``, ``rotate``,
    ``qkv``, ``finish`` and ``logits`` from their framework's modules.

    Hidden states are ``[n, hidden]``; per-layer q is ``[q_heads, n, head_dim]``, k and v are
    ``[kv_heads, n, head_dim]``; positions are int64 ``[n]``.
    """

    inner: torch.nn.Module
    q_heads: int
    kv_heads: int
    scaling: float
    window: tuple[int, str] | None
    ops: TorchOps

    @property
    def device(self) -> torch.device:
        return self.inner.embed_tokens.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.inner.embed_tokens.weight.dtype

    def check_length(self, n: int) -> None:
        if self.window is not None and n > self.window[0]:
            raise ValueError(f"prompt of {n} tokens exceeds {self.window[1]} "
                             f"({self.window[0]} tokens): the fusion cannot run it exactly")

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        return self.inner.embed_tokens(ids)

    def rotate_qk(self, q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor,
                  cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """RoPE of fresh ``q [Hq, n, D]`` and ``k [Hkv, n, D]`` (as :meth:`qkv` returns them)
        to ``positions [n]``, with the prompt's tables ``cos/sin [T, D]``. Variants may
        rotate in place: the caller is done with the pre-RoPE values."""
        c, s = cos[positions], sin[positions]
        return self.rotate(q, c, s), self.rotate(k, c, s)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               q_pos: torch.Tensor | None, layer: int | None = None) -> torch.Tensor:
        """Attention of rotated queries ``[Hq, n, D]`` over keys/values ``[Hkv, T, D]``.

        Key j sits at position j. ``q_pos=None`` means the queries are exactly positions
        ``0..T-1`` (plain causal); otherwise query i may see keys at positions <= q_pos[i] only,
        and ``q_pos`` must be sorted ascending (the blend keeps its active set sorted).
        ``layer`` names the decoder layer when ``k, v`` are that layer's final fused KV (the
        blend's call), for runners that attend over an engine's own cache. Returns
        ``[n, Hq * D]``.
        """
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


class LlamaFamilyRunner(DecoderRunner):
    """Pieces of a transformers forward pass, for batch size 1."""

    def __init__(self, model: torch.nn.Module, ops: TorchOps | None = None) -> None:
        arch = type(model).__name__
        if arch not in SUPPORTED:
            raise ValueError(f"unsupported architecture {arch}; supported: {', '.join(SUPPORTED)}")
        self.model = model
        self.inner = model.model
        cfg = model.config
        self.n_layers = cfg.num_hidden_layers
        self.q_heads = cfg.num_attention_heads
        self.kv_heads = cfg.num_key_value_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self.scaling = self.head_dim**-0.5
        self.window = fusion_window(cfg)
        modeling = sys.modules[type(model).__module__]
        # The model's own helpers, so RoPE variants and conventions stay the model's.
        self._rotate_half = modeling.rotate_half
        self.apply_rotary_pos_emb = modeling.apply_rotary_pos_emb
        #: the hot-path implementation (Triton on CUDA, the torch reference elsewhere)
        self.ops = ops if ops is not None else make_ops("auto", self.device)

    def cos_sin(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin ``[n, head_dim]`` from the model's rotary embedding (scaling included)."""
        probe = torch.empty(0, device=self.device, dtype=self.dtype)
        cos, sin = self.inner.rotary_emb(probe, positions[None])
        return cos[0], sin[0]

    def rotate(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """Apply RoPE to ``x [..., n, head_dim]`` with cos/sin ``[n, head_dim]``."""
        return x * cos + self._rotate_half(x) * sin

    def qkv(self, layer: int, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Pre-RoPE q ``[Hq, n, D]``, k and v ``[Hkv, n, D]`` of layer ``layer``."""
        blk = self.inner.layers[layer]
        x = blk.input_layernorm(h)
        attn = blk.self_attn
        n = h.shape[0]
        q = attn.q_proj(x).view(n, self.q_heads, self.head_dim).transpose(0, 1)
        k = attn.k_proj(x).view(n, self.kv_heads, self.head_dim).transpose(0, 1)
        v = attn.v_proj(x).view(n, self.kv_heads, self.head_dim).transpose(0, 1)
        return q, k, v

    def finish(self, layer: int, h: torch.Tensor, attn_out: torch.Tensor) -> torch.Tensor:
        """o_proj, residual, MLP, residual: the rest of the layer for the same rows as ``h``."""
        blk = self.inner.layers[layer]
        h = h + blk.self_attn.o_proj(attn_out)
        return h + blk.mlp(blk.post_attention_layernorm(h))

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """Vocabulary logits ``[n, vocab]`` of final hidden states ``[n, hidden]``."""
        return self.model.lm_head(self.inner.norm(h)).float()
