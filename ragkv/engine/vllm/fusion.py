"""The fusion inside vLLM's worker: chunk KV in (or computed and stored back), fused with
vLLM's weights by the same planner and blend as the transformers engine.

Runs in vLLM's worker process, inside the connector's ``start_load_kv`` (before the step's
forward) or ``wait_for_save`` (storing a precompute request's spans).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch

from ragkv.cache_index import KVStore
from ragkv.config import RagkvConfig
from ragkv.engine.blend import FusedPrefill, compute_span, fuse
from ragkv.engine.chunk_store import ChunkStore, KVShape
from ragkv.engine.kv import ChunkKV
from ragkv.engine.loading import Workspace
from ragkv.engine.plan import chunks_to_load, exact_end, plan_prefill, scores_of
from ragkv.engine.vllm.paged import PagedAttention
from ragkv.engine.vllm.params import FusionParams, Span
from ragkv.engine.vllm.runner import VLLMRunner
from ragkv.keys import KeySpace, position_context


class WorkerFusion:
    """Loads (or computes and stores back) chunk KV and runs the blend with vLLM's weights."""

    def __init__(self, cfg: RagkvConfig, fingerprint: str) -> None:
        self.cfg, self.fingerprint = cfg, fingerprint
        self.store = KVStore.from_config(cfg)
        self._runner: VLLMRunner | None = None
        self._chunks: ChunkStore | None = None
        # the fused KV is in vLLM's paged cache before the next request is fused
        self.workspace = Workspace()

    @property
    def runner(self) -> VLLMRunner:
        if self._runner is None:
            from ragkv.engine.vllm.models import latest_model

            model = latest_model()
            if model is None:
                raise RuntimeError("no model recorded by ragkv's vLLM plugin in this process; "
                                   "is ragkv installed in vLLM's environment (entry points)?")
            self._runner = VLLMRunner(model)
        return self._runner

    @property
    def chunks(self) -> ChunkStore:
        if self._chunks is None:
            r = self.runner
            self._chunks = ChunkStore(self.store, self.fingerprint,
                                      KVShape(r.n_layers, r.kv_heads, r.head_dim),
                                      self.cfg.kv_dtype, self.cfg.int8_codec)
        return self._chunks

    def keys(self, prefix: list[int], anchor: tuple[int, ...] = ()) -> KeySpace:
        return KeySpace(self.fingerprint, self.cfg.kv_storage, tuple(prefix),
                        anchor_ids=anchor)

    def _get(self, ids: list[int], key: str, past: Callable[[], ChunkKV | None] = lambda: None,
             reference: str | None = None, record: bool = True,
             reference_past: Callable[[], ChunkKV | None] = lambda: None,
             ) -> tuple[ChunkKV, str | None]:
        """``past``: what a miss is prefilled after (asked only on a miss); ``reference``: the
        entry a miss is scored against (``ChunkStore.get_or_compute``), prefilled after
        ``reference_past`` where it is missing too; ``record=False``: a hit is not counted as
        a use."""
        r = self.runner
        # read only: placed into the fused buffers, or read as the past of a missing chunk;
        # both convert to the model's dtype as they copy (a conversion here cost a fresh copy
        # of every chunk on every request with fp16 storage)
        kv, tier = self.chunks.get_or_compute(
            key, len(ids), lambda: compute_span(r, torch.tensor(ids, device=r.device), past()),
            shared=True, reference=reference, ids=ids, record=record,
            compute_reference=lambda: compute_span(r, torch.tensor(ids, device=r.device),
                                                   reference_past()))
        if kv.k.device != r.device:
            kv = kv.to(r.device, kv.k.dtype)
        return kv, tier

    def _load(self, ids: list[int], p: FusionParams, wanted: range, trace: dict[str, Any],
              ) -> tuple[list[tuple[int, ChunkKV]], list[list[Any]], float, float]:
        """The prompt's cached spans ``(start, KV)`` (the template prefix first, then the
        ``wanted`` chunks), each chunk's ``[hit, tier, recomputed]``, and seconds spent loading
        and precomputing."""
        prefix = ids[:p.prefix_end]
        keys = self.keys(prefix, p.anchor)
        prefix_kv, tier = self._get(prefix, keys.exact(prefix), record=not p.again)
        trace["prefix_hit"] = tier is not None
        pasts: dict[str, ChunkKV | None] = {"cold": None, "prefix": prefix_kv}

        def past(ctx: str) -> ChunkKV | None:  # the anchor's KV only when a chunk misses
            if ctx not in pasts:
                before = list(keys.before(ctx))
                pasts[ctx] = self._get(before, keys.exact(before))[0]
            return pasts[ctx]
        cached: list[tuple[int, ChunkKV]] = [(0, prefix_kv)]
        per_chunk: list[list[Any]] = []
        load_s = precompute_s = 0.0
        for i in wanted:
            span = p.chunks[i]
            chunk = ids[span.start:span.end]
            ctx = position_context(p.context, i)
            if keys.chunk(chunk, ctx) != span.key:
                raise ValueError(f"chunk key {span.key[:12]} does not name the tokens at "
                                 f"[{span.start}, {span.end}) for this model and settings")
            t = time.perf_counter()
            kv, tier = self._get(chunk, span.key, lambda ctx=ctx: past(ctx),
                                 keys.twin(chunk, ctx), record=not p.again,
                                 reference_past=lambda: past("prefix"))
            if tier is None:
                precompute_s += time.perf_counter() - t
            else:
                load_s += time.perf_counter() - t
            per_chunk.append([tier is not None, tier, 0])
            cached.append((span.start, kv))
        return cached, per_chunk, load_s, precompute_s

    # ---- the fused prefill ------------------------------------------------------------
    def fuse(self, ids: list[int], p: FusionParams, trace: dict[str, Any],
             paged: PagedAttention | None = None) -> FusedPrefill:
        """Fused K/V of the whole prompt ``ids`` (keys rotated to their positions); with
        ``paged``, attention runs on vLLM's kernel and writes each layer's KV as it goes.
        ``trace`` gets what the client's :class:`~ragkv.trace.QueryTrace` shows."""
        r = self.runner
        wanted = chunks_to_load(p.mode, p.context, len(p.chunks))
        t0 = time.perf_counter()
        with self.chunks.store.batched_hits() as hits:  # in one index transaction
            cached, per_chunk, load_s, precompute_s = self._load(ids, p, wanted, trace)
            t1 = time.perf_counter()
        trace["lookup_s"] = t1 - t0 - load_s - precompute_s
        trace["load_s"] = load_s + hits.seconds
        trace["precompute_s"] = precompute_s
        spans = [(s.start, s.end) for s in p.chunks]
        exact = exact_end(p.prefix_end, spans, p.context, wanted)
        plan = plan_prefill(len(ids), spans, p.suffix_start,
                            [(s, kv.n_tokens) for s, kv in cached], exact, p.mode, p.blend,
                            r.n_layers, scores_of(cached))
        t1 = time.perf_counter()
        with torch.inference_mode(), r.on_paged_cache(paged):
            out = fuse(r, torch.tensor(ids, device=r.device), cached, plan.ctx, plan.policy,
                       deviation_on=p.blend.deviation_on, workspace=self.workspace,
                       record=p.record, correction=plan.correction,
                       logits=False)  # vLLM computes the last position itself
        trace["fuse_s"] = time.perf_counter() - t1
        trace["attention"] = "vllm" if paged is not None else "ragkv"
        final = out.final_positions.cpu()
        for entry, (s, e) in zip(per_chunk, spans, strict=False):
            entry[2] = int(((final >= s) & (final < e)).sum())
        trace["chunks"] = per_chunk
        trace["recomputed_per_layer"] = list(out.recomputed_per_layer)
        # what the client's loading controller reads to answer ``ratio="auto"``
        trace["chunk_tokens"] = plan.ctx.chunk_tokens
        trace["place_s"], trace["layer_s"] = list(out.place_s), list(out.layer_s)
        trace["guard_tokens"] = out.guard_tokens
        trace["recomputed"] = sum(c[2] for c in per_chunk)
        trace["hits"] = sum(1 for c in per_chunk if c[0])
        trace["misses"] = len(per_chunk) - trace["hits"]
        if p.record:
            trace["layer_sets"] = [ls.tolist() for ls in out.layer_sets]
        return out

    # ---- storing what vLLM prefilled --------------------------------------------------
    def unrotate(self, k: torch.Tensor, lo: int) -> torch.Tensor:
        """Keys ``[layers, kv_heads, n, head_dim]`` read at positions ``lo..`` back to pre-RoPE."""
        r = self.runner
        cos, sin = r.cos_sin(torch.arange(lo, lo + k.shape[2], device=r.device))
        return r.rotate(k.to(r.dtype), cos, -sin)

    def store_captured(self, ids: list[int], span: Span,
                       got: dict[int, tuple[torch.Tensor, torch.Tensor]],
                       reference_end: int = 0) -> None:
        """Store a precompute span from per-layer K/V read from vLLM's cache (post-RoPE keys),
        once its key is proven to name those tokens after the ones before them; with
        ``reference_end``, scored against the same tokens' entry after ``ids[:reference_end]``
        (whose key is derived here from the tokens, so a request cannot name a foreign one)."""
        before, chunk = ids[:span.start], ids[span.start:span.end]
        if self.keys(before).after(before, chunk) != span.key:
            raise ValueError(f"key {span.key[:12]} does not name [{span.start}, {span.end}) "
                             "after the tokens before it")
        k = torch.stack([got[i][0] for i in range(len(got))])
        v = torch.stack([got[i][1] for i in range(len(got))])
        ref = None
        if 0 < reference_end < span.start:
            ref_ids = ids[:reference_end]
            ref = self.keys(ref_ids).after(ref_ids, chunk)
        self.chunks.save(span.key, ChunkKV(self.unrotate(k, span.start), v.to(self.runner.dtype)),
                         ref, ids=chunk)
