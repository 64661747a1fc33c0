"""KV entries through KVStore against real SQLite files and real files (no mocks): put/get
round trips per dtype, the blob encoding and its checksum, hits, overwrites, unsafe keys."""

from __future__ import annotations

import hashlib
import re

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

from ragkv.cache_index import KVStore, decode_kv, encode_kv
from ragkv.cache_index.blobs import checksum_matches

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
    assert re.fullmatch(f"00/{_key(1)}\\.[0-9a-f]+-[0-9a-f]{{8}}\\.safetensors", entry.blob_name)
    assert entry.nbytes == len(_raw(store, _key(1)))


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
    # the re-put wrote a blob of its own and deleted the one it replaced
    root = store.blobs.root.rstrip("/")
    assert [p.removeprefix(root + "/") for p in store.blobs.fs.find(root)] == [entry.blob_name]


def test_an_eviction_ranked_before_a_reput_spares_the_new_blob(store: KVStore, monkeypatch):
    """The evictor read the old row, then the same key was stored again (same bytes, same
    checksum): the new blob and its row must survive the eviction of the old one."""
    from ragkv.cache_index import eviction, residency

    kv = _put(store, _key(1))
    stale = residency.eviction_candidates(store.index, "disk")
    _put(store, _key(1))
    monkeypatch.setattr(residency, "eviction_candidates", lambda *a, **k: stale)
    report = eviction.enforce_budget(store.index, store.blobs, "disk", 0)
    assert report.evicted == 0
    got = store.get(_key(1), model_fp=FP, layout=LAYOUT)
    assert got is not None and torch.equal(got["v.1"], kv["v.1"])
    assert store.counters["corrupt"] == 0


def test_a_reader_of_the_replaced_row_spares_the_new_entry(store: KVStore) -> None:
    """A reader that found the old row's blob gone (the re-put deleted it) takes a miss and
    leaves the new row and blob alone."""
    kv = _put(store, _key(1))
    old = store.index.get_entry(_key(1))
    _put(store, _key(1))
    assert old is not None and store._read(old, "disk", store.blobs, store.ledger.count) is None
    new = store.index.get_entry(_key(1))
    assert new is not None and new.on_disk and new.blob_name != old.blob_name
    got = store.get(_key(1), model_fp=FP, layout=LAYOUT)
    assert got is not None and torch.equal(got["k.0"], kv["k.0"])


def test_put_rejects_unsafe_key(store: KVStore) -> None:
    with pytest.raises(ValueError):
        store.put("../etc", _kv(), model_fp=FP, layout=LAYOUT, n_tokens=5)

