"""What the cache index reports, against real SQLite files (no mocks): stats, the query log,
sizes by tier and by document, the most reused entries."""

from __future__ import annotations

import pytest
from cache_cases import (  # noqa: F401 - fixtures are used by name
    FP,
    LAYOUT,
    _key,
    _put,
    _records,
    blobs,
    index,
    store,
)

from ragkv.cache_index import CacheIndex, KVStore, blob_name
from ragkv.cache_index.models import ids_sha256
from ragkv.cache_index.residency import drop_resident

# -- index: stats, query log, sizes, most reused ---------------------------------------------


def test_stats_counts(store: KVStore) -> None:
    index = store.index
    doc_id, _ = index.add_document("a.md", "", "1" * 64)
    index.add_chunks(doc_id, _records(2))
    _put(store, _key(1))
    _put(store, _key(2))
    store.get(_key(1), model_fp=FP, layout=LAYOUT)
    index.log_query(
        question="q",
        mode="reuse",
        n_chunks=2,
        hits=2,
        misses=0,
        context_tokens=10,
        recomputed_tokens=0,
        ttft_s=0.1,
        answer="a",
    )
    stats = index.stats()
    assert stats["documents"] == 1 and stats["chunks"] == 2
    assert stats["kv_entries"] == 2 and stats["queries"] == 1 and stats["chunk_hits"] == 1
    assert stats["kv_bytes"] == store.blobs.total_bytes()
    assert stats["index_url"] == index.url


def test_log_query_and_recent_queries(index: CacheIndex) -> None:
    ids = [
        index.log_query(
            question=f"q{i}",
            mode="blend",
            ratio=0.15,
            n_chunks=3,
            hits=2,
            misses=1,
            context_tokens=300,
            recomputed_tokens=45,
            ttft_s=0.01 * i,
            full_ttft_s=0.5,
            retrieval_s=0.002,
            answer=f"a{i}",
        )
        for i in range(3)
    ]
    assert ids == sorted(ids)
    recent = index.recent_queries(limit=2)
    assert [q["question"] for q in recent] == ["q2", "q1"]
    assert recent[0]["ratio"] == pytest.approx(0.15) and recent[0]["id"] == ids[2]
    assert recent[0]["created_at"] is not None and recent[0]["answer"] == "a2"
    minimal = index.log_query(question="q", mode="full", ttft_s=0.2)
    assert index.recent_queries(1)[0]["id"] == minimal
    with pytest.raises(TypeError):
        index.log_query(question="q", mode="full", bogus=1)


def _entry(index: CacheIndex, i: int, nbytes: int, *, on_remote: bool = False,
           ids: list[int] | None = None) -> None:
    index.upsert_entry(_key(i), model_fp=FP, layout=LAYOUT, n_tokens=i, nbytes=nbytes,
                       blob_name=blob_name(_key(i)), checksum="0" * 64, dtype="float16",
                       on_remote=on_remote, ids_sha256=None if ids is None else ids_sha256(ids))


def test_tier_sizes(index: CacheIndex) -> None:
    empty = [{"tier": "disk", "entries": 0, "kv_bytes": 0},
             {"tier": "remote", "entries": 0, "kv_bytes": 0}]
    assert index.tier_sizes() == empty
    _entry(index, 1, 100)
    _entry(index, 2, 250, on_remote=True)
    drop_resident(index, _key(3), "disk")  # no such row: changes nothing
    _entry(index, 4, 1000, on_remote=True)
    drop_resident(index, _key(4), "disk")  # remote only now
    assert index.tier_sizes() == [{"tier": "disk", "entries": 2, "kv_bytes": 350},
                                  {"tier": "remote", "entries": 2, "kv_bytes": 1250}]


def test_document_sizes(index: CacheIndex) -> None:
    assert index.document_sizes() == []
    a, _ = index.add_document("a.md", "", "1" * 64)
    b, _ = index.add_document("b.md", "", "2" * 64)
    index.add_document("no-chunks.md", "", "3" * 64)
    index.add_chunks(a, _records(3))  # keys 100..102
    index.add_chunks(b, _records(2))  # keys 100..101, shared with a.md
    _entry(index, 100, 10, ids=[0, 1, 2])
    _entry(index, 102, 1000)
    _entry(index, 7, 5, ids=[0, 1, 2])  # chunk 0's KV in another context: found by its ids
    assert index.document_sizes() == [
        {"document_id": a, "document": "a.md", "chunks": 3, "kv_bytes": 1015},
        {"document_id": b, "document": "b.md", "chunks": 2, "kv_bytes": 15},
    ]


def test_top_entries(index: CacheIndex) -> None:
    a, _ = index.add_document("a.md", "", "1" * 64)
    b, _ = index.add_document("b.md", "", "2" * 64)
    index.add_chunks(a, _records(2))  # keys 100, 101
    index.add_chunks(b, _records(1, tag="b"))  # key 100 again: a.md's chunk was stored first
    for i in (100, 101, 7):
        _entry(index, i, 10)
    _entry(index, 8, 10, ids=[0, 1, 2, 3])  # chunk 1's KV in another context
    assert index.top_entries() == []  # nothing reused yet
    index.record_hits([_key(101), _key(7), _key(7), _key(100), _key(100)] + [_key(8)] * 3)
    top = index.top_entries(10)
    assert [(e["key"], e["hits"]) for e in top] == [
        (_key(8), 3), (_key(7), 2), (_key(100), 2), (_key(101), 1)]
    assert (top[0]["document"], top[0]["ordinal"]) == ("a.md", 1)
    top = top[1:]
    assert top[1] == {"key": _key(100), "hits": 2, "n_tokens": 100, "document": "a.md",
                      "ordinal": 0, "text": "chunk 0"}
    assert (top[0]["document"], top[0]["ordinal"], top[0]["text"]) == (None, None, None)
    assert [e["key"] for e in index.top_entries(1)] == [_key(8)]

