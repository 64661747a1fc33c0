"""Eviction strategies: which entry leaves a full tier first (lowest priority first).

A strategy is a small frozen dataclass with one formula, ``priority``. The formula is written
with plain arithmetic so the same code scores a Python entry (the memory tier) and builds a SQL
expression over ``kv_entries`` columns (the persistent tiers rank rows in the database).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol


class EvictionPolicy(Protocol):
    name: str

    def priority(self, *, hits: Any, tokens: Any, nbytes: Any, now: float, clock: float) -> Any:
        """Score after an access; ``hits`` counts the hits so far, this one included."""
        ...


@dataclass(frozen=True)
class PGDSF:
    """RAGCache's Prefix-aware Greedy-Dual-Size-Frequency, per chunk.

    priority = clock + frequency x cost / size, with cost proportional to the chunk's tokens
    (what a miss recomputes) and size its stored bytes. The clock is the priority of the last
    evicted entry, so entries not touched since then age out against fresh ones.
    """

    name: str = "pgdsf"

    def priority(self, *, hits: Any, tokens: Any, nbytes: Any, now: float, clock: float) -> Any:
        # hits + 1: storing an entry is its first access; `* 1.0` keeps SQL out of integer
        # division (tokens / bytes is far below 1).
        return clock + (hits + 1) * tokens * 1.0 / nbytes


@dataclass(frozen=True)
class LRU:
    """Least recently used, for comparison: priority is the time of the last access."""

    name: str = "lru"

    def priority(self, *, hits: Any, tokens: Any, nbytes: Any, now: float, clock: float) -> Any:
        return now


POLICIES: dict[str, EvictionPolicy] = {"pgdsf": PGDSF(), "lru": LRU()}


def make_policy(name: str) -> EvictionPolicy:
    try:
        return POLICIES[name]
    except KeyError:
        known = sorted(POLICIES)
        raise ValueError(f"unknown eviction policy {name!r}; use one of {known}") from None
