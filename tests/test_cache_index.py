"""Cache index, blob store and KVStore against real SQLite files and real files (no mocks)."""

from __future__ import annotations

import hashlib
import uuid
from pathlib import Path

import pytest
import torch
from cache_cases import (  # noqa: F401 - fixtures are used by name
    FP,
    LAYOUT,
    _key,
    _kv,
    _put,
    _raw,
    blobs,
    index,
    store,
)
from sqlalchemy import text

from ragkv.cache_index import (
    SCHEMA_VERSION,
    BlobStore,
    CacheIndex,
    ChunkRecord,
    KVStore,
    blob_name,
    decode_kv,
    encode_kv,
)
from ragkv.cache_index.blobs import checksum_matches
from ragkv.cache_index.residency import drop_resident

# -- round trip ------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32, torch.bfloat16])
def test_put_get_round_trip(store: KVStore, dtype: torch.dtype) -> None:
    kv = _put(store, _key(1), dtype)
    got = store.get(_key(1), model_fp=FP, layout=LAYOUT)
    assert got is not None and set(got) == set(kv)
    for name, tensor in kv.items():
        assert got[name].dtype == dtype
        assert got[name].device.type == "cpu"
        assert torch.equal(got[name], tensor)
    entry = store.index.get_entry(_key(1))
    assert entry is not None
    assert entry.dtype == str(dtype).removeprefix("torch.")
    assert entry.n_tokens == 5 and entry.layout == LAYOUT and entry.model_fp == FP
    assert entry.blob_name == blob_name(_key(1)) == f"00/{_key(1)}.safetensors"
    assert entry.nbytes == len(_raw(store.blobs, _key(1)))


def test_encode_decode_keeps_metadata_and_handles_views() -> None:
    base = torch.randn(2, 3, 4)
    # Slices of one tensor share storage and one is non-contiguous: both must still encode.
    data, checksum = encode_kv({"k": base[0], "v": base[1].t()}, {"key": "x", "extra": "y"})
    tensors, meta = decode_kv(data)
    assert meta == {"key": "x", "extra": "y"}
    assert torch.equal(tensors["k"], base[0]) and torch.equal(tensors["v"], base[1].t())
    assert checksum.startswith("xxh3:") and len(checksum) == 37
    assert checksum_matches(data, checksum) and not checksum_matches(data[:-1], checksum)
    # Entries written with the earlier sha256 checksums still verify.
    assert checksum_matches(data, hashlib.sha256(data).hexdigest())


@pytest.mark.parametrize(
    "data", [b"", b"\x01\x02", b"\xff" * 8 + b"{}", b"\x02\x00\x00\x00\x00\x00\x00\x00[]"]
)
def test_decode_rejects_garbage(data: bytes) -> None:
    with pytest.raises(ValueError):
        decode_kv(data)


def _encode_in_a_fresh_process(_: int) -> str:
    from ragkv.cache_index.blobs import encode_kv

    meta = {"key": "k", "model_fp": "m", "layout": "l", "n_tokens": "4", "extra": "x"}
    g = torch.Generator().manual_seed(0)
    return encode_kv({"k": torch.randn(2, 4, 3, generator=g)}, meta)[1]


def test_same_kv_encodes_to_the_same_bytes_in_every_process() -> None:
    """Racing writers of one key store one blob under one checksum only if their bytes agree."""
    import multiprocessing as mp

    with mp.get_context("spawn").Pool(4) as pool:
        sums = pool.map(_encode_in_a_fresh_process, range(8))
    assert len(set(sums)) == 1, sums


def test_decode_rejects_every_truncation() -> None:
    data, _ = encode_kv({"k": torch.arange(6, dtype=torch.float32)}, {"key": "x"})
    for cut in range(len(data)):
        with pytest.raises(ValueError):
            decode_kv(data[:cut])


def test_hits_recorded(store: KVStore) -> None:
    _put(store, _key(1))
    for _ in range(3):
        assert store.get(_key(1), model_fp=FP, layout=LAYOUT) is not None
    assert store.get(_key(2), model_fp=FP, layout=LAYOUT) is None
    entry = store.index.get_entry(_key(1))
    assert entry is not None and entry.hits == 3
    assert entry.last_access_at >= entry.created_at
    assert store.counters["hits"] == 3 and store.counters["misses"] == 1
    assert store.counters["corrupt"] == 0
    store.index.record_hits([_key(1), _key(1), "absent"])
    assert store.index.get_entry(_key(1)).hits == 5  # type: ignore[union-attr]


def test_reput_overwrites_and_keeps_hits(store: KVStore) -> None:
    _put(store, _key(1), torch.float16)
    store.get(_key(1), model_fp=FP, layout=LAYOUT)
    kv32 = _put(store, _key(1), torch.float32)
    got = store.get(_key(1), model_fp=FP, layout=LAYOUT)
    assert got is not None and torch.equal(got["k.0"], kv32["k.0"])
    entry = store.index.get_entry(_key(1))
    assert entry is not None and entry.hits == 2 and entry.dtype == "float32"
    assert store.index.stats()["kv_entries"] == 1


