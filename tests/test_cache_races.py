"""Cache work racing other nodes' on one shared cache (real SQLite and files here; PostgreSQL
and Redis or S3 under ``make test-services``). Each race is forced at the one point it needs:
another node's eviction runs between this node's read of the rows and its next step."""

from __future__ import annotations

import threading

import pytest
from cache_cases import (  # noqa: F401 - fixtures are used by name
    FP,
    LAYOUT,
    _key,
    _put,
    blobs,
    index,
    store,
)
from sqlalchemy import event
from sqlalchemy.orm import Session

from ragkv.cache_index import CacheIndex, ChunkRecord, KVStore, eviction, integrity, residency
from ragkv.cache_index.corpus import DocumentGone
from ragkv.cache_index.models import Document


def _fill(store: KVStore, n: int) -> int:
    for i in range(n):
        _put(store, _key(i))
    return residency.tier_bytes(store.index, "disk")[1]


def test_two_budget_passes_at_once_stop_at_the_budget(store: KVStore, monkeypatch) -> None:
    """Each pass read the tier's size once and counted only its own evictions, so two at once
    (gc on two nodes, or two nodes' passes after their writes) emptied the tier."""
    total = _fill(store, 40)
    one = total // 40
    budget = total // 2
    drop = residency.drop_resident
    other_node = []

    def racing(*args, **kwargs):  # the other node's whole pass runs before our first drop
        if not other_node:
            other_node.append(None)
            other_node[0] = eviction.enforce_budget(store.index, store.blobs, "disk", budget)
        return drop(*args, **kwargs)

    monkeypatch.setattr(residency, "drop_resident", racing)
    ours = eviction.enforce_budget(store.index, store.blobs, "disk", budget)
    held = residency.tier_bytes(store.index, "disk")[1]
    assert budget - one < held <= budget  # it was 0: every entry gone
    assert other_node[0].evicted == 20 and ours.evicted == 0
    assert ours.bytes_after == held and other_node[0].bytes_after == held


def test_verify_does_not_call_an_entry_evicted_meanwhile_bad(store: KVStore,
                                                             monkeypatch) -> None:
    """Verify judged rows read up to a batch earlier: a blob another node evicted since was
    "missing", reported bad (``--no-repair`` exited 1 on a healthy cache)."""
    total = _fill(store, 20)
    check = integrity._check
    evicted = []

    def racing(blobs, entry):  # another node's budget pass, right after verify's first read
        reason = check(blobs, entry)
        if not evicted:
            evicted.append(None)
            evicted[0] = eviction.enforce_budget(store.index, store.blobs, "disk", total // 2)
        return reason

    monkeypatch.setattr(integrity, "_check", racing)
    report = integrity.verify(store, repair=False)
    assert evicted[0].evicted == 10
    assert report.bad == [] and report.orphans == []
    assert integrity.verify(store, repair=False).bad == []


@pytest.mark.parametrize("how", ["evicted", "replaced"])
def test_a_read_racing_an_eviction_is_a_miss_not_a_bad_copy(store: KVStore, monkeypatch,
                                                             how: str) -> None:
    """A reader that found the row, then the blob gone because it was evicted (or stored
    again under a new name), counted a corrupt copy and logged that it discarded it."""
    _put(store, _key(1))
    get = store.blobs.get

    def racing(name):
        if how == "evicted":
            eviction.enforce_budget(store.index, store.blobs, "disk", 0)
        else:
            monkeypatch.setattr(store.blobs, "get", get)
            _put(store, _key(1))
        return get(name)

    monkeypatch.setattr(store.blobs, "get", racing)
    got = store.get(_key(1), model_fp=FP, layout=LAYOUT)
    assert got is None
    assert store.counters["corrupt"] == 0 and store.tiers["disk"].misses == 1
    if how == "replaced":  # the new entry is untouched: the next read hits it
        assert store.get(_key(1), model_fp=FP, layout=LAYOUT) is not None


def test_two_versions_ingested_at_once_leave_one(index: CacheIndex) -> None:
    """On PostgreSQL a version's id comes from a sequence at insert: the lower id could commit
    last, after the other version's removal of lower ids had run, and its own removal (of ids
    lower than its own) missed the other: both versions stayed, both retrievable."""
    flushed, go = threading.Event(), threading.Event()

    def slow_commit(session) -> None:  # A's insert is in (its id taken), its commit late
        if (threading.current_thread().name == "A" and not flushed.is_set()
                and any(isinstance(o, Document) for o in session.identity_map.values())):
            flushed.set()
            go.wait(10)

    def ingest(tag: str) -> None:
        doc, _ = index.add_document("doc.md", "", tag * 64)
        try:
            index.add_chunks(doc, [ChunkRecord(0, f"version {tag}", [ord(tag)], tag * 64)])
        except DocumentGone:  # the other version replaced it meanwhile
            pass
        index.remove_documents("doc.md", before_id=doc)

    event.listen(Session, "before_commit", slow_commit)
    try:
        a = threading.Thread(target=ingest, args=("a",), name="A")
        a.start()
        assert flushed.wait(10)
        b = threading.Thread(target=ingest, args=("b",), name="B")
        b.start()
        b.join(0.5)  # B done (it did not wait for A) or waiting for A's commit
        go.set()
        a.join(10)
        b.join(10)
    finally:
        event.remove(Session, "before_commit", slow_commit)
    assert len(index.documents()) == 1
    assert len(index.chunks()) == 1
