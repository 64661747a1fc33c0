"""Correction of the KV the blend keeps from the cache (the anchor idea of KVCOMM, arXiv
2510.12872), as small strategy objects.

After selection, each layer computes a few tokens of every chunk afresh; for those tokens the
layer shows how far the chunk's cached KV sits from the KV it has in this prompt (fresh -
cached). The chunk's other tokens were cached under the same (missing or different) context,
so their KV drifted in a similar direction. A correction moves them by an estimate of that
drift before the layer's attention reads them; the recomputed tokens keep their exact fresh
KV. Measured on SmolLM2 (``benchmarks/fidelity.py``): the per-chunk mean drift roughly halves
the first-token KL of blend 0.15 at a cost of a few element-wise passes over the cached KV.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ragkv.config import BlendConfig


@dataclass
class Correction:
    """Base: cached KV is used as it is (CacheBlend)."""

    name: str = "none"

    def drift(self, dk: torch.Tensor, dv: torch.Tensor, anchors: torch.Tensor,
              chunk_of: torch.Tensor, stale: torch.Tensor,
              ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Estimated (K, V) drift ``[kv_heads, len(stale), head_dim]`` of the ``stale``
        positions, or None to leave them as cached.

        dk, dv: fresh - cached pre-RoPE K and V of the recomputed chunk tokens, ``[kv_heads,
        n, head_dim]``; anchors: their positions ``[n]``; chunk_of: chunk index of every
        prompt position ``[T]`` (-1 outside chunks); stale: sorted positions ``[s]`` of chunk
        tokens that keep cached KV at this layer.
        """
        return None


@dataclass
class ChunkMeanDrift(Correction):
    """Every stale token moves by ``strength`` times the mean drift of its chunk's recomputed
    tokens; a chunk with none recomputed stays as cached."""

    name: str = "chunk_mean"
    strength: float = 0.75

    def drift(self, dk, dv, anchors, chunk_of, stale):
        chunks = int(chunk_of.max()) + 1
        if anchors.numel() == 0 or chunks <= 0:
            return None
        slot = chunk_of[anchors]
        count = torch.zeros(chunks, device=dk.device).index_add_(
            0, slot, torch.ones_like(slot, dtype=torch.float32))
        scale = self.strength / count.clamp(min=1)
        mean_k = dk.new_zeros(dk.shape[0], chunks, dk.shape[2], dtype=torch.float32)
        mean_v = torch.zeros_like(mean_k)
        mean_k.index_add_(1, slot, dk.float())
        mean_v.index_add_(1, slot, dv.float())
        mean_k *= scale[None, :, None]
        mean_v *= scale[None, :, None]
        at = chunk_of[stale]  # chunks without anchors have a zero mean: no move
        return mean_k[:, at].to(dk.dtype), mean_v[:, at].to(dv.dtype)


CORRECTIONS: dict[str, type[Correction]] = {"none": Correction, "chunk_mean": ChunkMeanDrift}


def make_correction(cfg: BlendConfig) -> Correction:
    """The correction a BlendConfig names."""
    if cfg.correction == "none" or cfg.correction_strength == 0.0:
        return Correction()
    return ChunkMeanDrift(strength=cfg.correction_strength)


def chunk_index(n_tokens: int, spans: list[tuple[int, int]],
                device: torch.device) -> torch.Tensor:
    """Chunk index ``[n_tokens]`` of every position, -1 outside ``spans``."""
    out = torch.full((n_tokens,), -1, dtype=torch.long)
    for i, (s, e) in enumerate(spans):
        out[s:e] = i
    return out.to(device)
