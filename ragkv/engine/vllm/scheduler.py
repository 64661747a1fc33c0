"""Scheduler side of ragkv's connector: which prompt positions a request's fusion provides,
what the worker is told to do this step, and what goes back to the client.

Runs in vLLM's engine-core process. A fused request has every position but the last claimed
as external KV (beyond what vLLM's prefix cache already holds); a precompute request is
prefilled by vLLM and its spans saved; ``describe`` and ``contains`` questions are answered
from here, in the request's output ``kv_transfer_params``.

NOTE: malformed parameters are refused here: the request runs as a plain full prefill and
its output carries ``{"ragkv": {"error": ..., "fallback": "full prefill"}}``.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from ragkv.cache_index import KVStore
from ragkv.config import RagkvConfig, masked_url
from ragkv.engine.vllm.meta import LoadReq, RagkvMeta, RagkvWorkerMeta, SaveReq
from ragkv.engine.vllm.params import (
    FusionParams,
    ParamsError,
    fusion_salt,
    parse,
    tokenizer_digest,
)
from ragkv.keys import KV_LAYOUT

if TYPE_CHECKING:
    from vllm.v1.request import Request

log = logging.getLogger("ragkv.vllm")

#: finished requests remembered so that a worker trace arriving after its request's output
#: is dropped, not kept (far more than one step's worth of requests)
FINISHED_MEMORY = 4096


class ConnectorScheduler:
    def __init__(self, cfg: RagkvConfig, fingerprint: str, model: str,
                 max_model_len: int) -> None:
        self.cfg, self.fingerprint = cfg, fingerprint
        self.model, self.max_model_len = model, max_model_len
        self._store: KVStore | None = None  # opened on the first ``contains`` question
        self._matched: dict[str, tuple[FusionParams, int, int]] = {}
        self._pending: dict[str, tuple[Request, FusionParams, int, int]] = {}
        self._saves: dict[str, FusionParams] = {}
        # precompute requests whose prefill vLLM split over steps (its token budget per step):
        # ids, blocks so far and params, until the step that completes their spans
        self._saving: dict[str, tuple[list[int], list[int], FusionParams]] = {}
        self._notes: dict[str, dict] = {}
        # notes handed out by request_finished this step: the worker's trace of a request
        # that finishes in the step it was fused in (a one-token request) arrives after it.
        self._handed: dict[str, dict] = {}
        self._worked: set[str] = set()  # requests the worker fused or saved for
        # worked requests that finished, whose worker trace may still come: with async
        # scheduling a step's output is read after the next step is scheduled, so the trace
        # of a request aborted while its step ran arrives after ``_handed`` was cleared, and
        # kept in ``_notes`` it would never leave. The most recent ones, oldest first.
        self._finished: OrderedDict[str, None] = OrderedDict()
        self._tokenizer: str | None = None  # digest of the model's tokenizer files, once read

    def describe(self) -> dict[str, Any]:
        """Who this connector is: what a client needs to derive the same keys."""
        if self._tokenizer is None:
            self._tokenizer = tokenizer_digest(self.model) or ""
        return {"fingerprint": self.fingerprint, "kv_storage": self.cfg.kv_storage,
                "kv_dtype": self.cfg.kv_dtype, "layout": KV_LAYOUT, "model": self.model,
                "tokenizer": self._tokenizer,
                "max_model_len": self.max_model_len,
                "index": masked_url(self.cfg.resolved_index_url),
                "blobs": masked_url(self.cfg.resolved_blob_url)}

    def contains(self, keys: tuple[str, ...]) -> dict[str, Any]:
        if self._store is None:
            self._store = KVStore.from_config(replace(self.cfg, memory_budget_bytes=0))
        present = self._store.contains(list(keys), blobs=True)  # (ingestion asks)
        return {"contains": [k for k in keys if present.get(k)]}

    def _params(self, request: Request) -> FusionParams | None:
        ids = list(request.prompt_token_ids or [])
        rid = request.request_id
        try:
            p = parse(request.kv_transfer_params, len(ids))
            if p is not None and p.fused and request.cache_salt != fusion_salt(p, ids):
                raise ParamsError("a fused request needs cache_salt = fusion_salt(params, ids) "
                                  "so that vLLM's prefix cache keeps fused KV apart")
            if p is not None and p.save and request.cache_salt is not None:
                # vLLM's prefix cache would hand it the blocks of the requests with that salt
                # (a fused request's): their KV would be stored under exact keys
                raise ParamsError("a precompute request ('save') carries no cache_salt: what it "
                                  "stores must be a plain prefill's KV")
        except ParamsError as exc:
            if rid not in self._notes:
                log.error("request %s: ragkv parameters refused (%s); full prefill instead",
                          rid, exc)
            self._notes[rid] = {"error": str(exc), "fallback": "full prefill"}
            return None
        if p is not None and p.describe:
            self._notes[rid] = self.describe()
            return None
        if p is not None and p.contains:
            self._notes[rid] = self.contains(p.contains)
            return None
        return p

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

    def build_connector_meta(self, scheduler_output) -> RagkvMeta:
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
                self._worked.add(new.req_id)
                self._save_when_done(meta, new.req_id, ids, blocks, p, new.num_computed_tokens
                                     + scheduler_output.num_scheduled_tokens[new.req_id])
        self._resumed_loads(meta, scheduler_output)
        self._continue_saves(meta, scheduler_output)
        self._pending.clear()
        self._handed.clear()
        return meta

    def _resumed_loads(self, meta: RagkvMeta, scheduler_output) -> None:
        """Fused requests vLLM preempted and now resumes: claimed again, in new blocks, so
        the fusion runs again. vLLM lists them with the running requests, not the new ones;
        left out, they decoded over whatever their new blocks held."""
        if not self._pending:
            return
        cached = scheduler_output.scheduled_cached_reqs
        for i, rid in enumerate(cached.req_ids):
            if rid not in self._pending or not cached.new_block_ids[i]:
                continue
            request, p, lo, hi = self._pending.pop(rid)
            blocks = list(cached.new_block_ids[i][0])  # a resumed request's whole list
            meta.loads.append(LoadReq(rid, list(request.prompt_token_ids or []), blocks, lo,
                                      hi, p))
            self._worked.add(rid)

    def _save_when_done(self, meta: RagkvMeta, rid: str, ids: list[int], blocks: list[int],
                        p: FusionParams, done: int) -> None:
        """Save the spans in the step whose forward computes the last of them; until then the
        request waits in ``_saving`` (its earlier positions stay in its blocks)."""
        if done >= max(span.end for span in p.save):
            self._saving.pop(rid, None)
            meta.saves.append(SaveReq(rid, ids, blocks, p.save, done, p.reference_end))
        else:
            self._saving[rid] = (ids, blocks, p)

    def _continue_saves(self, meta: RagkvMeta, scheduler_output) -> None:
        """Later steps of precompute requests whose prefill was split (chunked prefill)."""
        if not self._saving:
            return
        cached = scheduler_output.scheduled_cached_reqs
        resumed = getattr(cached, "resumed_req_ids", None) or set()
        for i, rid in enumerate(cached.req_ids):
            if rid not in self._saving:
                continue
            ids, blocks, p = self._saving[rid]
            new = cached.new_block_ids[i]
            added = list(new[0]) if new else []
            blocks = added if rid in resumed else blocks + added  # preempted: blocks anew
            done = cached.num_computed_tokens[i] + scheduler_output.num_scheduled_tokens.get(
                rid, 0)
            self._save_when_done(meta, rid, ids, blocks, p, done)

    def update_connector_output(self, connector_output) -> None:
        wm = getattr(connector_output, "kv_connector_worker_meta", None)
        if isinstance(wm, RagkvWorkerMeta):
            for rid, trace in wm.traces.items():
                handed = self._handed.get(rid)
                if handed is not None:
                    handed.update(trace)  # not serialized yet: the output leaves after this
                elif rid in self._finished:  # too late for its output: dropped
                    del self._finished[rid]
                else:
                    self._notes.setdefault(rid, {}).update(trace)
        self._handed.clear()

    def request_finished(self, request: Request, block_ids: list[int]):
        rid = request.request_id
        self._matched.pop(rid, None)
        self._saves.pop(rid, None)
        self._saving.pop(rid, None)
        note = self._notes.pop(rid, None)
        if rid in self._worked:
            self._worked.discard(rid)
            self._finished[rid] = None
            while len(self._finished) > FINISHED_MEMORY:
                self._finished.popitem(last=False)
            note = note if note is not None else {}
            self._handed[rid] = note
            return False, {"ragkv": note}
        return False, ({"ragkv": note} if note else None)
