"""Shared fixtures of the cache-index tests: real SQLite files and a real blob folder."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from ragkv.cache_index import (
    BlobStore,
    CacheIndex,
    KVStore,
    blob_name,
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


@pytest.fixture
def index(tmp_path: Path) -> Iterator[CacheIndex]:
    idx = CacheIndex(f"sqlite:///{tmp_path / 'db' / 'index.sqlite'}")
    yield idx
    idx.close()


@pytest.fixture
def blobs(tmp_path: Path) -> BlobStore:
    return BlobStore(str(tmp_path / "blobs"))


@pytest.fixture
def store(index: CacheIndex, blobs: BlobStore) -> KVStore:
    return KVStore(index, blobs)


def _put(store: KVStore, key: str, dtype: torch.dtype = torch.float16) -> dict[str, torch.Tensor]:
    kv = _kv(dtype)
    assert store.put(key, kv, model_fp=FP, layout=LAYOUT, n_tokens=5)
    return kv


def _blob_path(blobs: BlobStore, key: str) -> Path:
    return Path(blobs.root) / blob_name(key)
