"""What the connector's scheduler side tells its worker side each step, and what comes back."""

from __future__ import annotations

from dataclasses import dataclass, field

from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorMetadata,
    KVConnectorWorkerMetadata,
)

from ragkv.engine.vllm.params import FusionParams, Span


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
    reference_end: int = 0  # FusionParams.reference_end


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
