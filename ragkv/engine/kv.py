"""KV containers: what a chunk's cache entry holds and how it is (de)serialised."""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def torch_dtype(name: str) -> torch.dtype:
    try:
        return _DTYPES[name]
    except KeyError:
        raise ValueError(f"unknown dtype {name!r}; use one of {sorted(_DTYPES)}") from None


@dataclass
class ChunkKV:
    """One span's keys (before RoPE) and values for every layer.

    k, v: ``[layers, kv_heads, tokens, head_dim]``. Keys are stored before rotary embedding so
    that placing the span at any position is one exact rotation by the model's own RoPE.
    score: optional float32 ``[tokens]``, the context score of an anchor-context entry
    (:mod:`ragkv.engine.context_score`); it never enters the KV itself.
    """

    k: torch.Tensor
    v: torch.Tensor
    score: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if self.k.shape != self.v.shape or self.k.dim() != 4:
            raise ValueError(f"k/v must share a 4-d shape, got {tuple(self.k.shape)} and "
                             f"{tuple(self.v.shape)}")
        if self.score is not None and tuple(self.score.shape) != (self.k.shape[2],):
            raise ValueError(f"score must hold one value per token ({self.k.shape[2]}), got "
                             f"shape {tuple(self.score.shape)}")

    def with_score(self, score: torch.Tensor | None) -> ChunkKV:
        return replace(self, score=score)

    @property
    def n_tokens(self) -> int:
        return self.k.shape[2]

    def to(self, device: torch.device | str, dtype: torch.dtype) -> ChunkKV:
        return ChunkKV(self.k.to(device=device, dtype=dtype), self.v.to(device=device, dtype=dtype),
                       self.score)

    def to_tensors(self, dtype: str) -> dict[str, torch.Tensor]:
        dt = torch_dtype(dtype)
        out = {"k": self.k.to("cpu", dt).contiguous(), "v": self.v.to("cpu", dt).contiguous()}
        if self.score is not None:  # [1, tokens]: the int8 codec wants two dimensions
            out["score"] = self.score.to("cpu", torch.float32).reshape(1, -1).contiguous()
        return out

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], *, layers: int, kv_heads: int,
                     head_dim: int, n_tokens: int, dtype: torch.dtype | None = None) -> ChunkKV:
        """Rebuild and check the shape (and with ``dtype``, the dtype of both K and V): any
        other is a foreign entry (ValueError)."""
        kv = cls(tensors["k"], tensors["v"])
        want = (layers, kv_heads, n_tokens, head_dim)
        if tuple(kv.k.shape) != want:
            raise ValueError(f"stored KV has shape {tuple(kv.k.shape)}, expected {want}")
        if dtype is not None and not kv.k.dtype == kv.v.dtype == dtype:
            raise ValueError(f"stored KV has dtype {kv.k.dtype}/{kv.v.dtype}, expected {dtype}")
        score = tensors.get("score")
        if score is not None:
            if tuple(score.shape) != (1, n_tokens) or not bool(torch.isfinite(score).all()):
                raise ValueError("stored context score is malformed")
            kv.score = score.reshape(-1).float()
        if not kv.finite():
            raise ValueError("stored KV holds non-finite values")
        return kv

    def finite(self) -> bool:
        """Whether K and V hold no NaN or inf."""
        return _finite(self.k) and _finite(self.v)


def _finite(t: torch.Tensor) -> bool:
    # NaN and inf survive a float32 sum: one reduction instead of a full boolean pass (a
    # float64 sum took twice as long). Finite fp32 or bf16 magnitudes near 1e37 can overflow
    # that sum, so an inf sum is checked element by element.
    return bool(torch.isfinite(t.sum(dtype=torch.float32)) or torch.isfinite(t).all())
