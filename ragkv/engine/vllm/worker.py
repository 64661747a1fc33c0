"""Worker side of the connector: chunk KV in, fused, written into vLLM's paged KV cache.

Everything here runs in vLLM's worker process, inside ``start_load_kv`` (before the step's
forward) or ``save_kv_layer`` (after each layer's attention).
"""

from __future__ import annotations

import logging
import time

import torch

from ragkv.cache_index import KVStore
from ragkv.config import RagkvConfig
from ragkv.engine.blend import FusedPrefill, compute_span, fuse
from ragkv.engine.kv import ChunkKV
from ragkv.engine.loading import Workspace
from ragkv.engine.policies import SelectionContext, SelectionPolicy, make_policy
from ragkv.engine.vllm.paged import PagedAttention
from ragkv.engine.vllm.params import FusionParams, Span
from ragkv.engine.vllm.runner import VLLMRunner
from ragkv.keys import KV_LAYOUT, chunk_key, context_digest

log = logging.getLogger("ragkv.vllm")


class WorkerFusion:
    """Loads (or computes and stores back) chunk KV and runs the blend with vLLM's weights."""

    def __init__(self, cfg: RagkvConfig, fingerprint: str) -> None:
        self.cfg, self.fingerprint = cfg, fingerprint
        self.store = KVStore.from_config(cfg)
        self._runner: VLLMRunner | None = None
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

    # ---- chunk KV ---------------------------------------------------------------------
    def _shape(self, n: int) -> dict[str, int]:
        r = self.runner
        return dict(layers=r.n_layers, kv_heads=r.kv_heads, head_dim=r.head_dim, n_tokens=n)

    def load(self, key: str, n: int) -> ChunkKV | None:
        # read only: placed into the fused buffers, or read as the past of a missing chunk
        found = self.store.fetch(key, model_fp=self.fingerprint, layout=KV_LAYOUT, shared=True)
        if found is None:
            return None
        try:
            return ChunkKV.from_tensors(found.tensors, **self._shape(n))
        except (KeyError, ValueError) as exc:  # foreign or damaged: a miss
            log.warning("cache entry %s unusable (%s); recomputing", key[:12], exc)
            self.store.delete(key)
            return None

    def save(self, key: str, kv: ChunkKV) -> None:
        codec = self.cfg.int8_codec
        dtype = "float32" if codec is not None else self.cfg.kv_dtype
        self.store.put(key, kv.to_tensors(dtype), model_fp=self.fingerprint, layout=KV_LAYOUT,
                       n_tokens=kv.n_tokens, codec=codec)

    def key(self, ids: list[int], context: str | None) -> str:
        return chunk_key(self.fingerprint, ids, context=context or context_digest(None),
                         kv_dtype=self.cfg.kv_storage)

    def get_or_compute(self, ids: list[int], key: str, past: ChunkKV | None,
                       trace: dict) -> ChunkKV:
        r = self.runner
        kv = self.load(key, len(ids))
        if kv is None:
            kv = compute_span(r, torch.tensor(ids, device=r.device), past)
            self.save(key, kv)
            trace["misses"] += 1
        else:
            trace["hits"] += 1
        return kv.to(r.device, r.dtype)

    # ---- the fused prefill ------------------------------------------------------------
    def fuse(self, ids: list[int], p: FusionParams, trace: dict,
             paged: PagedAttention | None = None) -> FusedPrefill:
        """Fused K/V of the whole prompt ``ids`` (keys rotated to their positions); with
        ``paged``, attention runs on vLLM's kernel and writes each layer's KV as it goes."""
        r = self.runner
        t0 = time.perf_counter()
        prefix = ids[:p.prefix_end]
        prefix_kv = self.get_or_compute(prefix, self.key(prefix, None), None, trace)
        ctx_name = context_digest(prefix) if p.context == "prefix" else None
        past = prefix_kv if p.context == "prefix" else None
        cached: list[tuple[int, ChunkKV]] = [(0, prefix_kv)]
        exact_until = p.prefix_end
        for span in p.chunks:
            chunk = ids[span.start:span.end]
            if self.key(chunk, ctx_name) != span.key:
                raise ValueError(f"chunk key {span.key[:12]} does not name the tokens at "
                                 f"[{span.start}, {span.end}) for this model and settings")
            cached.append((span.start, self.get_or_compute(chunk, span.key, past, trace)))
            if p.context == "prefix" and span.start == p.prefix_end:
                exact_until = span.end  # computed after the same prefix at the same positions
        trace["load_s"] = time.perf_counter() - t0
        T = len(ids)
        forced = torch.ones(T, dtype=torch.bool)
        for start, kv in cached:
            forced[start:start + kv.n_tokens] = False
        forced[:exact_until] = False
        spans = [(s.start, s.end) for s in p.chunks if s.start >= exact_until]
        ratio = float(p.blend.ratio) if p.mode == "blend" else 0.0
        ctx = SelectionContext(T, exact_until, spans, forced, ratio, p.suffix_start)
        policy = (make_policy(p.blend, r.n_layers) if p.mode == "blend"
                  else SelectionPolicy())
        t1 = time.perf_counter()
        with torch.inference_mode(), r.on_paged_cache(paged):
            out = fuse(r, torch.tensor(ids, device=r.device), cached, ctx, policy,
                       deviation_on=p.blend.deviation_on, workspace=self.workspace)
        trace["fuse_s"] = time.perf_counter() - t1
        trace["attention"] = "vllm" if paged is not None else "ragkv"
        in_chunk = torch.zeros(T, dtype=torch.bool)
        for s in p.chunks:
            in_chunk[s.start:s.end] = True
        trace["recomputed"] = int(in_chunk[out.final_positions.cpu()].sum())
        trace["context_tokens"] = T
        return out

    def unrotate(self, k: torch.Tensor, lo: int) -> torch.Tensor:
        """Keys ``[layers, kv_heads, n, head_dim]`` read at positions ``lo..`` back to pre-RoPE."""
        r = self.runner
        cos, sin = r.cos_sin(torch.arange(lo, lo + k.shape[2], device=r.device))
        return r.rotate(k.to(r.dtype), cos, -sin)

    def store_span(self, span: Span, k_post: torch.Tensor, v: torch.Tensor) -> None:
        """Store a span's KV read from vLLM's cache (post-RoPE keys)."""
        self.save(span.key, ChunkKV(self.unrotate(k_post, span.start), v.to(self.runner.dtype)))

    def store_captured(self, ids: list[int], span: Span,
                       got: dict[int, tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Store a precompute span from per-layer K/V read from vLLM's cache, once its key is
        proven to name those tokens after the ones before them."""
        before = ids[:span.start]
        ctx = context_digest(before) if before else None
        if self.key(ids[span.start:span.end], ctx) != span.key:
            raise ValueError(f"key {span.key[:12]} does not name [{span.start}, {span.end}) "
                             "after the tokens before it")
        k = torch.stack([got[i][0] for i in range(len(got))])
        v = torch.stack([got[i][1] for i in range(len(got))])
        self.store_span(span, k, v)
