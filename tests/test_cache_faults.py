"""Bad cache entries are misses, never errors: damaged, deleted, foreign or unreachable."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from cache_cases import (  # noqa: F401 - fixtures are used by name
    FP,
    LAYOUT,
    _blob_path,
    _key,
    _kv,
    _on_store,
    _overwrite,
    _put,
    _raw,
    blobs,
    index,
    store,
)
from sqlalchemy import text

from ragkv.cache_index import (
    BlobStore,
    CacheIndex,
    KVStore,
)

# -- bad entries are misses ------------------------------------------------------------------


def _truncate(store: KVStore, key: str) -> None:
    data = _raw(store, key)
    _overwrite(store, key, data[: len(data) // 2])


def _flip(store: KVStore, key: str) -> None:
    data = bytearray(_raw(store, key))
    data[-10] ^= 0xFF
    _overwrite(store, key, bytes(data))


def _flip_header(store: KVStore, key: str) -> None:
    data = bytearray(_raw(store, key))
    data[3] ^= 0xFF  # the header length: undecodable, not merely wrong numbers
    _overwrite(store, key, bytes(data))


def _remove(store: KVStore, key: str) -> None:
    store.blobs.fs.rm_file(_blob_path(store, key))


@pytest.mark.parametrize("damage", [_truncate, _flip, _flip_header, _remove])
def test_damaged_blob_is_a_miss_and_is_removed(
    store: KVStore, damage: Callable[[KVStore, str], None], caplog: pytest.LogCaptureFixture
) -> None:
    _put(store, _key(7))
    damage(store, _key(7))
    with caplog.at_level(logging.WARNING, logger="ragkv.cache"):
        assert store.get(_key(7), model_fp=FP, layout=LAYOUT) is None
    assert any(r.name == "ragkv.cache" for r in caplog.records)
    assert store.index.get_entry(_key(7)) is None
    assert not _on_store(store.blobs, _key(7))
    assert store.counters["corrupt"] == 1 and store.counters["misses"] == 1
    kv = _put(store, _key(7))
    got = store.get(_key(7), model_fp=FP, layout=LAYOUT)
    assert got is not None and torch.equal(got["v.1"], kv["v.1"])


def test_foreign_blob_metadata_is_a_miss(store: KVStore) -> None:
    # Another key's blob moved under this key's name, with a row whose checksum matches it:
    # only the embedded metadata can tell.
    _put(store, _key(1))
    _put(store, _key(2))
    _overwrite(store, _key(2), _raw(store, _key(1)))
    e1, e2 = store.index.get_entry(_key(1)), store.index.get_entry(_key(2))
    assert e1 is not None and e2 is not None
    store.index.upsert_entry(
        _key(2),
        model_fp=FP,
        layout=LAYOUT,
        n_tokens=5,
        nbytes=e1.nbytes,
        blob_name=e2.blob_name,
        checksum=e1.checksum,
        dtype=e1.dtype,
    )
    assert store.get(_key(2), model_fp=FP, layout=LAYOUT) is None
    assert store.index.get_entry(_key(2)) is None and not _on_store(store.blobs, _key(2))
    assert store.get(_key(1), model_fp=FP, layout=LAYOUT) is not None
    _put(store, _key(2))
    assert store.get(_key(2), model_fp=FP, layout=LAYOUT) is not None


@pytest.mark.parametrize("field", ["model_fp", "layout"])
def test_model_or_layout_mismatch_is_a_miss(store: KVStore, field: str) -> None:
    _put(store, _key(4))
    expected = {"model_fp": FP, "layout": LAYOUT, field: "something-else"}
    assert store.get(_key(4), **expected) is None
    assert store.index.get_entry(_key(4)) is None
    assert not _on_store(store.blobs, _key(4))
    assert store.put(_key(4), _kv(), n_tokens=5, **expected)
    assert store.get(_key(4), **expected) is not None


def test_index_row_without_matching_blob_metadata_fp(store: KVStore) -> None:
    # The row claims the expected model but the blob says otherwise.
    other = KVStore(store.index, store.blobs)
    assert other.put(_key(5), _kv(), model_fp="0" * 64, layout=LAYOUT, n_tokens=5)
    entry = store.index.get_entry(_key(5))
    assert entry is not None
    store.index.upsert_entry(
        _key(5),
        model_fp=FP,
        layout=LAYOUT,
        n_tokens=5,
        nbytes=entry.nbytes,
        blob_name=entry.blob_name,
        checksum=entry.checksum,
        dtype=entry.dtype,
    )
    assert store.get(_key(5), model_fp=FP, layout=LAYOUT) is None
    assert store.index.get_entry(_key(5)) is None


def _header(body: str) -> bytes:
    import struct

    return struct.pack("<Q", len(body)) + body.encode()


@pytest.mark.parametrize("data", [
    # numbers past a float's range, which int() cannot take
    _header('{"k": {"dtype": "F16", "shape": [2], "data_offsets": [0, 1e400]}}'),
    _header('{"k": {"dtype": "F16", "shape": [1e400], "data_offsets": [0, 2]}}'),
    _header("[" * 50_000 + "]" * 50_000),  # nested deeper than the JSON parser goes
], ids=["offset", "shape", "nesting"])
def test_a_header_no_parser_takes_is_a_miss(store: KVStore, data: bytes) -> None:
    # A row whose checksum matches the blob (a foreign writer's): only the header can tell.
    from ragkv.cache_index.blobs import checksum

    _put(store, _key(6))
    _overwrite(store, _key(6), data)
    entry = store.index.get_entry(_key(6))
    assert entry is not None
    store.index.upsert_entry(_key(6), model_fp=FP, layout=LAYOUT, n_tokens=5,
                             nbytes=len(data), blob_name=entry.blob_name,
                             checksum=checksum(data), dtype=entry.dtype)
    assert store.get(_key(6), model_fp=FP, layout=LAYOUT) is None
    assert store.index.get_entry(_key(6)) is None and not _on_store(store.blobs, _key(6))


def test_a_put_the_index_refuses_leaves_no_blob(store: KVStore, monkeypatch) -> None:
    from sqlalchemy.exc import OperationalError

    def locked(*_args, **_kwargs):
        raise OperationalError("INSERT", {}, Exception("database is locked"))

    monkeypatch.setattr(store.index, "upsert_entry", locked)
    assert not store.put(_key(8), _kv(), model_fp=FP, layout=LAYOUT, n_tokens=5)
    assert store.counters["put_errors"] == 1
    assert not _on_store(store.blobs, _key(8)), "no row names it, so no budget would count it"


def test_a_conditional_delete_spares_a_re_put_entry(store: KVStore) -> None:
    _put(store, _key(9))
    old = store.index.get_entry(_key(9))
    _put(store, _key(9))  # another writer's, under a blob name of its own
    assert old is not None and not store.index.delete_entry(_key(9), blob=old.blob_name)
    assert store.get(_key(9), model_fp=FP, layout=LAYOUT) is not None
    new = store.index.get_entry(_key(9))
    assert new is not None and store.index.delete_entry(_key(9), blob=new.blob_name)
    assert store.index.get_entry(_key(9)) is None


def test_unreachable_index_is_a_miss_not_an_error(tmp_path: Path) -> None:
    index = CacheIndex(f"sqlite:///{tmp_path / 'gone.sqlite'}")
    store = KVStore(index, BlobStore(str(tmp_path / "b")))
    _put(store, _key(1))
    with index.engine.begin() as conn:
        conn.execute(text("DROP TABLE kv_entries"))
    assert store.get(_key(1), model_fp=FP, layout=LAYOUT) is None
    assert store.contains([_key(1)]) == {_key(1): False}
    assert store.put(_key(1), _kv(), model_fp=FP, layout=LAYOUT, n_tokens=5) is False
    assert store.counters["put_errors"] == 1
    index.close()