def test_put_rejects_unsafe_key(store: KVStore) -> None:
    with pytest.raises(ValueError):
        store.put("../etc", _kv(), model_fp=FP, layout=LAYOUT, n_tokens=5)


# -- documents and chunks --------------------------------------------------------------------


def _records(n: int, tag: str = "") -> list[ChunkRecord]:
    return [
        ChunkRecord(
            ordinal=i,
            text=f"chunk {i}{tag}",
            token_ids=list(range(i + 3)),
            cache_key=_key(100 + i),
            embedding=(torch.ones(4) * i).numpy().tobytes(),
        )
        for i in range(n)
    ]


def test_add_document_and_chunks_idempotent(index: CacheIndex) -> None:
    doc_id, created = index.add_document("a.md", "/src/a.md", "1" * 64)
    assert created
    assert index.add_document("a.md", "/src/a.md", "1" * 64) == (doc_id, False)
    other, created2 = index.add_document("a.md", "/src/a.md", "2" * 64)
    assert created2 and other != doc_id

    ids = index.add_chunks(doc_id, _records(3))
    assert index.add_chunks(doc_id, _records(3)) == ids
    index.set_document_chunk_count(doc_id, 3)
    assert index.stats()["chunks"] == 3
    [doc] = [d for d in index.documents() if d.id == doc_id]
    assert (doc.name, doc.source, doc.n_chunks) == ("a.md", "/src/a.md", 3)

    infos = index.chunks([ids[2], ids[0]])
    assert [c.id for c in infos] == [ids[2], ids[0]]
    assert infos[0].document_name == "a.md" and infos[0].ordinal == 2
    assert infos[0].token_ids == [0, 1, 2, 3, 4] and infos[0].n_tokens == 5
    assert infos[0].cache_key == _key(102)
    assert infos[0].embedding == (torch.ones(4) * 2).numpy().tobytes()
    assert [c.id for c in index.chunks()] == ids
    assert index.chunks([999_999]) == []


def test_rechunk_updates_in_place_and_trims(index: CacheIndex) -> None:
    doc_id, _ = index.add_document("b.md", "", "3" * 64)
    ids = index.add_chunks(doc_id, _records(4))
    new_ids = index.add_chunks(doc_id, _records(2, tag="!"))
    assert new_ids == ids[:2]
    index.set_document_chunk_count(doc_id, 2)
    assert [c.text for c in index.chunks()] == ["chunk 0!", "chunk 1!"]


def test_has_entries(store: KVStore) -> None:
    _put(store, _key(1))
    _put(store, _key(3))
    keys = [_key(i) for i in range(5)]
    expected = {k: k in (_key(1), _key(3)) for k in keys}
    assert store.index.has_entries(keys) == expected
    assert store.contains(keys) == expected
    assert store.index.has_entries([]) == {}
    many = [_key(i) for i in range(1200)]  # more than one IN (...) batch
    assert sum(store.index.has_entries(many).values()) == 2


# -- blob store ------------------------------------------------------------------------------


def test_memory_blob_store() -> None:
    blobs = BlobStore(f"memory://ragkv-test-{uuid.uuid4().hex}")
    assert blobs.total_bytes() == 0
    blobs.put("ab/one.bin", b"12345")
    blobs.put("ab/one.bin", b"123")  # overwrite
    blobs.put("cd/two.bin", b"xy")
    assert blobs.get("ab/one.bin") == b"123"
    assert blobs.exists("cd/two.bin") and not blobs.exists("cd/three.bin")
    assert blobs.names() == ["ab/one.bin", "cd/two.bin"]
    assert blobs.total_bytes() == 5
    blobs.delete("cd/two.bin")
    blobs.delete("cd/two.bin")
    with pytest.raises(FileNotFoundError):
        blobs.get("cd/two.bin")


def test_kvstore_on_memory_blobs(index: CacheIndex) -> None:
    store = KVStore(index, BlobStore(f"memory://ragkv-test-{uuid.uuid4().hex}"))
    kv = _put(store, _key(9))
    got = store.get(_key(9), model_fp=FP, layout=LAYOUT)
    assert got is not None and torch.equal(got["k.0"], kv["k.0"])


def test_file_url_and_local_path(tmp_path: Path) -> None:
    blobs = BlobStore(f"file://{tmp_path / 'viaurl'}")
    blobs.put("x/y.bin", b"abc")
    assert (tmp_path / "viaurl" / "x" / "y.bin").read_bytes() == b"abc"
    assert BlobStore(str(tmp_path / "viaurl")).get("x/y.bin") == b"abc"


