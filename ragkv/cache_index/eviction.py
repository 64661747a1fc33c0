"""Byte budgets of the persistent tiers: evict lowest-priority entries until a tier fits.

Runs after every write (so a budget holds while queries run) and from ``ragkv cache gc``.
The row stops naming the tier before the blob is deleted (see :mod:`.residency`), so a reader
never trusts a row whose blob is going away; one that already read the row and then finds no
blob takes a miss, which is always safe. The tier's size is read again before each eviction:
passes in other processes (every node runs one after its writes) evict too, and a pass that
counted only its own would empty the tier far below its budget.
"""

from __future__ import annotations

from dataclasses import dataclass

from ragkv.cache_index import residency
from ragkv.cache_index.blobs import BlobStore
from ragkv.cache_index.index import CacheIndex

_MAX_ROUNDS = 1000


@dataclass
class EvictionReport:
    tier: str
    budget: int | None
    bytes_before: int
    bytes_after: int
    evicted: int = 0
    evicted_bytes: int = 0


def enforce_budget(index: CacheIndex, blobs: BlobStore, tier: residency.Tier,
                   budget: int | None, batch: int = 256) -> EvictionReport:
    _, total = residency.tier_bytes(index, tier)
    report = EvictionReport(tier, budget, total, total)
    if budget is None or total <= budget:
        return report
    for _ in range(_MAX_ROUNDS):
        progressed = False
        for entry in residency.eviction_candidates(index, tier, batch):
            total = residency.tier_bytes(index, tier)[1]
            if total <= budget:
                break
            # Conditional on the blob we ranked: an entry rewritten meanwhile (under a new
            # blob name) stays, and so does its blob.
            if residency.drop_resident(index, entry.key, tier, blob=entry.blob_name,
                                       evicted_priority=entry.priority):
                blobs.delete(entry.blob_name)
                report.evicted += 1
                report.evicted_bytes += entry.nbytes
                progressed = True
        total = residency.tier_bytes(index, tier)[1]
        if total <= budget or not progressed:
            break
    report.bytes_after = total
    return report
