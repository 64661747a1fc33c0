"""Shared helpers of the tier, integrity and concurrency tests: a real SQLite file, a real
blob folder, and an optional remote tier on fsspec's in-memory filesystem."""

from __future__ import annotations

import uuid
from pathlib import Path

import torch

from ragkv.cache_index import BlobStore, CacheIndex, KVStore, MemoryTier, make_policy

FP = "f" * 64
LAYOUT = "L2-H4-D8"


def key(i: int) -> str:
    return f"{i:064x}"


def kv(n_tokens: int = 5, seed: int = 0, dtype: torch.dtype = torch.float32,
       heads: int = 4, dim: int = 8) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {name: torch.randn(2, heads, n_tokens, dim, generator=gen).to(dtype)
            for name in ("k", "v")}


def make_store(root: Path, *, memory: int | None = 0, disk: int | None = None,
               remote: bool = False, remote_budget: int | None = None,
               policy: str = "pgdsf") -> KVStore:
    pol = make_policy(policy)
    return KVStore(
        CacheIndex(f"sqlite:///{root / 'index.sqlite'}"),
        BlobStore(str(root / "blobs")),
        remote=BlobStore(f"memory://ragkv-remote-{uuid.uuid4().hex}") if remote else None,
        memory=None if memory == 0 else MemoryTier(memory, pol),
        policy=pol, disk_budget=disk, remote_budget=remote_budget,
    )


def put(store: KVStore, i: int, n_tokens: int = 5, **kw) -> dict[str, torch.Tensor]:
    tensors = kv(n_tokens, seed=i)
    assert store.put(key(i), tensors, model_fp=FP, layout=LAYOUT, n_tokens=n_tokens, **kw)
    return tensors


def get(store: KVStore, i: int):
    return store.fetch(key(i), model_fp=FP, layout=LAYOUT)


def disk_path(store: KVStore, i: int) -> Path:
    """The file of the blob entry ``i``'s row names (each write has a name of its own)."""
    entry = store.index.get_entry(key(i))
    assert entry is not None, i
    return Path(store.blobs.root) / entry.blob_name


def consistent(store: KVStore) -> None:
    """Rows and blobs agree: every row's disk blob exists, every disk blob has its row."""
    from ragkv.cache_index import residency

    on_disk = {e.blob_name for batch in residency.iter_entries(store.index)
               for e in batch if e.on_disk}
    assert set(store.blobs.names()) == on_disk
