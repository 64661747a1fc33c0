"""KVStore: the one place that decides whether a chunk's KV cache is a hit or a miss.

Tiers, top to bottom: an in-process memory tier (decoded tensors), the local disk blob store
and an optional remote blob store (any fsspec URL). Reads go down until a tier has the entry
and promote it to the tiers above; writes go through to every tier. Byte budgets are applied
after each write, promotions included (:mod:`.eviction`).

A cache may only ever make a query faster, never make it fail: whatever is wrong with what it
holds (a truncated blob, flipped bits, a row from another model, a vanished file, a locked
database) turns into a miss, and a bad copy is removed so the recomputed KV gets stored back.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Iterable
from contextlib import AbstractContextManager
from dataclasses import replace
from typing import TYPE_CHECKING

import torch

from ragkv.cache_index import residency
from ragkv.cache_index.blobcheck import open_blob
from ragkv.cache_index.blobs import BlobStore, encode_kv
from ragkv.cache_index.codec import Int8Codec, decode_tensors
from ragkv.cache_index.corpus import Removal
from ragkv.cache_index.database import brief
from ragkv.cache_index.eviction import EvictionReport, enforce_budget
from ragkv.cache_index.index import CacheIndex
from ragkv.cache_index.ledger import HitBatch, Ledger, uncounted
from ragkv.cache_index.memory import MemoryTier
from ragkv.cache_index.models import EntryInfo
from ragkv.cache_index.policy import PGDSF, EvictionPolicy, make_policy
from ragkv.cache_index.tiers import Fetched, blob_name

if TYPE_CHECKING:
    from ragkv.config import RagkvConfig

log = logging.getLogger("ragkv.cache")

# Keys become file names, so keep them to characters every filesystem and object store accepts.
_KEY_RE = re.compile(r"[0-9A-Za-z_-]{1,64}")


class KVStore:
    """The cache facade: nothing it holds can fail a query. Every problem on read is a miss."""

    def __init__(self, index: CacheIndex, blobs: BlobStore, *, remote: BlobStore | None = None,
                 memory: MemoryTier | None = None, policy: EvictionPolicy | None = None,
                 disk_budget: int | None = None, remote_budget: int | None = None) -> None:
        self.index = index
        self.blobs = blobs
        self.remote = remote
        self.memory = memory
        self._removals_seen: str | None = None  # residency.prune_memory's last stamp
        self.policy = policy or PGDSF()
        self.budgets: dict[str, int | None] = {"disk": disk_budget, "remote": remote_budget}
        self.ledger = Ledger(index, self.policy)
        self.counters = self.ledger.counters  # store-wide counts of this process
        self.tiers = self.ledger.tiers  # per-tier counts of this process
        residency.ensure_clock(index)

    @classmethod
    def from_config(cls, cfg: RagkvConfig, index: CacheIndex | None = None) -> KVStore:
        """The store ``cfg`` names; ``index``: that cache's index, when already open."""
        policy = make_policy(cfg.eviction_policy)
        memory = None if cfg.memory_budget_bytes == 0 else MemoryTier(cfg.memory_budget_bytes,
                                                                       policy)
        remote = (BlobStore(cfg.remote_blob_url, cfg.remote_blob_options)
                  if cfg.remote_blob_url else None)
        return cls(index or CacheIndex(cfg.resolved_index_url),
                   BlobStore(cfg.resolved_blob_url, cfg.blob_options),
                   remote=remote, memory=memory, policy=policy,
                   disk_budget=cfg.disk_budget_bytes, remote_budget=cfg.remote_budget_bytes)

    def persistent_tiers(self) -> list[tuple[residency.Tier, BlobStore]]:
        tiers: list[tuple[residency.Tier, BlobStore]] = [("disk", self.blobs)]
        if self.remote is not None:
            tiers.append(("remote", self.remote))
        return tiers

    def stats(self) -> dict[str, dict[str, int]]:
        """Per-tier counters of this process plus what each tier holds now."""
        out = self.ledger.tier_counts()
        if self.memory is not None:
            out["memory"].update(entries=len(self.memory), resident_bytes=self.memory.nbytes)
        for tier, _ in self.persistent_tiers():
            try:
                n, nbytes = residency.tier_bytes(self.index, tier)
                out[tier].update(entries=n, resident_bytes=nbytes)
            except Exception as exc:  # noqa: BLE001 - stats are for display
                log.warning("cannot size tier %s: %s", tier, brief(exc))
        return out

    # ---- read side ----------------------------------------------------------------------------

    def get(self, key: str, *, model_fp: str, layout: str) -> dict[str, torch.Tensor] | None:
        """The stored tensors for ``key``, or ``None`` (a miss). Never raises for storage."""
        found = self.fetch(key, model_fp=model_fp, layout=layout)
        return found.tensors if found else None

    def fetch(self, key: str, *, model_fp: str, layout: str, shared: bool = False,
              record: bool = True) -> Fetched | None:
        """Like :meth:`get`, also naming the tier that served the entry. ``shared``: a memory
        hit hands out the tier's own tensors, which the caller must not modify. ``record=False``
        (a read for ragkv's own bookkeeping, not a use of the entry): neither the hit nor the
        miss is counted, and the entry's eviction priority does not rise."""
        count = self.ledger.count if record else uncounted
        if self.memory is not None:
            self._check_memory()
            tensors = self.memory.get(key, model_fp=model_fp, layout=layout, shared=shared,
                                      touch=record)
            if tensors is not None:
                found = Fetched(tensors, "memory")
                return self.ledger.hit(key, found, 0) if record else found
            count("", "memory", "misses")
        try:
            entry = self.index.get_entry(key)
        except Exception as exc:
            log.warning("cache index unavailable for %s, treating as miss: %s", key,
                        brief(exc))
            return self.ledger.miss() if record else None
        if entry is None:
            return self.ledger.miss() if record else None
        if entry.model_fp != model_fp or entry.layout != layout:
            return self._discard(
                entry, f"foreign entry (model_fp={entry.model_fp!r}, layout={entry.layout!r})",
                record)
        tiers = self.persistent_tiers()
        for depth, (tier, blobs) in enumerate(tiers):
            if not (entry.on_disk if tier == "disk" else entry.on_remote):
                count("", tier, "misses")
                continue
            read = self._read(entry, tier, blobs, count)
            if read is None:
                continue
            tensors, data = read
            for upper, upper_blobs in tiers[:depth]:  # promote to the faster persistent tiers
                self._write(entry.key, entry.blob_name, upper, upper_blobs, data)
            if depth:  # a promotion is a write: the tiers it filled keep their budgets
                # ranked as written now, not as when it was evicted: that rank made it the
                # first to go again, and its own budget pass evicted it at once
                self._score(entry.key)
                self.apply_budgets()
            if self.memory is not None:
                self.memory.put(key, tensors, model_fp=model_fp, layout=layout,
                                tokens=entry.n_tokens,
                                hits=entry.hits + (1 if record else 0))  # this read
            found = Fetched(tensors, tier, entry.blob_name)
            return self.ledger.hit(key, found, len(data)) if record else found
        return self.ledger.miss() if record else None

    def _read(self, entry: EntryInfo, tier: residency.Tier, blobs: BlobStore,
              count: Callable[..., None]) -> tuple[dict[str, torch.Tensor], bytes] | None:
        """The blob and its tensors; None (a miss, counted by ``count``) if unreadable."""
        try:
            data = blobs.get(entry.blob_name)
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError, ValueError):
            if not residency.names_blob(self.index, entry.key, tier, entry.blob_name):
                count("", tier, "misses")  # evicted or replaced since the row was read
                return None
            return self._drop_copy(entry, tier, blobs, f"blob {entry.blob_name!r} missing", count)
        except Exception as exc:
            # Possibly transient (network store, permissions): miss, but keep the entry.
            log.warning("cannot read %s blob %s, treating as miss: %s", tier, entry.blob_name,
                        brief(exc))
            count("", tier, "misses")
            return None
        try:
            return open_blob(data, entry), data
        except ValueError as exc:
            return self._drop_copy(entry, tier, blobs, str(exc), count)

    def batched_hits(self) -> AbstractContextManager[HitBatch]:
        """Record the hits of this thread's reads inside the block in one index transaction
        (:meth:`.ledger.Ledger.batched`)."""
        return self.ledger.batched()

    def _drop_copy(self, entry: EntryInfo, tier: residency.Tier, blobs: BlobStore,
                   reason: str, count: Callable[..., None]) -> None:
        """One tier's copy is bad: that tier forgets it (the row goes with its last tier). The
        bad copy is counted always, the miss by ``count``."""
        log.warning("discarding %s copy of cache entry %s: %s", tier, entry.key, reason)
        self.ledger.count("corrupt", tier, "corrupt")
        count("", tier, "misses")
        try:
            # Conditional on the blob we judged, so a good entry stored concurrently by
            # another writer (under a blob name of its own) survives, and its blob too.
            if residency.drop_resident(self.index, entry.key, tier, blob=entry.blob_name):
                blobs.delete(entry.blob_name)
        except Exception as exc:
            log.warning("could not remove bad cache entry %s: %s", entry.key, brief(exc))
        return None

    def _discard(self, entry: EntryInfo, reason: str, record: bool) -> None:
        """Remove a foreign entry from every tier; always a miss (counted if ``record``)."""
        log.warning("discarding cache entry %s: %s", entry.key, reason)
        self.ledger.count("corrupt")
        self._remove_entry(entry.key, entry.blob_name)
        return self.ledger.miss() if record else None

    def reject(self, key: str, found: Fetched, reason: str) -> None:
        """A hit its reader cannot use (KV of another shape or dtype, non-finite values):
        forget it so the recomputed KV is stored back; never raises. Only the entry that
        served ``found`` goes, so a good one another process stored meanwhile stays."""
        log.warning("cache entry %s unusable, recomputing: %s", key, reason)
        self.ledger.count("corrupt", found.tier, "corrupt")
        if found.blob is None:  # a memory hit: its row may name a good copy; a re-put replaces it
            self.memory_discard(key)
        else:
            self._remove_entry(key, found.blob)

    def _remove_entry(self, key: str, blob: str) -> None:
        """Forget an entry judged bad, from memory and, if its row still names ``blob`` (not a
        re-put meanwhile), from the index and every tier; best effort, never raises."""
        self.memory_discard(key)
        try:
            if self.index.delete_entry(key, blob=blob):
                for _, blobs in self.persistent_tiers():
                    blobs.delete(blob)
        except Exception as exc:
            log.warning("could not remove bad cache entry %s: %s", key, brief(exc))

    def _check_memory(self) -> None:
        self._removals_seen = residency.prune_memory(self.index, self.memory, self._removals_seen)

    def memory_discard(self, key: str) -> None:
        if self.memory is not None:
            self.memory.discard(key)

    def contains(self, keys: list[str], *, memory: bool = True,
                 blobs: bool = False) -> dict[str, bool]:
        """Presence in memory or the index, for showing hits before loading (a later ``get``
        may still miss). ``memory=False``: in the index alone (what every process finds).
        ``blobs`` (ingestion, not queries: a check per entry): a row counts only if a tier it
        names holds its blob; a copy deleted behind the cache's back is dropped, as a read
        drops it, so a precompute stores the entry again."""
        if memory and self.memory is not None:
            self._check_memory()
        in_memory = {k: memory and self.memory is not None and k in self.memory for k in keys}
        try:
            indexed = self._with_blobs(keys) if blobs else self.index.has_entries(keys)
        except Exception as exc:
            log.warning("cache index unavailable, reporting only memory: %s", brief(exc))
            return in_memory
        return {k: in_memory[k] or indexed.get(k, False) for k in keys}

    def _with_blobs(self, keys: list[str]) -> dict[str, bool]:
        held = dict.fromkeys(keys, False)
        for key, entry in residency.lookup_entries(self.index, keys).items():
            for tier, blobs in self.persistent_tiers():
                if not getattr(entry, f"on_{tier}"):
                    continue
                try:  # a check that fails may be transient: trust the row, as a read does
                    held[key] = blobs.exists(entry.blob_name)
                except Exception:  # noqa: BLE001
                    held[key] = True
                if held[key]:
                    break
                self._drop_copy(entry, tier, blobs, f"blob {entry.blob_name!r} missing", uncounted)
        return held

    # ---- write side ---------------------------------------------------------------------------

    def put(self, key: str, tensors: dict[str, torch.Tensor], *, model_fp: str, layout: str,
            n_tokens: int, extra_meta: dict[str, str] | None = None,
            codec: Int8Codec | None = None, ids_sha256: str | None = None) -> bool:
        """Store KV for ``key`` in every tier (int8-encoded with ``codec``); returns whether the
        disk tier took it. ``ids_sha256``: the digest of the span's token ids
        (:func:`.models.ids_sha256`), by which the entry leaves with the last chunk of them.

        Bad arguments raise (they are bugs); storage failures are logged and return False
        (the caller has the KV it computed). The blob is written before the row, so a row never
        points at a half-written blob; under a name of its own (:func:`.tiers.blob_name`), so
        no concurrent eviction or repair of the row it replaces can delete it."""
        if not _KEY_RE.fullmatch(key):
            raise ValueError(f"cache key must be 1-64 chars of [0-9A-Za-z_-], got {key!r}")
        if not tensors:
            raise ValueError("no tensors to store")
        meta = dict(extra_meta or {})
        meta.update(key=key, model_fp=model_fp, layout=layout, n_tokens=str(n_tokens))
        stored, dtype = tensors, str(next(iter(tensors.values())).dtype).removeprefix("torch.")
        codec_meta: dict[str, str] = {}
        if codec is not None:
            stored, codec_meta = codec.encode(tensors)
            meta.update(codec_meta)
            dtype = codec.tag
        data, checksum = encode_kv(stored, meta)
        name = blob_name(key)
        try:
            self.blobs.put(name, data)
            replaced = self.index.upsert_entry(key, model_fp=model_fp, layout=layout,
                                               n_tokens=n_tokens, nbytes=len(data),
                                               blob_name=name, checksum=checksum, dtype=dtype,
                                               ids_sha256=ids_sha256)
        except Exception as exc:
            log.warning("could not store KV for %s: %s", key, brief(exc))
            self.ledger.count("put_errors")
            residency.delete_quietly(self.blobs, name)  # no row names it: no budget sees it
            return False
        self.ledger.count("puts", "disk", "bytes_written", len(data))
        if replaced is not None and replaced.blob_name != name:
            residency.delete_everywhere(self.persistent_tiers(), replaced)
        if self.remote is not None:
            self._write(key, name, "remote", self.remote, data)
        self._score(key)
        if self.memory is not None:
            # What a later read decodes, so a memory hit equals a disk hit bit for bit.
            held = decode_tensors(stored, codec_meta)  # without a codec: the tensors as given
            self.memory.put(key, held, model_fp=model_fp, layout=layout, tokens=n_tokens)
        self.apply_budgets()
        return True

    def _write(self, key: str, name: str, tier: residency.Tier, blobs: BlobStore,
               data: bytes) -> None:
        """Copy blob ``name`` into one more tier (write-through or promotion); best effort.
        A copy whose row was replaced or dropped meanwhile is nobody's: it is deleted."""
        try:
            blobs.put(name, data)
            if residency.set_resident(self.index, key, tier, name):
                self.ledger.count("", tier, "bytes_written", len(data))
                return
        except Exception as exc:
            log.warning("could not write %s to the %s tier: %s", key, tier, brief(exc))
        residency.delete_quietly(blobs, name)

    def _score(self, key: str) -> None:
        """Rank ``key`` for eviction as written now; best effort."""
        try:
            residency.touch(self.index, [key], self.policy, hit=False)
        except Exception as exc:
            log.warning("could not score %s for eviction: %s", key, brief(exc))

    def apply_budgets(self, *, strict: bool = False) -> list[EvictionReport]:
        """Evict from every persistent tier over its byte budget; never raises (after a
        write, a budget pass that fails waits for the next one), unless ``strict`` (``cache
        gc``, whose whole work it is: it reported success with nothing evicted)."""
        reports = []
        for tier, blobs in self.persistent_tiers():
            if self.budgets.get(tier) is None:
                continue
            try:
                report = enforce_budget(self.index, blobs, tier, self.budgets[tier])
            except Exception as exc:
                if strict:
                    raise
                log.warning("could not apply the %s budget: %s", tier, brief(exc))
                continue
            self.ledger.count("", tier, "evictions", report.evicted)
            self.ledger.count("", tier, "evicted_bytes", report.evicted_bytes)
            reports.append(report)
        return reports

    def remove_documents(self, name: str, *, before_id: int | None = None) -> Removal:
        """Remove the documents called ``name`` from the index (``CacheIndex.
        remove_documents``), then the blobs of the KV entries that went with their chunks,
        from every tier; a blob that cannot be deleted is an orphan ``verify`` removes."""
        removal = self.index.remove_documents(name, before_id=before_id)
        return replace(removal, undeleted=self._forget(removal.entries))

    def remove_unreferenced(self, digests: Iterable[str]) -> int:
        """``CacheIndex.remove_unreferenced``, then those entries' blobs; how many went."""
        entries = self.index.remove_unreferenced(digests)
        self._forget(entries)
        return len(entries)

    def _forget(self, entries: list[EntryInfo]) -> list[EntryInfo]:
        """The blobs (and memory copies) of entries whose rows are gone; those whose blob
        could not be deleted."""
        for entry in entries:
            self.memory_discard(entry.key)
        tiers = self.persistent_tiers()
        return [entry for entry in entries if not residency.delete_everywhere(tiers, entry)]

    def delete(self, key: str) -> None:
        """Forget one entry everywhere (row first, so no reader finds a row without its blob)."""
        self.memory_discard(key)
        entry = self.index.get_entry(key)
        if entry is None:
            return
        if self.index.delete_entry(key, blob=entry.blob_name):  # not a re-put meanwhile
            for _, blobs in self.persistent_tiers():
                blobs.delete(entry.blob_name)
