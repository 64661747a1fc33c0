"""``RagkvConnector``: CacheBlend inside vLLM V1 as a KV connector, loaded by module path.

    kv_transfer_config = {"kv_connector": "RagkvConnector",
                          "kv_connector_module_path": "ragkv.engine.vllm.connector",
                          "kv_role": "kv_both", "kv_load_failure_policy": "recompute",
                          "kv_connector_extra_config": {"ragkv": {<RagkvConfig fields>}}}

Scheduler side: a request whose ``kv_transfer_params`` name chunks (``params.py``) has every
position but the last claimed as external KV (beyond what vLLM's prefix cache already holds).
Worker side: before the step's forward, the chunks' KV is loaded from ragkv's store (a miss
is computed with vLLM's own weights and stored back), fused by ragkv's blend and written into
the paged cache. The blend computes the question suffix anyway (it is never cached, and the
query-aware policy reads its attention), so its suffix KV is written too and vLLM computes
only the last token, then decodes. A precompute request (``save``) is prefilled by vLLM and
its spans' KV stored.

NOTE: malformed parameters are refused on the scheduler side (the request runs as a plain
full prefill and its output's ``kv_transfer_params`` carries the error); a failure while
fusing reports the claimed blocks as failed loads, which vLLM recomputes.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorMetadata,
    KVConnectorRole,
    KVConnectorWorkerMetadata,
)

from ragkv.config import RagkvConfig
from ragkv.engine.vllm.paged import (
    PagedAttention,
    check_layout,
    read_paged,
    slots,
    write_paged,
)
from ragkv.engine.vllm.params import (
    FusionParams,
    ParamsError,
    Span,
    fusion_salt,
    parse,
    vllm_fingerprint,
)
from ragkv.engine.vllm.worker import WorkerFusion

if TYPE_CHECKING:
    from vllm.v1.request import Request

log = logging.getLogger("ragkv.vllm")


@dataclass
class LoadReq:
    req_id: str
    ids: list[int]
    block_ids: list[int]
    lo: int  # first position to write (what vLLM's prefix cache holds comes before)
    hi: int  # first position vLLM computes itself (the prompt's last)
    params: FusionParams


@dataclass
class SaveReq:
    req_id: str
    ids: list[int]
    block_ids: list[int]
    spans: tuple[Span, ...]
    computed_until: int  # positions [0, computed_until) hold KV after this step


@dataclass
class RagkvMeta(KVConnectorMetadata):
    loads: list[LoadReq] = field(default_factory=list)
    saves: list[SaveReq] = field(default_factory=list)


@dataclass
class RagkvWorkerMeta(KVConnectorWorkerMetadata):
    traces: dict[str, dict] = field(default_factory=dict)

    def aggregate(self, other: KVConnectorWorkerMetadata) -> KVConnectorWorkerMetadata:
        if isinstance(other, RagkvWorkerMeta):
            self.traces.update(other.traces)
        return self


def ragkv_config(extra: dict[str, Any]) -> RagkvConfig:
    return RagkvConfig(**dict(extra.get("ragkv") or {}))


class RagkvConnector(KVConnectorBase_V1):
    def __init__(self, vllm_config, role: KVConnectorRole, kv_cache_config=None) -> None:
        super().__init__(vllm_config, role, kv_cache_config)
        self._block_size = vllm_config.cache_config.block_size
        self._cfg = ragkv_config(self._kv_transfer_config.kv_connector_extra_config or {})
        mc = vllm_config.model_config
        self._fingerprint = vllm_fingerprint(mc.model, str(mc.dtype).removeprefix("torch."))
        # scheduler side
        self._matched: dict[str, tuple[FusionParams, int, int]] = {}
        self._pending: dict[str, tuple[Request, FusionParams, int, int]] = {}
        self._saves: dict[str, FusionParams] = {}
        self._notes: dict[str, dict] = {}
        # notes handed out by request_finished this step: the worker's trace of a request
        # that finishes in the step it was fused in (a one-token request) arrives after it.
        self._handed: dict[str, dict] = {}
        self._worked: set[str] = set()  # requests the worker fused or saved for
        # worker side
        self._fusion: WorkerFusion | None = None
        self._layers: list[str] = []
        self._traces: dict[str, dict] = {}
        self._failed: set[int] = set()
        self._layout_ok: bool | None = None
        self._paged_ok: bool | None = None  # vLLM's attention kernel proven usable
        self._captured: dict[str, dict[int, tuple[torch.Tensor, torch.Tensor]]] = {}

    # ==============================
    # Scheduler side
    # ==============================
    def _params(self, request: Request) -> FusionParams | None:
        ids = list(request.prompt_token_ids or [])
        try:
            p = parse(request.kv_transfer_params, len(ids))
            if p is not None and p.fused and request.cache_salt != fusion_salt(p, ids):
                raise ParamsError("a fused request needs cache_salt = fusion_salt(params, ids) "
                                  "so that vLLM's prefix cache keeps fused KV apart")
            return p
        except ParamsError as exc:
            if request.request_id not in self._notes:
                log.error("request %s: ragkv parameters refused (%s); full prefill instead",
                          request.request_id, exc)
            self._notes[request.request_id] = {"error": str(exc), "fallback": "full prefill"}
            return None

    def get_num_new_matched_tokens(self, request: Request,
                                   num_computed_tokens: int) -> tuple[int | None, bool]:
        p = self._params(request)
        if p is None:
            return 0, False
        if p.save:
            self._saves[request.request_id] = p
        if not p.fused or num_computed_tokens >= p.suffix_start:
            return 0, False  # only question tokens left: vLLM's own prefill is exact there
        # vLLM must compute at least one token; the blend has computed the rest of the suffix.
        hi = len(request.prompt_token_ids or []) - 1
        self._matched[request.request_id] = (p, num_computed_tokens, hi)
        return hi - num_computed_tokens, False

    def update_state_after_alloc(self, request: Request, blocks, num_external_tokens: int):
        matched = self._matched.pop(request.request_id, None)
        if num_external_tokens > 0 and matched is not None:
            self._pending[request.request_id] = (request, *matched)

    def build_connector_meta(self, scheduler_output) -> KVConnectorMetadata:
        meta = RagkvMeta()
        for new in scheduler_output.scheduled_new_reqs:
            ids = list(new.prompt_token_ids or [])
            blocks = list(new.block_ids[0])
            if new.req_id in self._pending:
                _, p, lo, hi = self._pending.pop(new.req_id)
                meta.loads.append(LoadReq(new.req_id, ids, blocks, lo, hi, p))
                self._worked.add(new.req_id)
            p = self._saves.pop(new.req_id, None)
            if p is not None:
                done = new.num_computed_tokens + scheduler_output.num_scheduled_tokens[new.req_id]
                meta.saves.append(SaveReq(new.req_id, ids, blocks, p.save, done))
                self._worked.add(new.req_id)
        self._pending.clear()
        self._handed.clear()
        return meta

    def update_connector_output(self, connector_output) -> None:
        wm = getattr(connector_output, "kv_connector_worker_meta", None)
        if isinstance(wm, RagkvWorkerMeta):
            for rid, trace in wm.traces.items():
                handed = self._handed.get(rid)
                if handed is not None:
                    handed.update(trace)  # not serialized yet: the output leaves after this
                else:
                    self._notes.setdefault(rid, {}).update(trace)
        self._handed.clear()

    def request_finished(self, request: Request, block_ids: list[int]):
        self._matched.pop(request.request_id, None)
        self._saves.pop(request.request_id, None)
        note = self._notes.pop(request.request_id, None)
        if request.request_id in self._worked:
            self._worked.discard(request.request_id)
            note = note if note is not None else {}
            self._handed[request.request_id] = note
            return False, {"ragkv": note}
        return False, ({"ragkv": note} if note else None)

    # ==============================
    # Worker side
    # ==============================
    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        def layer_no(name: str) -> int:
            return int(name.split("layers.")[1].split(".")[0])

        self._layers = sorted(kv_caches, key=layer_no)

    @property
    def fusion(self) -> WorkerFusion:
        if self._fusion is None:
            self._fusion = WorkerFusion(self._cfg, self._fingerprint)
        return self._fusion

    def start_load_kv(self, forward_context, **kwargs: Any) -> None:
        meta = self._get_connector_metadata()
        assert isinstance(meta, RagkvMeta)
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
                bs = self._block_size
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
        return PagedAttention(layers, req.block_ids, self._block_size, req.lo, len(req.ids))

    def _write(self, forward_context, req: LoadReq, fused,
               paged: PagedAttention | None) -> None:
        t = time.perf_counter()
        slot = slots(req.block_ids, self._block_size, req.lo, req.hi)
        layers = forward_context.no_compile_layers
        write_paged([layers[name] for name in self._layers], fused.k, fused.v, slot, req.lo,
                    req.hi, skip=paged.written if paged is not None else None)
        self._traces.setdefault(req.req_id, {})["write_s"] = time.perf_counter() - t

    def wait_for_layer_load(self, layer_name: str) -> None:
        return  # loads finish inside start_load_kv, before the forward

    def save_kv_layer(self, layer_name: str, kv_layer: torch.Tensor, attn_metadata,
                      **kwargs: Any) -> None:
        if not self.has_connector_metadata():
            return
        meta = self._get_connector_metadata()
        if not isinstance(meta, RagkvMeta) or not meta.saves:
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
                    slot = slots(req.block_ids, self._block_size, span.start, span.end)
                    k, v = read_paged(kv_layer, slot.to(kv_layer.device))
                    self._captured.setdefault(f"{req.req_id}/{j}", {})[idx] = (
                        k.to("cpu", copy=True), v.to("cpu", copy=True))

    def wait_for_save(self) -> None:
        if not self.has_connector_metadata():
            return
        meta = self._get_connector_metadata()
        if not isinstance(meta, RagkvMeta):
            return
        for req in meta.saves:
            trace = self._traces.setdefault(req.req_id, {})
            for j, span in enumerate(req.spans):
                got = self._captured.pop(f"{req.req_id}/{j}", None)
                if got is None or len(got) != len(self._layers):
                    continue
                try:
                    self.fusion.store_captured(req.ids, span, got)
                    trace["saved"] = trace.get("saved", 0) + 1
                except Exception as exc:  # noqa: BLE001 - a failed save is a later miss
                    log.warning("request %s: span not saved (%s)", req.req_id, exc)
                    trace["save_error"] = str(exc)

    def get_block_ids_with_load_errors(self) -> set[int]:
        failed, self._failed = self._failed, set()
        return failed

    def build_connector_worker_meta(self) -> KVConnectorWorkerMetadata | None:
        if not self._traces:
            return None
        traces, self._traces = self._traces, {}
        return RagkvWorkerMeta(traces)
