"""Building connector requests: prompt ids, ``kv_transfer_params`` and the cache salt.

Plain Python (the tokenizer and ragkv's prompt template only), so an application talking to
``vllm serve`` over HTTP can use it without vLLM installed.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ragkv.config import BlendConfig, RagkvConfig
from ragkv.engine.vllm.params import FusionParams, Span, fusion_salt
from ragkv.keys import chunk_key, context_digest
from ragkv.prompt import AssembledPrompt, PromptTemplate


@dataclass
class VLLMRequest:
    """What to send: ``prompt_token_ids``, ``kv_transfer_params`` and ``cache_salt``
    (None for plain or precompute requests)."""

    prompt: AssembledPrompt
    kv_transfer_params: dict[str, Any] | None
    cache_salt: str | None

    @property
    def ids(self) -> list[int]:
        return self.prompt.ids


class RequestBuilder:
    """Keys and parameters for one model served by vLLM with ragkv's connector.

    fingerprint: :func:`ragkv.engine.vllm.params.vllm_fingerprint` of the served model folder
    and dtype (the connector computes the same); cfg: the connector's ragkv settings
    (``precompute_context`` and ``kv_dtype`` enter the keys).
    """

    def __init__(self, template: PromptTemplate, fingerprint: str, cfg: RagkvConfig) -> None:
        self.template, self.fingerprint, self.cfg = template, fingerprint, cfg

    def _context(self) -> str:
        if self.cfg.precompute_context == "prefix":
            return context_digest(self.template.prefix_ids)
        return context_digest(None)

    def key_for(self, ids: Sequence[int]) -> str:
        return chunk_key(self.fingerprint, ids, context=self._context(),
                         kv_dtype=self.cfg.kv_storage)

    def fused(self, chunks: Sequence[Sequence[int]], question: str, mode: str = "blend",
              blend: BlendConfig | None = None) -> VLLMRequest:
        """A query over ``chunks`` in this order; ``mode="full"`` sends no parameters."""
        prompt = self.template.assemble(chunks, question)
        if mode == "full":
            return VLLMRequest(prompt, None, None)
        spans = tuple(Span(s, e, self.key_for(prompt.ids[s:e])) for s, e in prompt.chunk_spans)
        p = FusionParams(mode, prompt.prefix_len, spans, prompt.suffix_start,
                         self.cfg.precompute_context, blend or self.cfg.blend)
        return VLLMRequest(prompt, p.to_json(), fusion_salt(p, prompt.ids))

    def precompute(self, chunk: Sequence[int]) -> VLLMRequest:
        """A request whose prefill stores the chunk's KV (after the template prefix, or
        alone for ``cold``); send it with ``max_tokens=1``."""
        prefix = list(self.template.prefix_ids) if self.cfg.precompute_context == "prefix" else []
        ids = prefix + [int(t) for t in chunk]
        prompt = AssembledPrompt(ids, len(prefix), [(len(prefix), len(ids))], len(ids))
        p = FusionParams(context=self.cfg.precompute_context,
                         save=(Span(len(prefix), len(ids), self.key_for(chunk)),))
        return VLLMRequest(prompt, p.to_json(), None)
