"""Integrity of stored KV: the one check every read and every ``verify`` applies to a blob,
and ``verify``, which scans the whole cache and repairs what fails.

A blob is good when its bytes hash to the checksum the index recorded (xxh3-128: truncation,
flipped bits and a half-written file all fail it), its safetensors framing is sound, its
metadata names this key, model and layout (a blob copied under another key's name fails
here), and, for int8 entries, its payload and scales fit together.
"""

from __future__ import annotations

import logging
import posixpath
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from ragkv.cache_index import residency
from ragkv.cache_index.blobs import BlobStore, checksum_matches, decode_kv
from ragkv.cache_index.codec import decode_tensors
from ragkv.cache_index.models import EntryInfo

if TYPE_CHECKING:
    from ragkv.cache_index.store import KVStore

log = logging.getLogger("ragkv.cache")


def open_blob(data: bytes, entry: EntryInfo, *, model_fp: str | None = None,
              layout: str | None = None) -> dict[str, torch.Tensor]:
    """The tensors (decoded, ready to use) of a blob read for ``entry``; ValueError says why
    the blob is unusable."""
    if not checksum_matches(data, entry.checksum):
        raise ValueError(f"checksum mismatch ({len(data)} of {entry.nbytes} bytes)")
    tensors, meta = decode_kv(data)
    expected = {"key": entry.key, "model_fp": model_fp or entry.model_fp,
                "layout": layout or entry.layout}
    wrong = {k: meta.get(k) for k, v in expected.items() if meta.get(k) != v}
    if wrong:
        raise ValueError(f"blob metadata does not match: {wrong}")
    return decode_tensors(tensors, meta)


@dataclass
class VerifyReport:
    entries: int = 0
    blobs_checked: int = 0
    bad: list[tuple[str, str, str]] = field(default_factory=list)  # (key, tier, reason)
    orphans: list[tuple[str, str]] = field(default_factory=list)  # (tier, blob name)
    repaired: bool = False

    @property
    def clean(self) -> bool:
        return not self.bad and not self.orphans


def verify(store: KVStore, *, repair: bool = True, orphan_grace_s: float = 300.0) -> VerifyReport:
    """Read every blob every row points at, and every blob no row points at.

    Bad blobs lose their tier (the row goes with its last tier); orphan blobs and leftover
    temp files are deleted once older than ``orphan_grace_s``, since a younger one may be a
    put in flight whose row is about to be written.
    """
    report = VerifyReport(repaired=repair)
    referenced: dict[str, set[str]] = {tier: set() for tier, _ in store.persistent_tiers()}
    for batch in residency.iter_entries(store.index):
        for entry in batch:
            report.entries += 1
            for tier, blobs in store.persistent_tiers():
                if not getattr(entry, f"on_{tier}"):
                    continue
                report.blobs_checked += 1
                try:
                    open_blob(blobs.get(entry.blob_name), entry)
                    referenced[tier].add(entry.blob_name)
                    continue
                except FileNotFoundError:
                    reason = "blob missing"
                except ValueError as exc:
                    reason = str(exc)
                report.bad.append((entry.key, tier, reason))
                if repair:
                    store.memory_discard(entry.key)
                    if residency.drop_resident(store.index, entry.key, tier,  # type: ignore[arg-type]
                                               checksum=entry.checksum):
                        blobs.delete(entry.blob_name)
    now = time.time()
    for tier, blobs in store.persistent_tiers():
        for name in _all_names(blobs):
            if name in referenced[tier]:
                continue
            modified = _modified_at(blobs, name)
            if modified is not None and now - modified < orphan_grace_s:
                continue
            # A row written after our scan may point here now; look again before deleting.
            entry = store.index.get_entry(_key_of(name)) if _key_of(name) else None
            if entry is not None and entry.blob_name == name and getattr(entry, f"on_{tier}"):
                continue
            report.orphans.append((tier, name))
            if repair:
                blobs.delete(name)
    if report.bad or report.orphans:
        log.warning("cache verify: %d bad blobs, %d orphans%s", len(report.bad),
                    len(report.orphans), " (repaired)" if repair else "")
    return report


def _all_names(blobs: BlobStore) -> list[str]:
    """Every file under the store's root, temp files of killed puts included."""
    if not blobs.fs.exists(blobs.root):
        return []
    return sorted(posixpath.relpath(p, blobs.root) for p in blobs.fs.find(blobs.root))


def _modified_at(blobs: BlobStore, name: str) -> float | None:
    """POSIX time of the last write where the filesystem reports one (else None: old)."""
    try:
        info = blobs.fs.info(f"{blobs.root}/{name}")
    except FileNotFoundError:
        return None
    for field_name in ("mtime", "created", "LastModified", "last_modified", "updated"):
        value = info.get(field_name)
        if hasattr(value, "timestamp"):
            return float(value.timestamp())
        if isinstance(value, int | float):
            return float(value)
    return None


def _key_of(name: str) -> str | None:
    base = name.rsplit("/", 1)[-1]
    return base.split(".", 1)[0] if not base.startswith(".") else None
