"""The blob store on real files and on fsspec's in-memory filesystem (no mocks): overwrite,
list, size and delete, file URLs, atomic puts, names kept inside the root, missing blobs."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest
import torch
from cache_cases import (  # noqa: F401 - fixtures are used by name
    FP,
    LAYOUT,
    _key,
    _put,
    blobs,
    index,
    store,
)

from ragkv.cache_index import BlobStore, CacheIndex, KVStore

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
