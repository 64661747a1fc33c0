"""The tier vocabulary shared by the store, the trace and the UI: names, counters, blob names."""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from typing import Literal

import torch

TierName = Literal["memory", "disk", "remote"]
#: Fastest first: the order a read walks them in.
TIERS: tuple[TierName, ...] = ("memory", "disk", "remote")


def blob_name(key: str) -> str:
    """A fresh name for one write of ``key``'s blob. The two-character fan-out keeps any one
    folder from holding every blob; the per-write suffix keeps a re-put of the key off the
    name that an evictor, or a reader of the old row, may be deleting at that moment (rows
    name their blob, and every conditional change to a row is conditional on that name)."""
    return f"{key[:2]}/{key}.{secrets.token_hex(6)}.safetensors"


@dataclass
class TierStats:
    """Counted by one process's :class:`~.store.KVStore`, per tier."""

    hits: int = 0
    misses: int = 0
    bytes_read: int = 0
    bytes_written: int = 0
    corrupt: int = 0
    evictions: int = 0
    evicted_bytes: int = 0


@dataclass
class Fetched:
    """A read that hit: the decoded tensors, the tier that served them and, from a persistent
    tier, the blob they were read from (what a reader that rejects them may delete)."""

    tensors: dict[str, torch.Tensor]
    tier: TierName
    blob: str | None = None
