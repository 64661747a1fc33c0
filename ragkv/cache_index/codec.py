"""int8 KV storage, KIVI-style: symmetric int8 with a float32 scale per channel or per token.

Keys have outlier *channels* (a few head_dim columns are large for every token), so one scale
per channel over all tokens fits them; values have no such structure and quantize better with
one scale per token (KIVI, arXiv 2402.02750). Tensors are ``[..., tokens, head_dim]``; a tensor
whose name starts with ``k`` takes the key granularity, every other the value granularity.

On disk each tensor ``x`` becomes ``x.q8`` (int8) and ``x.scale`` (float32); the blob metadata
names the codec, so a reader decodes by what the blob says, never by the current config.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

Granularity = Literal["channel", "token"]
CODEC_KEY = "codec"
INT8 = "int8"
_AXIS = {"channel": -2, "token": -1}  # the axis a scale is shared over


@dataclass(frozen=True)
class Int8Codec:
    key_scales: Granularity = "channel"
    value_scales: Granularity = "token"

    def __post_init__(self) -> None:
        for g in (self.key_scales, self.value_scales):
            if g not in _AXIS:
                raise ValueError(f"int8 scale granularity must be 'channel' or 'token', got {g!r}")

    @property
    def tag(self) -> str:
        """What goes into cache keys and metadata: different scales are different entries."""
        return f"int8/k-{self.key_scales}/v-{self.value_scales}"

    def granularity(self, name: str) -> Granularity:
        return self.key_scales if name.startswith("k") else self.value_scales

    def encode(self, tensors: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor],
                                                                  dict[str, str]]:
        out: dict[str, torch.Tensor] = {}
        meta = {CODEC_KEY: INT8}
        for name, t in tensors.items():
            if t.dim() < 2:
                raise ValueError(f"int8 needs [..., tokens, head_dim]; {name!r} is {t.dim()}-d")
            axis = _AXIS[self.granularity(name)]
            x = t.detach().to("cpu", torch.float32)
            scale = (x.abs().amax(dim=axis, keepdim=True) / 127.0).clamp_min(1e-8)
            out[f"{name}.q8"] = torch.round(x / scale).clamp_(-127, 127).to(torch.int8)
            out[f"{name}.scale"] = scale.contiguous()
            meta[f"{name}.scales"] = self.granularity(name)
        return out, meta

    def roundtrip(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """What a reader will get back for ``tensors`` (kept by the memory tier on write, so a
        memory hit and a disk hit hand out the same numbers)."""
        encoded, meta = self.encode(tensors)
        return decode_tensors(encoded, meta)


def decode_tensors(tensors: dict[str, torch.Tensor],
                   meta: dict[str, str]) -> dict[str, torch.Tensor]:
    """Tensors as stored -> tensors as used; raises ValueError on a malformed int8 entry."""
    codec = meta.get(CODEC_KEY)
    if codec is None:
        return tensors
    if codec != INT8:
        raise ValueError(f"unknown KV codec {codec!r}")
    names = {n.removesuffix(".q8") for n in tensors if n.endswith(".q8")}
    if not names or set(tensors) != {f"{n}.{s}" for n in names for s in ("q8", "scale")}:
        raise ValueError("int8 entry must hold a .q8 and a .scale tensor per name")
    out: dict[str, torch.Tensor] = {}
    for name in sorted(names):
        q, scale = tensors[f"{name}.q8"], tensors[f"{name}.scale"]
        axis = _AXIS.get(meta.get(f"{name}.scales", ""))
        want = list(q.shape)
        if axis is not None and q.dim() >= 2:
            want[axis] = 1
        if (q.dtype != torch.int8 or scale.dtype != torch.float32 or axis is None
                or list(scale.shape) != want):
            raise ValueError(f"int8 tensor {name!r} has a malformed scale or payload")
        out[name] = q.to(torch.float32) * scale
    return out