def test_atomic_put_leaves_no_temp_files(blobs: BlobStore, store: KVStore) -> None:
    for i in range(5):
        blobs.put(f"aa/{i}.bin", bytes(100 * i))
        _put(store, _key(i))
    files = blobs.fs.find(blobs.root, detail=True)
    assert len(files) == 10
    assert not [p for p in files if p.rsplit("/", 1)[-1].startswith((".", "tmp"))]
    assert blobs.total_bytes() == sum(int(info["size"]) for info in files.values())


@pytest.mark.parametrize("name", ["", "/abs", "../up", "a/../../up", "."])
def test_blob_names_cannot_escape_root(blobs: BlobStore, name: str) -> None:
    with pytest.raises(ValueError):
        blobs.put(name, b"x")


def test_missing_blob_raises_file_not_found(blobs: BlobStore) -> None:
    with pytest.raises(FileNotFoundError):
        blobs.get("no/such.bin")
    blobs.delete("no/such.bin")


# -- index: stats, query log, SQLite behaviour -----------------------------------------------


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



def _entry(index: CacheIndex, i: int, nbytes: int, *, on_remote: bool = False) -> None:
    index.upsert_entry(_key(i), model_fp=FP, layout=LAYOUT, n_tokens=i, nbytes=nbytes,
                       blob_name=blob_name(_key(i)), checksum="0" * 64, dtype="float16",
                       on_remote=on_remote)


def test_transaction_commits_or_rolls_back(index: CacheIndex) -> None:
    doc_id, _ = index.add_document("t.md", "", "1" * 64)
    with index.transaction() as s:
        assert s.scalar(text("SELECT name FROM documents WHERE id = :i"), {"i": doc_id}) == "t.md"
        s.execute(text("UPDATE documents SET source = 'committed' WHERE id = :i"), {"i": doc_id})
    with pytest.raises(RuntimeError), index.transaction() as s:
        s.execute(text("UPDATE documents SET source = 'lost' WHERE id = :i"), {"i": doc_id})
        raise RuntimeError("abort")
    assert index.documents()[0].source == "committed"


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
    _entry(index, 100, 10)
    _entry(index, 102, 1000)
    assert index.document_sizes() == [
        {"document_id": a, "document": "a.md", "chunks": 3, "kv_bytes": 1010},
        {"document_id": b, "document": "b.md", "chunks": 2, "kv_bytes": 10},
    ]


def test_top_entries(index: CacheIndex) -> None:
    a, _ = index.add_document("a.md", "", "1" * 64)
    b, _ = index.add_document("b.md", "", "2" * 64)
    index.add_chunks(a, _records(2))  # keys 100, 101
    index.add_chunks(b, _records(1, tag="b"))  # key 100 again: a.md's chunk was stored first
    for i in (100, 101, 7, 8):
        _entry(index, i, 10)
    assert index.top_entries() == []  # nothing reused yet
    index.record_hits([_key(101), _key(7), _key(7), _key(100), _key(100)])
    top = index.top_entries(10)
    assert [(e["key"], e["hits"]) for e in top] == [(_key(7), 2), (_key(100), 2), (_key(101), 1)]
    assert top[1] == {"key": _key(100), "hits": 2, "n_tokens": 100, "document": "a.md",
                      "ordinal": 0, "text": "chunk 0"}
    assert (top[0]["document"], top[0]["ordinal"], top[0]["text"]) == (None, None, None)
    assert [e["key"] for e in index.top_entries(1)] == [_key(7)]

def test_sqlite_wal_mode(index: CacheIndex, tmp_path: Path) -> None:
    if index.engine.dialect.name != "sqlite":
        pytest.skip("SQLite pragmas")
    with index.engine.connect() as conn:
        assert conn.execute(text("PRAGMA journal_mode")).scalar() == "wal"
        assert conn.execute(text("PRAGMA busy_timeout")).scalar() > 0
    assert (tmp_path / "db" / "index.sqlite").exists()
    assert index.schema_version == SCHEMA_VERSION


def test_two_indexes_on_one_file_see_each_other(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'shared.sqlite'}"
    a, b = CacheIndex(url), CacheIndex(url)
    try:
        doc_id, created = a.add_document("a.md", "", "1" * 64)
        assert created and b.add_document("a.md", "", "1" * 64) == (doc_id, False)
        b.upsert_entry(
            _key(1),
            model_fp=FP,
            layout=LAYOUT,
            n_tokens=1,
            nbytes=1,
            blob_name="x",
            checksum="0" * 64,
            dtype="float16",
        )
        assert a.has_entries([_key(1)]) == {_key(1): True}
        a.record_hits([_key(1)])
        assert b.get_entry(_key(1)).hits == 1  # type: ignore[union-attr]
        b.delete_entry(_key(1))
        assert a.get_entry(_key(1)) is None
    finally:
        a.close()
        b.close()


def test_in_memory_sqlite_index() -> None:
    index = CacheIndex("sqlite://")
    doc_id, _ = index.add_document("m", "", "1" * 64)
    assert index.documents()[0].id == doc_id
    index.close()
