"""``RagkvConnector``: CacheBlend inside vLLM V1 as a KV connector, loaded by module path.

    kv_transfer_config = {"kv_connector": "RagkvConnector",
                          "kv_connector_module_path": "ragkv.engine.vllm.connector",
                          "kv_role": "kv_both", "kv_load_failure_policy": "recompute",
                          "kv_connector_extra_config": {"ragkv": {<RagkvConfig fields>}}}

As vLLM's own connectors, it is two halves behind one class: vLLM builds it once per role,
and each call goes to the half of that role: :class:`~.scheduler.ConnectorScheduler` (which
positions a request's fusion provides; answers to ``describe``/``contains``) and
:class:`~.worker.ConnectorWorker` (fusing before the forward, saving precomputed spans).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorMetadata,
    KVConnectorRole,
    KVConnectorWorkerMetadata,
)

from ragkv.config import RagkvConfig
from ragkv.engine.vllm.meta import RagkvMeta
from ragkv.engine.vllm.params import vllm_fingerprint
from ragkv.engine.vllm.scheduler import ConnectorScheduler
from ragkv.engine.vllm.worker import ConnectorWorker

if TYPE_CHECKING:
    from vllm.v1.request import Request


def ragkv_config(extra: dict[str, Any]) -> RagkvConfig:
    return RagkvConfig(**dict(extra.get("ragkv") or {}))


class RagkvConnector(KVConnectorBase_V1):
    def __init__(self, vllm_config, role: KVConnectorRole, kv_cache_config=None) -> None:
        super().__init__(vllm_config, role, kv_cache_config)
        cfg = ragkv_config(self._kv_transfer_config.kv_connector_extra_config or {})
        mc = vllm_config.model_config
        fingerprint = vllm_fingerprint(mc.model, str(mc.dtype).removeprefix("torch."))
        self.sched: ConnectorScheduler | None = None
        self.worker: ConnectorWorker | None = None
        if role == KVConnectorRole.SCHEDULER:
            self.sched = ConnectorScheduler(cfg, fingerprint, str(mc.model),
                                            int(mc.max_model_len))
        else:
            self.worker = ConnectorWorker(cfg, fingerprint, vllm_config.cache_config.block_size)

    # ==============================
    # Scheduler side
    # ==============================
    def get_num_new_matched_tokens(self, request: Request,
                                   num_computed_tokens: int) -> tuple[int | None, bool]:
        assert self.sched is not None
        return self.sched.get_num_new_matched_tokens(request, num_computed_tokens)

    def update_state_after_alloc(self, request: Request, blocks, num_external_tokens: int):
        assert self.sched is not None
        self.sched.update_state_after_alloc(request, blocks, num_external_tokens)

    def build_connector_meta(self, scheduler_output) -> KVConnectorMetadata:
        assert self.sched is not None
        return self.sched.build_connector_meta(scheduler_output)

    def update_connector_output(self, connector_output) -> None:
        assert self.sched is not None
        self.sched.update_connector_output(connector_output)

    def request_finished(self, request: Request, block_ids: list[int]):
        assert self.sched is not None
        return self.sched.request_finished(request, block_ids)

    # ==============================
    # Worker side
    # ==============================
    def _meta(self) -> RagkvMeta | None:
        if not self.has_connector_metadata():
            return None
        meta = self._get_connector_metadata()
        return meta if isinstance(meta, RagkvMeta) else None

    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        assert self.worker is not None
        self.worker.register_kv_caches(kv_caches)

    def start_load_kv(self, forward_context, **kwargs: Any) -> None:
        assert self.worker is not None
        meta = self._meta()
        if meta is not None:
            self.worker.start_load_kv(meta, forward_context)

    def wait_for_layer_load(self, layer_name: str) -> None:
        return  # loads finish inside start_load_kv, before the forward

    def save_kv_layer(self, layer_name: str, kv_layer: torch.Tensor, attn_metadata,
                      **kwargs: Any) -> None:
        meta = self._meta()
        if meta is not None and self.worker is not None:
            self.worker.save_kv_layer(meta, layer_name, kv_layer)

    def wait_for_save(self) -> None:
        meta = self._meta()
        if meta is not None and self.worker is not None:
            self.worker.wait_for_save(meta)

    def get_block_ids_with_load_errors(self) -> set[int]:
        return self.worker.failed_blocks() if self.worker is not None else set()

    def build_connector_worker_meta(self) -> KVConnectorWorkerMetadata | None:
        return self.worker.worker_meta() if self.worker is not None else None
