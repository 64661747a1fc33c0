"""Cache keys: a digest of exactly what produced a chunk's KV (docs/design.md §3.2).

A key covers the model's weights (not its name), the KV layout version, the storage dtype, the
precompute context (cold, or the token ids the chunk was prefilled after: the shared prefix, or
the prefix and the anchor passage) and the chunk's own token ids. Keys are content-addressed,
so one chunk at any position in any query is one entry (two with ``anchor`` precompute: the
first position reads the prefix-context one), and they are stable across processes and
machines (no ``hash()``, no pickles: canonical JSON through SHA-256).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass

import torch

#: Bumped whenever the stored tensors change meaning or shape.
KV_LAYOUT = "ragkv-kv/1:k-pre-rope,v;[layers,kv_heads,tokens,head_dim]"
COLD_CONTEXT = "cold"


def _digest(payload: object) -> str:
    blob = json.dumps(payload, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(blob).hexdigest()


def model_fingerprint(model: torch.nn.Module) -> str:
    """SHA-256 over the config and every parameter's bytes, in name order.

    Hashing weights rather than a path or a name means a fine-tuned or re-quantized copy of
    "the same" model never reads another's KV.
    """
    h = hashlib.sha256()
    config = getattr(model, "config", None)
    if config is not None:
        cfg = config.to_dict()
        for volatile in ("_name_or_path", "_model_name_or_path", "transformers_version", "dtype",
                         "torch_dtype", "_attn_implementation_autoset", "use_cache"):
            cfg.pop(volatile, None)
        h.update(json.dumps(cfg, sort_keys=True, default=str).encode())
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().to("cpu").contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        # Raw bytes: numpy has no bfloat16 or float8, and a 0-d tensor cannot change its view.
        h.update(t.reshape(-1).view(torch.uint8).numpy().data)
    return h.hexdigest()


def context_digest(prefix_ids: Sequence[int] | None) -> str:
    """Name of the precompute context: ``cold`` or a digest of the token ids before the chunk."""
    if prefix_ids is None:
        return COLD_CONTEXT
    return "prefix:" + _digest([int(t) for t in prefix_ids])


def chunk_key(model_fp: str, token_ids: Sequence[int], *, context: str = COLD_CONTEXT,
              kv_dtype: str = "float16", layout: str = KV_LAYOUT) -> str:
    """The cache key of one chunk's KV (64 hex chars)."""
    return _digest({
        "layout": layout,
        "model": model_fp,
        "context": context,
        "dtype": kv_dtype,
        "ids": [int(t) for t in token_ids],
    })


def position_context(context: str, index: int) -> str:
    """The context the chunk at prompt position ``index`` (0 = right after the template
    prefix) is read in: with ``anchor`` precompute the first chunk uses its prefix-context
    entry, which is exact there, and every later chunk its anchor-context entry."""
    return "prefix" if context == "anchor" and index == 0 else context


def stored_contexts(context: str) -> tuple[str, ...]:
    """The entries ingestion stores per chunk for a precompute ``context``."""
    return ("prefix", "anchor") if context == "anchor" else (context,)


@dataclass(frozen=True)
class KeySpace:
    """Every key one engine and cache setting gives out: the only place keys are derived.

    fingerprint: the weights' identity (``model_fingerprint``, or ``vllm_fingerprint`` for KV
    that vLLM computes). kv_storage: the stored dtype tag (``RagkvConfig.kv_storage``).
    prefix_ids: the template prefix, the context chunks are precomputed after when
    ``context == "prefix"``; ``anchor_ids``: the anchor passage (and separator) that follows
    it when ``context == "anchor"`` (``PromptTemplate.anchor_ids``).
    """

    fingerprint: str
    kv_storage: str
    prefix_ids: tuple[int, ...]
    context: str = "prefix"
    anchor_ids: tuple[int, ...] = ()

    def before(self, context: str | None = None) -> tuple[int, ...]:
        """The token ids a chunk is prefilled after in ``context`` (none when cold)."""
        ctx = self.context if context is None else context
        if ctx == "anchor" and not self.anchor_ids:
            raise ValueError("anchor-context keys need the anchor's token ids")
        return {"cold": (), "prefix": self.prefix_ids,
                "anchor": self.prefix_ids + self.anchor_ids}[ctx]

    def context_name(self, context: str | None = None) -> str:
        """The precompute context a chunk key records: cold, or a digest of what came
        before the chunk (the same name :meth:`after` gives that span)."""
        before = self.before(context)
        return context_digest(before) if before else context_digest(None)

    def chunk(self, token_ids: Sequence[int], context: str | None = None) -> str:
        """Key of a chunk precomputed in ``context`` (default: this space's own)."""
        return chunk_key(self.fingerprint, token_ids, context=self.context_name(context),
                         kv_dtype=self.kv_storage)

    def twin(self, token_ids: Sequence[int], context: str) -> str | None:
        """Key of the entry an entry of ``context`` is scored against
        (:mod:`ragkv.engine.context_score`): an anchor entry's prefix-context twin; None for
        the other contexts, which are not scored."""
        return self.chunk(token_ids, "prefix") if context == "anchor" else None

    def at(self, token_ids: Sequence[int], index: int, context: str | None = None) -> str:
        """Key of the entry the chunk at prompt position ``index`` is read from."""
        ctx = self.context if context is None else context
        return self.chunk(token_ids, position_context(ctx, index))

    def exact(self, token_ids: Sequence[int]) -> str:
        """Key of a span computed from position 0 with nothing before it (the template
        prefix): a true prompt prefix, so its KV is exact wherever it is reused."""
        return chunk_key(self.fingerprint, token_ids, kv_dtype=self.kv_storage)

    def after(self, before: Sequence[int], token_ids: Sequence[int]) -> str:
        """Key of a span prefilled after exactly the tokens ``before`` (a precompute request
        names both, so the key is checked against what was really computed)."""
        ctx = context_digest(before) if len(before) else context_digest(None)
        return chunk_key(self.fingerprint, token_ids, context=ctx, kv_dtype=self.kv_storage)
