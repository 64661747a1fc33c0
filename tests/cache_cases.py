"""Shared fixtures of the cache-index tests: real SQLite files and a real blob folder, or, under
``make test-services``, a fresh PostgreSQL database and a fresh Redis or S3 prefix per test
(see ``services_cases``): the same tests, whatever the backends."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from services_cases import BLOB_URL, INDEX_URL, fresh_blobs, fresh_database

from ragkv.cache_index import (
    BlobStore,
    CacheIndex,
    ChunkRecord,
    KVStore,
)

FP = "f" * 64
LAYOUT = "L2-H4-D8"


def _key(i: int) -> str:
    return f"{i:064x}"


def _kv(dtype: torch.dtype = torch.float16, n_tokens: int = 5) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(n_tokens)
    return {
        f"{kind}.{layer}": torch.randn(1, 4, n_tokens, 8, generator=gen).to(dtype)
        for layer in range(2)
        for kind in ("k", "v")
    }


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


@pytest.fixture
def index(tmp_path: Path) -> Iterator[CacheIndex]:
    if INDEX_URL:
        with fresh_database(INDEX_URL) as url:
            idx = CacheIndex(url)
            yield idx
            idx.close()
        return
    idx = CacheIndex(f"sqlite:///{tmp_path / 'db' / 'index.sqlite'}")
    yield idx
    idx.close()


@pytest.fixture
def blobs(tmp_path: Path) -> Iterator[BlobStore]:
    if BLOB_URL:
        with fresh_blobs(BLOB_URL) as store:
            yield store
        return
    yield BlobStore(str(tmp_path / "blobs"))


@pytest.fixture
def store(index: CacheIndex, blobs: BlobStore) -> KVStore:
    return KVStore(index, blobs)


def _put(store: KVStore, key: str, dtype: torch.dtype = torch.float16) -> dict[str, torch.Tensor]:
    kv = _kv(dtype)
    assert store.put(key, kv, model_fp=FP, layout=LAYOUT, n_tokens=5)
    return kv


def _blob_path(store: KVStore, key: str) -> str:
    """The path, inside ``store.blobs.fs`` (a file, a Redis key or an S3 object), of the blob
    ``key``'s row names (every write has a blob name of its own)."""
    entry = store.index.get_entry(key)
    assert entry is not None, key
    return f"{store.blobs.root.rstrip('/')}/{entry.blob_name}"


def _raw(store: KVStore, key: str) -> bytes:
    return bytes(store.blobs.fs.cat_file(_blob_path(store, key)))


def _overwrite(store: KVStore, key: str, data: bytes) -> None:
    """Replace the stored bytes behind BlobStore's back, as damage on any backend would."""
    store.blobs.fs.pipe_file(_blob_path(store, key), data)


def _on_store(blobs: BlobStore, key: str) -> bool:
    """Whether any blob written for ``key`` is still stored."""
    root = blobs.root.rstrip("/")
    if not blobs.fs.exists(root):
        return False
    return any(p.rsplit("/", 1)[-1].startswith(f"{key}.") for p in blobs.fs.find(root))
