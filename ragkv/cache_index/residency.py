"""Where each entry lives (disk, remote) and in which order it leaves: the index side of tiers.

Rows are the truth about persistent tiers. The order of operations keeps them honest:
a blob is written before its row says it is there, and a row stops saying so before the blob
is deleted. A crash in between leaves at worst an orphan blob (no row points at it), which
``verify`` removes; never a row pointing at a blob that was never complete.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Any, Literal

from sqlalchemy import delete, insert, select, update
from sqlalchemy.exc import IntegrityError, SQLAlchemyError
from sqlalchemy.orm import Session

from ragkv.cache_index import reports
from ragkv.cache_index.corpus import REMOVAL_STAMP
from ragkv.cache_index.database import brief, in_batches
from ragkv.cache_index.index import CacheIndex
from ragkv.cache_index.models import (
    EntryInfo,
    EvictionClock,
    KVEntry,
    tier_flag,
    to_info,
    utcnow,
)
from ragkv.cache_index.policy import EvictionPolicy

if TYPE_CHECKING:
    from ragkv.cache_index.blobs import BlobStore
    from ragkv.cache_index.memory import MemoryTier

log = logging.getLogger("ragkv.cache")
Tier = Literal["disk", "remote"]


def read_clock(s: Session) -> float:
    return float(s.scalar(select(EvictionClock.value).where(EvictionClock.id == 1)) or 0.0)


def ensure_clock(index: CacheIndex) -> None:
    """Create the eviction clock row up front: two processes evicting for the first time at
    once would otherwise both insert it, and the loser's eviction would fail on the key."""
    try:
        with index.transaction() as s:
            if s.get(EvictionClock, 1) is None:
                s.add(EvictionClock(id=1, value=0.0))
    except IntegrityError:
        pass  # another process created it at the same moment: that is all we wanted
    except SQLAlchemyError as exc:  # an index that is down is handled (as misses) elsewhere
        log.warning("could not prepare the eviction clock: %s", exc)


def clock(index: CacheIndex) -> float:
    with index.transaction() as s:
        return read_clock(s)


def _raise_clock(s: Session, value: float) -> None:
    row = s.get(EvictionClock, 1)
    if row is None:
        s.add(EvictionClock(id=1, value=value))
    elif value > row.value:
        row.value = value


def touch(index: CacheIndex, keys: list[str], policy: EvictionPolicy, *, hit: bool) -> None:
    """After reads (``hit``) or writes: bump hits if a hit, stamp the access, re-score."""
    if not keys:
        return
    now, ts = utcnow(), time.time()
    by_count: dict[int, list[str]] = {}
    for key, n in Counter(keys).items():
        by_count.setdefault(n if hit else 0, []).append(key)
    with index.transaction() as s:
        c = read_clock(s)
        for n, group in by_count.items():
            # SET expressions see the row before the update: both use the old hit count.
            hits = KVEntry.hits + n
            prio = policy.priority(hits=hits, tokens=KVEntry.n_tokens, nbytes=KVEntry.nbytes,
                                   now=ts, clock=c)
            for batch in in_batches(group):
                s.execute(update(KVEntry).where(KVEntry.key.in_(batch))
                          .values(hits=hits, last_access_at=now, priority=prio))


def set_resident(index: CacheIndex, key: str, tier: Tier, blob: str) -> bool:
    """Record that ``tier`` holds the blob named ``blob`` (after it was written there); only
    if the row still names that blob. Returns whether it did."""
    with index.transaction() as s:
        res = s.execute(update(KVEntry).where(KVEntry.key == key, KVEntry.blob_name == blob)
                        .values({tier_flag(tier).key: True}))
        return bool(res.rowcount)


def drop_resident(index: CacheIndex, key: str, tier: Tier, *, blob: str | None = None,
                  evicted_priority: float | None = None) -> bool:
    """``tier`` no longer holds the blob; the row goes once no tier does. With ``blob``,
    only if the row still names that blob (a concurrent writer's new entry, written under a
    name of its own, survives). ``evicted_priority`` advances the eviction clock. Returns
    whether the row changed."""
    flag = tier_flag(tier)
    cond = [KVEntry.key == key, flag.is_(True)]
    if blob is not None:
        cond.append(KVEntry.blob_name == blob)
    with index.transaction() as s:
        res = s.execute(update(KVEntry).where(*cond).values({flag.key: False}))
        if not res.rowcount:
            return False
        s.execute(delete(KVEntry).where(KVEntry.key == key, KVEntry.on_disk.is_(False),
                                        KVEntry.on_remote.is_(False)))
        if evicted_priority is not None:
            _raise_clock(s, evicted_priority)
        return True


