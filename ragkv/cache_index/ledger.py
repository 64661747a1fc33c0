"""What one process's :class:`~.store.KVStore` counts, and how its hits reach the index.

Counters are per process and lock-guarded (the UI may serve queries from several threads; lost
increments would make it lie). A hit also raises the entry's eviction priority in the index;
:meth:`Ledger.batched` gathers a thread's hits into one index transaction.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass

from ragkv.cache_index import residency
from ragkv.cache_index.database import brief
from ragkv.cache_index.index import CacheIndex
from ragkv.cache_index.policy import EvictionPolicy
from ragkv.cache_index.tiers import TIERS, Fetched, TierStats

log = logging.getLogger("ragkv.cache")


def uncounted(*_: object) -> None:
    """What a read counts with when asked not to record itself (``KVStore.fetch``)."""


@dataclass
class HitBatch:
    """What :meth:`Ledger.batched` yields: seconds its index transaction took."""

    seconds: float = 0.0


class Ledger:
    """A store's counters (``counters``: store-wide; ``tiers``: per tier) and its hit records."""

    def __init__(self, index: CacheIndex, policy: EvictionPolicy) -> None:
        self.index = index
        self.policy = policy
        self.counters = dict.fromkeys(("hits", "misses", "corrupt", "puts", "put_errors"), 0)
        self.tiers = {t: TierStats() for t in TIERS}
        self._lock = threading.Lock()
        self._local = threading.local()  # hits awaiting one transaction (batched)

    def count(self, name: str, tier: str | None = None, field: str = "", n: int = 1) -> None:
        """Add one to store-wide counter ``name`` (if any) and ``n`` to ``tier``'s ``field``."""
        with self._lock:
            if name:
                self.counters[name] += 1
            if tier:
                setattr(self.tiers[tier], field, getattr(self.tiers[tier], field) + n)

    def tier_counts(self) -> dict[str, dict[str, int]]:
        """A consistent copy of the per-tier counters."""
        with self._lock:
            return {t: asdict(s) for t, s in self.tiers.items()}

    @contextmanager
    def batched(self) -> Iterator[HitBatch]:
        """Record the hits of this thread's reads inside the block in one index transaction
        when it ends, not one per read: a fused request reads an entry per chunk, and one
        transaction per read cost a 2k-token blend about 5 ms more of its TTFT
        (``docs/benchmarks.md``). Nested blocks record with the outermost. The yielded
        :class:`HitBatch` holds, after the block, how long recording took (0 without hits)."""
        batch = HitBatch()
        if getattr(self._local, "hits", None) is not None:
            yield batch
            return
        self._local.hits = []
        try:
            yield batch
        finally:
            keys, self._local.hits = self._local.hits, None
            t = time.perf_counter()
            if self._record_hits(keys):
                batch.seconds = time.perf_counter() - t

    def _record_hits(self, keys: list[str]) -> bool:
        """Whether there were hits to record."""
        if not keys:
            return False
        try:
            residency.touch(self.index, keys, self.policy, hit=True)
        except Exception as exc:
            log.warning("could not record hits for %s: %s", ", ".join(k[:12] for k in keys),
                        brief(exc))
        return True

    def hit(self, key: str, found: Fetched, nbytes: int) -> Fetched:
        """Count a read of ``nbytes`` that ``found.tier`` served, and record it (now, or when
        the enclosing :meth:`batched` block ends)."""
        pending = getattr(self._local, "hits", None)
        if pending is not None:
            pending.append(key)
        else:
            self._record_hits([key])
        self.count("hits", found.tier, "hits")
        if nbytes:
            self.count("", found.tier, "bytes_read", nbytes)
        return found

    def miss(self) -> None:
        self.count("misses")
        return None
