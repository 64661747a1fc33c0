"""The tier vocabulary shared by the store, the trace and the UI: names, counters, blob names."""

from __future__ import annotations

import re
import secrets
import time
from dataclasses import dataclass
from typing import Literal

import torch

TierName = Literal["memory", "disk", "remote"]
#: Fastest first: the order a read walks them in.
TIERS: tuple[TierName, ...] = ("memory", "disk", "remote")


def blob_name(key: str, now: float | None = None) -> str:
    """A fresh name for one write of ``key``'s blob. The two-character fan-out keeps any one
    folder from holding every blob; the per-write suffix keeps a re-put of the key off the
    name that an evictor, or a reader of the old row, may be deleting at that moment (rows
    name their blob, and every conditional change to a row is conditional on that name). The
    suffix starts with the write's time in milliseconds (hex), which tells ``verify`` a put
    in flight on a store that keeps no modification times (Redis)."""
    ms = int((time.time() if now is None else now) * 1000)
    return f"{key[:2]}/{key}.{ms:x}-{secrets.token_hex(4)}.safetensors"


_WRITTEN_AT = re.compile(r"\.([0-9a-f]{1,16})-[0-9a-f]{8}\.safetensors$")


def written_at(name: str) -> float | None:
    """The POSIX time a :func:`blob_name` records (None for a name without one)."""
    found = _WRITTEN_AT.search(name)
    return int(found.group(1), 16) / 1000 if found else None


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
