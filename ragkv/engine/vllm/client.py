"""Building connector requests: prompt ids, ``kv_transfer_params`` and the cache salt.

No vLLM import: an application talking to a served vLLM over HTTP builds its requests here.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ragkv.config import BlendConfig
from ragkv.engine.vllm.params import PARAMS_KEY, FusionParams, Span, fusion_salt
from ragkv.keys import KeySpace
from ragkv.prompt import AssembledPrompt, PromptTemplate


@dataclass
class VLLMRequest:
    """What to send: ``prompt_token_ids``, ``kv_transfer_params`` and ``cache_salt``
    (None: vLLM's prefix cache may serve the prompt's exact leading blocks)."""

    ids: list[int]
    kv_transfer_params: dict[str, Any] | None
    cache_salt: str | None


class RequestBuilder:
    """Requests for one model served by vLLM with ragkv's connector; ``keys`` must be the
    connector's key space (its fingerprint and storage), so both name KV alike."""

    def __init__(self, template: PromptTemplate, keys: KeySpace) -> None:
        self.template, self.keys = template, keys

    def prompt(self, prompt: AssembledPrompt, keys: Sequence[str], mode: str,
               blend: BlendConfig, context: str, record: bool = False) -> VLLMRequest:
        """A request for an assembled prompt whose chunks have ``keys``.

        ``full``: nothing reused, not even vLLM's prefix cache (a unique salt), so every
        position is prefilled; ``prefix``: vLLM's own prefix cache serves the exact leading
        blocks (the template prefix, a first chunk seen before); ``reuse``/``blend``: the
        connector fuses the chunks' stored KV.
        """
        if mode == "full":
            return VLLMRequest(list(prompt.ids), None, "ragkv-cold:" + uuid.uuid4().hex)
        if mode == "prefix" or not prompt.chunk_spans:  # (no chunks: nothing to fuse)
            return VLLMRequest(list(prompt.ids), None, None)
        spans = tuple(Span(s, e, k) for (s, e), k in zip(prompt.chunk_spans, keys, strict=True))
        p = FusionParams(mode, prompt.prefix_len, spans, prompt.suffix_start, context, blend,
                         record=record,
                         anchor=self.keys.anchor_ids if context == "anchor" else ())
        return VLLMRequest(list(prompt.ids), p.to_json(), fusion_salt(p, prompt.ids))

    @staticmethod
    def again(req: VLLMRequest) -> VLLMRequest:
        """``req`` sent again for the rest of its answer: a fused prompt marked so, which the
        connector fuses without counting its chunks' reads as uses a second time."""
        body = (req.kv_transfer_params or {}).get(PARAMS_KEY) or {}
        if "chunks" not in body:
            return req
        return VLLMRequest(req.ids, {PARAMS_KEY: {**body, "again": True}}, req.cache_salt)

    def fused(self, chunks: Sequence[Sequence[int]], question: str, mode: str = "blend",
              blend: BlendConfig | None = None, context: str | None = None) -> VLLMRequest:
        """A query over ``chunks`` in this order (keys derived here)."""
        ctx = context or self.keys.context
        prompt = self.template.assemble(chunks, question)
        keys = [self.keys.at(prompt.ids[s:e], i, ctx)
                for i, (s, e) in enumerate(prompt.chunk_spans)]
        return self.prompt(prompt, keys, mode, blend or BlendConfig(), ctx)

    def precompute(self, chunk: Sequence[int], context: str | None = None) -> VLLMRequest:
        """A request whose prefill stores the chunk's KV (after the template prefix, after it
        and the anchor passage, or alone for ``cold``); send it with ``max_tokens=1``."""
        ctx = context or self.keys.context
        prefix = list(self.keys.before(ctx))
        ids = prefix + [int(t) for t in chunk]
        # an anchor entry is scored against its prefix-context twin (context_score.py)
        ref = len(self.keys.prefix_ids) if ctx == "anchor" else 0
        p = FusionParams(context=ctx, save=(Span(len(prefix), len(ids),
                                                 self.keys.chunk(chunk, ctx)),),
                         reference_end=ref)
        return VLLMRequest(ids, p.to_json(), None)

    @staticmethod
    def describe(probe: Sequence[int]) -> VLLMRequest:
        """Ask the connector who it is (model identity, storage, cache); ``probe``: any
        one-token prompt."""
        return VLLMRequest(list(probe), FusionParams(describe=True).to_json(), None)

    @staticmethod
    def contains(keys: Sequence[str], probe: Sequence[int]) -> VLLMRequest:
        return VLLMRequest(list(probe), FusionParams(contains=tuple(keys)).to_json(), None)
