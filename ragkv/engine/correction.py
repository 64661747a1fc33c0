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

from dataclasses import dataclass, field

import torch

from ragkv.config import BlendConfig


@dataclass
class Correction:
    """Base: cached KV is used as it is (CacheBlend)."""

    name: str = "none"

    def drift(self, dk: torch.Tensor, dv: torch.Tensor, anchors: torch.Tensor,
              chunk_of: torch.Tensor, n_chunks: int,
              ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Estimated pre-RoPE (K, V) drift of each chunk's cached tokens, ``[kv_heads,
        n_chunks, head_dim]`` each (or per position, :class:`PositionDrift`), or None to
        leave them as cached.

        dk, dv: fresh - cached pre-RoPE K and V of the recomputed chunk tokens, ``[kv_heads,
        n, head_dim]``; anchors: their positions ``[n]``; chunk_of: chunk index of every
        prompt position ``[T]`` (-1 outside chunks).
        """
        return None


@dataclass
class ChunkMeanDrift(Correction):
    """Every stale token moves by ``strength`` times the mean drift of its chunk's recomputed
    tokens; a chunk with none recomputed stays as cached."""

    name: str = "chunk_mean"
    strength: float = 0.75

    def drift(self, dk, dv, anchors, chunk_of, n_chunks):
        if anchors.numel() == 0 or n_chunks <= 0:
            return None
        slot = chunk_of[anchors]
        count = torch.zeros(n_chunks, device=dk.device).index_add_(
            0, slot, torch.ones_like(slot, dtype=torch.float32))
        scale = self.strength / count.clamp(min=1)  # no anchors: a zero mean, no move
        mean_k = dk.new_zeros(dk.shape[0], n_chunks, dk.shape[2], dtype=torch.float32)
        mean_v = torch.zeros_like(mean_k)
        mean_k.index_add_(1, slot, dk.float())
        mean_v.index_add_(1, slot, dv.float())
        mean_k *= scale[None, :, None]
        mean_v *= scale[None, :, None]
        return mean_k.to(dk.dtype), mean_v.to(dv.dtype)


@dataclass
class PositionDrift:
    """Drift per position: pre-RoPE K and V ``[kv_heads, m, head_dim]`` for every position of
    the chunk spans, in span order (``m`` = the spans' total length)."""

    k: torch.Tensor
    v: torch.Tensor


@dataclass
class LocalMeanDrift(ChunkMeanDrift):
    """Every stale token moves by ``strength`` times a mix of two drifts of its chunk's
    recomputed tokens: their mean within ``window`` positions of it (share ``mix``) and their
    mean over the whole chunk (the rest; alone where the window holds none). Drift varies
    along a chunk, and nearby tokens drift alike; the chunk mean keeps the estimate from
    resting on a few tokens. Prefix sums over the recomputed tokens make it a few gathers
    over the chunk tokens a layer: about 12 ms a blend more than ``chunk_mean`` on 2k-token
    prompts at two threads.
    """

    name: str = "local_mean"
    window: int = 16
    mix: float = 0.5
    #: the last anchor set's windows and weights: the blend passes the same anchor tensor to
    #: every layer until a check layer changes it, and recomputing them cost ~10 ms a blend
    _geometry: tuple | None = field(default=None, init=False, repr=False, compare=False)

    def _windows(self, anchors: torch.Tensor, chunk_of: torch.Tensor,
                 n_chunks: int) -> tuple[torch.Tensor, ...]:
        """Per chunk position: its chunk, its window's slice of the anchors and the weights of
        the window's and the chunk's drift sums; per anchor: its chunk."""
        if self._geometry is not None and self._geometry[0] is anchors \
                and self._geometry[1] is chunk_of:
            return self._geometry[2:]
        dev = anchors.device
        pos = (chunk_of >= 0).nonzero().flatten()  # every chunk position, in span order
        c, slot = chunk_of[pos], chunk_of[anchors]
        per_chunk = torch.zeros(n_chunks, device=dev).index_add_(
            0, slot, torch.ones(anchors.numel(), device=dev))
        big = torch.iinfo(torch.long).max
        first = pos.new_full((n_chunks,), big).scatter_reduce(0, c, pos, "amin")
        last = pos.new_full((n_chunks,), -1).scatter_reduce(0, c, pos, "amax")
        # anchors are sorted: each position's window, clipped to its chunk, is a slice of them
        lo = torch.searchsorted(anchors, torch.maximum(pos - self.window, first[c]))
        hi = torch.searchsorted(anchors, torch.minimum(pos + self.window, last[c]), right=True)
        near = hi > lo
        # a chunk with no anchor has a zero sum: it stays as cached
        w_local = torch.where(near, self.mix * self.strength / (hi - lo).clamp(min=1), 0.0)
        w_chunk = torch.where(near, 1.0 - self.mix, 1.0) * self.strength / per_chunk.clamp(
            min=1)[c]
        geometry = (c, slot, lo, hi, w_local[None, :, None], w_chunk[None, :, None])
        self._geometry = (anchors, chunk_of, *geometry)
        return geometry

    def drift(self, dk, dv, anchors, chunk_of, n_chunks):
        if anchors.numel() == 0 or n_chunks <= 0:
            return None
        h, n, d = dk.shape
        c, slot, lo, hi, w_local, w_chunk = self._windows(anchors, chunk_of, n_chunks)
        x = torch.cat([dk, dv]).float()  # [2H, n, D]: K and V in one pass (half the calls)
        cum = torch.cat([x.new_zeros(2 * h, 1, d), x.cumsum(1)], dim=1)  # [2H, n + 1, D]
        sums = x.new_zeros(2 * h, n_chunks, d).index_add_(1, slot, x)
        drift = cum.index_select(1, hi).sub_(cum.index_select(1, lo)).mul_(w_local)
        drift = drift.addcmul_(sums.index_select(1, c), w_chunk).to(dk.dtype)
        return PositionDrift(drift[:h], drift[h:])


def apply_drift(k: torch.Tensor, v: torch.Tensor,
                drift: tuple[torch.Tensor, torch.Tensor] | PositionDrift,
                spans: list[tuple[int, int]], cos: torch.Tensor, sin: torch.Tensor) -> None:
    """Add each chunk's drift (pre-RoPE, ``[kv_heads, chunks, head_dim]``, or per position:
    :class:`PositionDrift`) to every position of its span in one layer's rotated keys ``k``
    and values ``v`` ``[kv_heads, T, head_dim]``, the key drift rotated to each position (RoPE
    is linear: rope(x + d) = rope(x) + rope(d); Llama's rotate-half convention, tables
    ``cos/sin [T, head_dim]``).

    Recomputed positions are moved too: the caller overwrites them with their fresh KV next.
    Whole spans are contiguous slices, added in place; gathering the stale positions and
    scattering them back cost ~3 ms a layer on a 2k-token prompt, against well under 1 here.
    """
    per_position = isinstance(drift, PositionDrift)
    mk, mv = (drift.k, drift.v) if per_position else drift
    h = mk.shape[-1] // 2
    rk = torch.cat([-mk[..., h:], mk[..., :h]], dim=-1)  # rotate_half of the drift
    o = 0
    for i, (s, e) in enumerate(spans):
        # a span's rows of a per-position drift, or its chunk's one row broadcast over it
        rows = slice(o, o + e - s) if per_position else slice(i, i + 1)
        k[:, s:e].addcmul_(mk[:, rows], cos[s:e]).addcmul_(rk[:, rows], sin[s:e])
        v[:, s:e].add_(mv[:, rows])
        o += e - s


CORRECTIONS: dict[str, type[Correction]] = {"none": Correction, "chunk_mean": ChunkMeanDrift,
                                            "local_mean": LocalMeanDrift}


def make_correction(cfg: BlendConfig) -> Correction:
    """The correction a BlendConfig names."""
    if cfg.correction == "none" or cfg.correction_strength == 0.0:
        return Correction()
    if cfg.correction == "local_mean":
        return LocalMeanDrift(strength=cfg.correction_strength, window=cfg.correction_window,
                              mix=cfg.correction_mix)
    return ChunkMeanDrift(strength=cfg.correction_strength)


def chunk_index(n_tokens: int, spans: list[tuple[int, int]],
                device: torch.device) -> torch.Tensor:
    """Chunk index ``[n_tokens]`` of every position, -1 outside ``spans``."""
    out = torch.full((n_tokens,), -1, dtype=torch.long)
    for i, (s, e) in enumerate(spans):
        out[s:e] = i
    return out.to(device)
