"""Where precomputed chunk KV caches live: a relational index plus a blob store.

:class:`KVStore` is the facade the engine uses; :class:`CacheIndex` and :class:`BlobStore` are
its two halves, exposed for ingestion, the UI and tests.
"""

from __future__ import annotations

from ragkv.cache_index.blobs import BlobStore, decode_kv, encode_kv
from ragkv.cache_index.index import CacheIndex
from ragkv.cache_index.models import (
    SCHEMA_VERSION,
    ChunkInfo,
    ChunkRecord,
    DocumentInfo,
    EntryInfo,
)
from ragkv.cache_index.store import KVStore, blob_name

__all__ = [
    "SCHEMA_VERSION",
    "BlobStore",
    "CacheIndex",
    "ChunkInfo",
    "ChunkRecord",
    "DocumentInfo",
    "EntryInfo",
    "KVStore",
    "blob_name",
    "decode_kv",
    "encode_kv",
]
