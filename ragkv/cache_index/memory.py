"""The in-process memory tier: decoded, verified chunk KV, bounded by a byte budget.

It sits above the persistent tiers, so what it holds was either computed by this process or
passed every check on the way up (checksum, framing, metadata, int8 decoding). Entries are
private copies and handed out as copies: a caller that writes into the tensors it got cannot
change what the next query reads.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass

import torch

from ragkv.cache_index.policy import PGDSF, EvictionPolicy


@dataclass
class _Slot:
    tensors: dict[str, torch.Tensor]
    model_fp: str
    layout: str
    tokens: int
    nbytes: int
    hits: int
    priority: float


def tensors_nbytes(tensors: dict[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors.values())


def _copy(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {name: t.detach().to("cpu").clone() for name, t in tensors.items()}


class MemoryTier:
    """Byte-bounded map key -> tensors; ``budget=None`` is unlimited, 0 holds nothing."""

    def __init__(self, budget: int | None, policy: EvictionPolicy | None = None) -> None:
        self.budget = budget
        self.policy = policy or PGDSF()
        self.clock = 0.0
        self.nbytes = 0
        self.evictions = 0
        self._slots: dict[str, _Slot] = {}
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._slots)

    def __contains__(self, key: str) -> bool:
        return key in self._slots

    def keys(self) -> list[str]:
        with self._lock:
            return list(self._slots)

    def _score(self, slot: _Slot) -> float:
        return float(self.policy.priority(hits=slot.hits, tokens=slot.tokens, nbytes=slot.nbytes,
                                          now=time.time(), clock=self.clock))

    def get(self, key: str, *, model_fp: str, layout: str, shared: bool = False,
            touch: bool = True) -> dict[str, torch.Tensor] | None:
        """A copy of the entry's tensors, or with ``shared`` the tier's own (the caller only
        reads them: a chunk's KV is tens of MB, and copying it cost a fused request ~1 %).
        ``touch=False``: the read does not count as a hit for eviction."""
        with self._lock:
            slot = self._slots.get(key)
            if slot is None:
                return None
            if slot.model_fp != model_fp or slot.layout != layout:
                # Keys name model and layout, so this is a caller mixing them up; never serve it.
                self._drop(key)
                return None
            if touch:
                slot.hits += 1
                slot.priority = self._score(slot)
            tensors = slot.tensors
        return tensors if shared else _copy(tensors)

    def put(self, key: str, tensors: dict[str, torch.Tensor], *, model_fp: str, layout: str,
            tokens: int, hits: int = 0) -> bool:
        """Hold a copy; returns False when the entry alone exceeds the budget. ``hits``: the
        entry's hits so far in the tiers below (a promoted chunk is as frequent as the index
        says, not new: counted from zero, it ranked below every resident entry and the next
        promotion evicted it again, so a chunk of a working set larger than the tier could be
        read from disk on every query)."""
        nbytes = tensors_nbytes(tensors)
        if self.budget is not None and nbytes > self.budget:
            self.discard(key)
            return False
        own = _copy(tensors)
        with self._lock:
            old = self._slots.pop(key, None)
            if old is not None:
                self.nbytes -= old.nbytes
            slot = _Slot(own, model_fp, layout, tokens, max(nbytes, 1),
                         max(hits, old.hits if old else 0), 0.0)
            slot.priority = self._score(slot)
            self._slots[key] = slot
            self.nbytes += slot.nbytes  # what _drop takes off again
            self._shrink(keep=key)
        return True

    def discard(self, key: str) -> None:
        with self._lock:
            self._drop(key)

    def _drop(self, key: str) -> None:
        slot = self._slots.pop(key, None)
        if slot is not None:
            self.nbytes -= slot.nbytes

    def _shrink(self, keep: str) -> None:
        # A linear scan per eviction: the tier holds tens to thousands of multi-MB entries, so
        # a heap's bookkeeping would cost more than it saves.
        while self.budget is not None and self.nbytes > self.budget:
            victims = [(s.priority, k) for k, s in self._slots.items() if k != keep]
            if not victims:
                break
            prio, key = min(victims)
            self.clock = max(self.clock, prio)
            self._drop(key)
            self.evictions += 1

    def clear(self) -> None:
        with self._lock:
            self._slots.clear()
            self.nbytes = 0