def names_blob(index: CacheIndex, key: str, tier: Tier, blob: str) -> bool:
    """Whether the row of ``key`` still says ``tier`` holds ``blob``: a blob found missing
    after it was not is one evicted, removed or replaced meanwhile, not a bad copy."""
    with index.transaction() as s:
        return s.scalar(select(KVEntry.key).where(
            KVEntry.key == key, KVEntry.blob_name == blob, tier_flag(tier).is_(True))) is not None


def prune_memory(index: CacheIndex, memory: MemoryTier, seen: str | None) -> str | None:
    """Drop the memory copies whose rows are gone if entries were removed (in any process)
    since the removal stamp ``seen``; the stamp to remember. Evicted entries a memory tier
    still holds stay servable until a removal. An index that does not answer changes nothing
    (what a copy holds is still its key's KV)."""
    try:
        stamp = index.setting(REMOVAL_STAMP)
        if stamp == seen:
            return seen
        held = index.has_entries(memory.keys())
    except Exception as exc:
        log.warning("cache index unavailable, memory copies not checked: %s", brief(exc))
        return seen
    for key, present in held.items():
        if not present:
            memory.discard(key)
    return stamp


def delete_quietly(blobs: BlobStore, name: str) -> None:
    """Delete a blob no row names (a write without its row); best effort (``verify``)."""
    try:
        blobs.delete(name)
    except Exception as exc:
        log.warning("could not delete %s: %s", name, brief(exc))


def delete_everywhere(tiers: Iterable[tuple[Tier, BlobStore]], entry: EntryInfo) -> bool:
    """Delete a blob no row names any more from the tiers that held it; best effort (what is
    left is an orphan, which ``verify`` removes); whether every copy went."""
    deleted = True
    for tier, blobs in tiers:
        if getattr(entry, f"on_{tier}"):
            try:
                blobs.delete(entry.blob_name)
            except Exception as exc:
                deleted = False
                log.warning("could not delete %s from the %s tier: %s", entry.blob_name, tier,
                            brief(exc))
    return deleted


def tier_bytes(index: CacheIndex, tier: Tier) -> tuple[int, int]:
    """(entries, bytes) the index says ``tier`` holds."""
    with index.transaction() as s:
        return reports.tier_size(s, tier)


def eviction_candidates(index: CacheIndex, tier: Tier, limit: int = 256) -> list[EntryInfo]:
    """Entries of ``tier``, lowest priority first (ties: least recently used, then key)."""
    q = (select(KVEntry).where(tier_flag(tier).is_(True))
         .order_by(KVEntry.priority, KVEntry.last_access_at, KVEntry.key).limit(limit))
    with index.transaction() as s:
        return [to_info(EntryInfo, row) for row in s.scalars(q)]


def iter_entries(index: CacheIndex, batch: int = 500) -> Iterator[list[EntryInfo]]:
    """Every entry, in key order, one short transaction per batch (keyset pagination, so
    rows deleted while scanning cannot shift a page)."""
    after = ""
    while True:
        with index.transaction() as s:
            rows = [to_info(EntryInfo, r) for r in s.scalars(
                select(KVEntry).where(KVEntry.key > after).order_by(KVEntry.key).limit(batch))]
        if not rows:
            return
        yield rows
        after = rows[-1].key


def bulk_insert_entries(index: CacheIndex, rows: list[dict[str, Any]], chunk: int = 5000) -> None:
    """Insert many entry rows in few statements (benchmarks, imports); columns not given take
    their defaults. Fails on an existing key: this is for filling, not merging."""
    now = utcnow()
    defaults = dict(created_at=now, last_access_at=now, hits=0, priority=0.0, on_disk=True,
                    on_remote=False)
    for start in range(0, len(rows), chunk):
        with index.transaction() as s:
            s.execute(insert(KVEntry), [{**defaults, **r} for r in rows[start:start + chunk]])


def lookup_entries(index: CacheIndex, keys: list[str]) -> dict[str, EntryInfo]:
    """Full rows for many keys in one query per 500 keys."""
    out: dict[str, EntryInfo] = {}
    with index.transaction() as s:
        for b in in_batches(list(dict.fromkeys(keys))):
            for row in s.scalars(select(KVEntry).where(KVEntry.key.in_(b))):
                out[row.key] = to_info(EntryInfo, row)
    return out
