"""Where precomputed chunk KV caches live: a relational index plus a blob store.

:class:`KVStore` is the facade the engine uses; :class:`CacheIndex` and :class:`BlobStore` are
its two halves, exposed for ingestion, the UI and tests.
"""

from __future__ import annotations

from ragkv.cache_index.blobs import BlobStore, decode_kv, encode_kv
from ragkv.cache_index.codec import Int8Codec
from ragkv.cache_index.index import CacheIndex
from ragkv.cache_index.integrity import VerifyReport, verify
from ragkv.cache_index.memory import MemoryTier
from ragkv.cache_index.models import (
    SCHEMA_VERSION,
    ChunkInfo,
    ChunkRecord,
    DocumentInfo,
    EntryInfo,
)
from ragkv.cache_index.policy import LRU, PGDSF, make_policy
from ragkv.cache_index.store import KVStore
from ragkv.cache_index.tiers import TIERS, Fetched, TierStats, blob_name

__all__ = [
    "LRU",
    "PGDSF",
    "SCHEMA_VERSION",
    "TIERS",
    "BlobStore",
    "CacheIndex",
    "ChunkInfo",
    "ChunkRecord",
    "DocumentInfo",
    "EntryInfo",
    "Fetched",
    "Int8Codec",
    "KVStore",
    "MemoryTier",
    "TierStats",
    "VerifyReport",
    "blob_name",
    "decode_kv",
    "encode_kv",
    "make_policy",
    "verify",
]
