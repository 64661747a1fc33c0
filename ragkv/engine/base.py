"""The engine contract every backend meets (transformers today, vLLM later)."""

from __future__ import annotations

from typing import Protocol

import torch

from ragkv.config import BlendConfig
from ragkv.engine.blend import FusedPrefill
from ragkv.engine.kv import ChunkKV
from ragkv.prompt import AssembledPrompt


class Engine(Protocol):
    """What the API needs from a backend.

    ``prefill`` gets the assembled prompt and the cached spans it may use (prefix and chunks,
    as ``(start, ChunkKV)``) and returns the prompt's KV and first-token logits; ``decode`` and
    ``score`` continue from that KV.
    """

    fingerprint: str
    tokenizer: object
    eos_token_ids: set[int]

    def precompute(self, ids: list[int], past: ChunkKV | None = None) -> ChunkKV: ...

    def resolve(self, blend: BlendConfig) -> BlendConfig:
        """``blend`` with a concrete ratio (``"auto"`` answered by the loading controller)."""
        ...

    def prefill(self, prompt: AssembledPrompt, cached: list[tuple[int, ChunkKV]], mode: str,
                blend: BlendConfig, exact_until: int, record: bool = False) -> FusedPrefill: ...

    def decode(self, fused: FusedPrefill, first_token: int, max_new_tokens: int) -> list[int]: ...

    def score(self, fused: FusedPrefill, target: list[int]) -> torch.Tensor: ...
