"""``verify``: scan the whole cache with the blob check of :mod:`.blobcheck` and repair what
fails (bad copies lose their tier, orphan blobs go).

It takes the store as a :class:`VerifiedStore` protocol rather than importing
:class:`~.store.KVStore`, which itself imports the blob check: the two stay acyclic.
"""

from __future__ import annotations

import logging
import posixpath
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import torch

from ragkv.cache_index import residency
from ragkv.cache_index.blobcheck import open_blob
from ragkv.cache_index.blobs import BlobStore
from ragkv.cache_index.index import CacheIndex
from ragkv.cache_index.models import EntryInfo
from ragkv.cache_index.tiers import written_at

__all__ = ["VerifiedStore", "VerifyReport", "open_blob", "verify"]

log = logging.getLogger("ragkv.cache")

#: Called after each blob read with (blobs read, blobs to read).
Progress = Callable[[int, int], None]


class VerifiedStore(Protocol):
    """What :func:`verify` uses of a :class:`~.store.KVStore`."""

    @property
    def index(self) -> CacheIndex: ...

    def persistent_tiers(self) -> list[tuple[residency.Tier, BlobStore]]: ...

    def memory_discard(self, key: str) -> None: ...


@dataclass
class VerifyReport:
    entries: int = 0
    blobs_checked: int = 0
    bad: list[tuple[str, str, str]] = field(default_factory=list)  # (key, tier, reason)
    orphans: list[tuple[str, str]] = field(default_factory=list)  # (tier, blob name)
    #: (key, tier, error): blobs that could not be read now (a network store, permissions);
    #: neither judged nor repaired, since the error may pass
    unreadable: list[tuple[str, str, str]] = field(default_factory=list)
    repaired: bool = False

    @property
    def clean(self) -> bool:
        return not self.bad and not self.orphans and not self.unreadable


def verify(store: VerifiedStore, *, repair: bool = True, orphan_grace_s: float = 300.0,
           progress: Progress | None = None) -> VerifyReport:
    """Read every blob every row points at, and every blob no row points at.

    Bad blobs lose their tier (the row goes with its last tier); orphan blobs and leftover
    temp files are deleted once older than ``orphan_grace_s``, since a younger one may be a
    put in flight whose row is about to be written. ``progress`` follows the blob reads; the
    count to read is the index's at the start (rows other processes add meanwhile raise it).
    """
    report = VerifyReport(repaired=repair)
    tiers = store.persistent_tiers()
    referenced: dict[str, set[str]] = {tier: set() for tier, _ in tiers}
    to_read = 0
    if progress is not None:
        held = {t["tier"]: t["entries"] for t in store.index.tier_sizes()}
        to_read = sum(held.get(tier, 0) for tier, _ in tiers)
    for batch in residency.iter_entries(store.index):
        for entry in batch:
            report.entries += 1
            for tier, blobs in tiers:
                if not getattr(entry, f"on_{tier}"):
                    continue
                report.blobs_checked += 1
                try:
                    reason = _check(blobs, entry)
                except Exception as exc:  # noqa: BLE001 - maybe transient: not judged
                    report.unreadable.append((entry.key, tier, f"{type(exc).__name__}: {exc}"))
                    reason = None
                if reason == "blob missing" and not residency.names_blob(
                        store.index, entry.key, tier, entry.blob_name):  # type: ignore[arg-type]
                    pass  # evicted, removed or replaced since this batch was read: not bad
                elif reason is None:
                    referenced[tier].add(entry.blob_name)
                else:
                    report.bad.append((entry.key, tier, reason))
                    if repair:
                        store.memory_discard(entry.key)
                        if residency.drop_resident(store.index, entry.key,
                                                   tier,  # type: ignore[arg-type]
                                                   blob=entry.blob_name):
                            _delete(blobs, entry.blob_name)
                if progress is not None:
                    progress(report.blobs_checked, max(to_read, report.blobs_checked))
    now = time.time()
    for tier, blobs in tiers:
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
                _delete(blobs, name)
    if report.bad or report.orphans or report.unreadable:
        log.warning("cache verify: %d bad blobs, %d orphans%s, %d unreadable now",
                    len(report.bad), len(report.orphans), " (repaired)" if repair else "",
                    len(report.unreadable))
    return report


def _check(blobs: BlobStore, entry: EntryInfo) -> str | None:
    """Why the entry's blob on this tier is bad, or None when it reads back whole; any other
    error reading it is raised (it may pass)."""
    try:
        tensors = open_blob(blobs.get(entry.blob_name), entry)
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
        return "blob missing"  # (a folder where the file should be, or above it)
    except ValueError as exc:
        return str(exc)
    # every read rejects these (``ChunkKV.from_tensors``), so verify must not pass them; a NaN
    # scale of an int8 entry shows here, in what it decodes to
    bad = sorted(n for n, t in tensors.items()
                 if t.is_floating_point() and not bool(torch.isfinite(t).all()))
    return f"non-finite values in {', '.join(bad)}" if bad else None


def _delete(blobs: BlobStore, name: str) -> None:
    """Delete a bad or orphan blob; one that cannot go now is left for the next verify,
    rather than ending this one."""
    try:
        blobs.delete(name)
    except Exception as exc:  # noqa: BLE001
        log.warning("could not delete %s: %s", name, exc)


def _all_names(blobs: BlobStore) -> list[str]:
    """Every file under the store's root, temp files of killed puts included."""
    return sorted(posixpath.relpath(p, blobs.root) for p in blobs.find())


def _modified_at(blobs: BlobStore, name: str) -> float | None:
    """POSIX time of the last write where the filesystem reports one, else the time its
    name records (:func:`.tiers.blob_name`; Redis keeps none), else None: old."""
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
    return written_at(name)


def _key_of(name: str) -> str | None:
    base = name.rsplit("/", 1)[-1]
    return base.split(".", 1)[0] if not base.startswith(".") else None
