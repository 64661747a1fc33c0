"""Worker side of ragkv's connector: fuse before the step's forward, save what vLLM prefilled.

Runs in vLLM's worker process. ``start_load_kv`` fuses every request the scheduler side
claimed positions for and writes the result into vLLM's paged cache; ``save_kv_layer`` reads
a precompute request's spans from each layer's cache and ``wait_for_save`` stores them.

NOTE: a failure while fusing (for instance a key that does not name the tokens at its span)
reports the claimed blocks as failed loads, which vLLM recomputes: never the engine's failure.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import torch

from ragkv.config import RagkvConfig
from ragkv.engine.vllm.fusion import WorkerFusion
from ragkv.engine.vllm.meta import LoadReq, RagkvMeta, RagkvWorkerMeta
from ragkv.engine.vllm.paged import PagedAttention, check_layout, read_paged, slots, write_paged

log = logging.getLogger("ragkv.vllm")


class ConnectorWorker:
    def __init__(self, cfg: RagkvConfig, fingerprint: str, block_size: int) -> None:
        self.cfg, self.fingerprint, self.block_size = cfg, fingerprint, block_size
        self._fusion: WorkerFusion | None = None
        self._layers: list[str] = []
        self._traces: dict[str, dict] = {}
        self._failed: set[int] = set()
        self._layout_ok: bool | None = None
        self._paged_ok: bool | None = None  # vLLM's attention kernel proven usable
        self._captured: dict[str, dict[int, tuple[torch.Tensor, torch.Tensor]]] = {}

    @property
    def fusion(self) -> WorkerFusion:
        if self._fusion is None:
            self._fusion = WorkerFusion(self.cfg, self.fingerprint)
        return self._fusion

    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        def layer_no(name: str) -> int:
            return int(name.split("layers.")[1].split(".")[0])

        self._layers = sorted(kv_caches, key=layer_no)

    # ---- fusing before the forward ----------------------------------------------------
    def start_load_kv(self, meta: RagkvMeta, forward_context) -> None:
        for req in meta.loads:
            trace: dict[str, Any] = {"hits": 0, "misses": 0, "mode": req.params.mode}
            self._traces[req.req_id] = trace
            try:
                paged = self._paged(forward_context, req)
                fused = self.fusion.fuse(req.ids, req.params, trace, paged)
                self._write(forward_context, req, fused, paged)
            except Exception as exc:  # noqa: BLE001 - never the engine's failure
                log.exception("request %s: ragkv fusion failed; vLLM recomputes", req.req_id)
                trace["error"] = f"fusion failed: {exc}"
                trace["fallback"] = "recompute"
                bs = self.block_size
                self._failed.update(req.block_ids[req.lo // bs:(req.hi + bs - 1) // bs])

    def _paged(self, forward_context, req: LoadReq) -> PagedAttention | None:
        """The blend's attention on vLLM's kernel over this request's blocks, if the backend
        is one ragkv knows and a scratch probe matched the reference (checked once)."""
        layers = [forward_context.no_compile_layers[name] for name in self._layers]
        if self._paged_ok is None:
            first = layers[0]
            self._paged_ok = (PagedAttention.supported(first)
                              and PagedAttention.probe(first, self.fusion.runner.scaling))
            if not self._paged_ok:
                log.warning("fused layers attend through ragkv's own kernels (vLLM's attention "
                            "backend is not one ragkv can call)")
        if not self._paged_ok:
            return None
        return PagedAttention(layers, req.block_ids, self.block_size, req.lo, len(req.ids))

    def _write(self, forward_context, req: LoadReq, fused,
               paged: PagedAttention | None) -> None:
        t = time.perf_counter()
        slot = slots(req.block_ids, self.block_size, req.lo, req.hi)
        layers = forward_context.no_compile_layers
        write_paged([layers[name] for name in self._layers], fused.k, fused.v, slot, req.lo,
                    req.hi, skip=paged.written if paged is not None else None)
        self._traces.setdefault(req.req_id, {})["write_s"] = time.perf_counter() - t

    # ---- saving what vLLM prefilled ---------------------------------------------------
    def save_kv_layer(self, meta: RagkvMeta, layer_name: str, kv_layer: torch.Tensor) -> None:
        if not meta.saves:
            return
        if self._layout_ok is None:
            from vllm.forward_context import get_forward_context

            layer = get_forward_context().no_compile_layers[layer_name]
            self._layout_ok = check_layout(layer, kv_layer)
            if not self._layout_ok:
                log.warning("this attention backend's KV cache layout is unknown to ragkv: "
                            "precompute through vLLM is off (misses are still computed)")
        if not self._layout_ok:
            return
        idx = self._layers.index(layer_name)
        for req in meta.saves:
            for j, span in enumerate(req.spans):
                if span.end <= req.computed_until:
                    slot = slots(req.block_ids, self.block_size, span.start, span.end)
                    k, v = read_paged(kv_layer, slot.to(kv_layer.device))
                    self._captured.setdefault(f"{req.req_id}/{j}", {})[idx] = (
                        k.to("cpu", copy=True), v.to("cpu", copy=True))

    def wait_for_save(self, meta: RagkvMeta) -> None:
        for req in meta.saves:
            trace = self._traces.setdefault(req.req_id, {})
            for j, span in enumerate(req.spans):
                got = self._captured.pop(f"{req.req_id}/{j}", None)
                if got is None or len(got) != len(self._layers):
                    continue
                try:
                    self.fusion.store_captured(req.ids, span, got, req.reference_end)
                    trace["saved"] = trace.get("saved", 0) + 1
                except Exception as exc:  # noqa: BLE001 - a failed save is a later miss
                    log.warning("request %s: span not saved (%s)", req.req_id, exc)
                    trace["save_error"] = str(exc)

    # ---- reporting --------------------------------------------------------------------
    def failed_blocks(self) -> set[int]:
        failed, self._failed = self._failed, set()
        return failed

    def worker_meta(self) -> RagkvWorkerMeta | None:
        if not self._traces:
            return None
        traces, self._traces = self._traces, {}
        return RagkvWorkerMeta(traces)
