"""KVStore: the one place that decides whether a chunk's KV cache is a hit or a miss.

A cache may only ever make a query faster, never make it fail: whatever is wrong with what it
holds (a truncated blob, flipped bits, a row from another model, a vanished file, a locked
database) turns into a miss, and a bad entry is removed so the recomputed KV gets stored back.
"""

from __future__ import annotations

import hashlib
import logging
import re
import threading

import torch

from ragkv.cache_index.blobs import BlobStore, decode_kv, encode_kv
from ragkv.cache_index.index import CacheIndex
from ragkv.cache_index.models import EntryInfo

log = logging.getLogger("ragkv.cache")

# Keys become file names, so keep them to characters every filesystem and object store accepts.
_KEY_RE = re.compile(r"[0-9A-Za-z_-]{1,64}")


def blob_name(key: str) -> str:
    """Two-character fan-out keeps any one folder from holding every blob."""
    return f"{key[:2]}/{key}.safetensors"


class KVStore:
    """The cache facade: nothing it holds can fail a query. Every problem on read is a miss."""

    def __init__(self, index: CacheIndex, blobs: BlobStore) -> None:
        self.index = index
        self.blobs = blobs
        self.counters: dict[str, int] = {
            "hits": 0,
            "misses": 0,
            "corrupt": 0,
            "puts": 0,
            "put_errors": 0,
        }
        # The UI may serve queries from several threads; counters are read for display only,
        # but lost increments would still make the numbers lie.
        self._lock = threading.Lock()

    def _count(self, name: str) -> None:
        with self._lock:
            self.counters[name] += 1

    def _miss(self) -> None:
        self._count("misses")

    def get(self, key: str, *, model_fp: str, layout: str) -> dict[str, torch.Tensor] | None:
        """The stored tensors for ``key``, or ``None`` (a miss). Never raises for storage."""
        try:
            entry = self.index.get_entry(key)
        except Exception as exc:
            log.warning("cache index unavailable for %s, treating as miss: %s", key, exc)
            self._miss()
            return None
        if entry is None:
            self._miss()
            return None
        if entry.model_fp != model_fp or entry.layout != layout:
            return self._discard(
                entry, f"foreign entry (model_fp={entry.model_fp!r}, layout={entry.layout!r})"
            )
        try:
            data = self.blobs.get(entry.blob_name)
        except (FileNotFoundError, ValueError):
            return self._discard(entry, f"blob {entry.blob_name!r} missing")
        except Exception as exc:
            # Possibly transient (network store, permissions): miss, but keep the entry.
            log.warning("cannot read blob %s, treating as miss: %s", entry.blob_name, exc)
            self._miss()
            return None
        if hashlib.sha256(data).hexdigest() != entry.checksum:
            return self._discard(entry, f"checksum mismatch ({len(data)} of {entry.nbytes} bytes)")
        try:
            tensors, meta = decode_kv(data)
        except ValueError as exc:
            return self._discard(entry, f"undecodable blob: {exc}")
        expected = {"key": key, "model_fp": model_fp, "layout": layout}
        wrong = {k: meta.get(k) for k, v in expected.items() if meta.get(k) != v}
        if wrong:
            return self._discard(entry, f"blob metadata does not match: {wrong}")
        try:
            self.index.record_hits([key])
        except Exception as exc:
            log.warning("could not record hit for %s: %s", key, exc)
        self._count("hits")
        return tensors

    def _discard(self, entry: EntryInfo, reason: str) -> None:
        """Remove a bad entry so the next store of this key replaces it; always a miss."""
        log.warning("discarding cache entry %s: %s", entry.key, reason)
        with self._lock:
            self.counters["corrupt"] += 1
            self.counters["misses"] += 1
        try:
            # Conditional on the checksum we judged, so a good entry stored concurrently by
            # another writer survives; its blob then is not ours to delete either.
            if self.index.delete_entry(entry.key, checksum=entry.checksum):
                self.blobs.delete(entry.blob_name)
        except Exception as exc:
            log.warning("could not remove bad cache entry %s: %s", entry.key, exc)
        return None

    def put(
        self,
        key: str,
        tensors: dict[str, torch.Tensor],
        *,
        model_fp: str,
        layout: str,
        n_tokens: int,
        extra_meta: dict[str, str] | None = None,
    ) -> bool:
        """Store KV for ``key``; returns whether it was stored.

        Bad arguments raise (they are bugs); storage failures are logged and return False,
        since the caller already has the KV it computed and can answer without the cache.
        The blob is written before the row, so a row never points at a half-written blob.
        """
        if not _KEY_RE.fullmatch(key):
            raise ValueError(f"cache key must be 1-64 chars of [0-9A-Za-z_-], got {key!r}")
        if not tensors:
            raise ValueError("no tensors to store")
        meta = dict(extra_meta or {})
        meta.update(key=key, model_fp=model_fp, layout=layout, n_tokens=str(n_tokens))
        data, checksum = encode_kv(tensors, meta)
        name = blob_name(key)
        first = next(iter(tensors.values()))
        try:
            self.blobs.put(name, data)
            self.index.upsert_entry(
                key,
                model_fp=model_fp,
                layout=layout,
                n_tokens=n_tokens,
                nbytes=len(data),
                blob_name=name,
                checksum=checksum,
                dtype=str(first.dtype).removeprefix("torch."),
            )
        except Exception as exc:
            log.warning("could not store KV for %s: %s", key, exc)
            self._count("put_errors")
            return False
        self._count("puts")
        return True

    def contains(self, keys: list[str]) -> dict[str, bool]:
        """Index-only presence, for showing hits before loading; a later ``get`` may still
        miss if the blob turns out bad."""
        try:
            return self.index.has_entries(keys)
        except Exception as exc:
            log.warning("cache index unavailable, reporting all as absent: %s", exc)
            return dict.fromkeys(keys, False)

    def delete(self, key: str) -> None:
        """Forget one entry (row first, so no reader finds a row without its blob)."""
        entry = self.index.get_entry(key)
        if entry is None:
            return
        self.index.delete_entry(key)
        self.blobs.delete(entry.blob_name)
