"""Chunk KV get-or-compute: the one place an engine loads a chunk's KV, checks it, and on a
miss computes it and stores it back (docs/design.md §3.6).

Shared by the transformers engine (in the app process) and the vLLM connector's worker (in
vLLM's process): both hand in how to compute a span, everything else is here.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from ragkv.cache_index import KVStore
from ragkv.cache_index.codec import Int8Codec
from ragkv.cache_index.models import ids_sha256
from ragkv.engine.context_score import context_score
from ragkv.engine.kv import ChunkKV, torch_dtype
from ragkv.keys import KV_LAYOUT

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class KVShape:
    """The per-layer KV geometry of one model: entries of another shape are foreign."""

    layers: int
    kv_heads: int
    head_dim: int


class ChunkStore:
    """Chunk KV of one model in a :class:`KVStore`; a miss is never an error.

    fingerprint: the model identity entries must carry (a foreign entry is a miss).
    kv_dtype / codec: how entries are stored (``codec`` quantizes; then float32 goes in).
    """

    def __init__(self, store: KVStore, fingerprint: str, shape: KVShape, kv_dtype: str,
                 codec: Int8Codec | None = None) -> None:
        self.store, self.fingerprint, self.shape = store, fingerprint, shape
        self.kv_dtype, self.codec = kv_dtype, codec

    def load(self, key: str, n_tokens: int, *, shared: bool = False,
             record: bool = True) -> tuple[ChunkKV, str] | None:
        """The stored KV of ``key`` and the tier that served it, or None (a miss).

        ``shared``: a memory-tier hit hands out the tier's own tensors (read-only use).
        ``record=False``: not a use of the entry (``KVStore.fetch``)."""
        found = self.store.fetch(key, model_fp=self.fingerprint, layout=KV_LAYOUT,
                                 shared=shared, record=record)
        if found is None:
            return None
        s = self.shape
        try:
            kv = ChunkKV.from_tensors(found.tensors, layers=s.layers, kv_heads=s.kv_heads,
                                      head_dim=s.head_dim, n_tokens=n_tokens,
                                      dtype=torch_dtype(self.read_dtype))
        except (KeyError, ValueError) as exc:  # a foreign or damaged entry is a miss
            self.store.reject(key, found, f"unusable ({exc})")
            return None
        return kv, found.tier

    @property
    def read_dtype(self) -> str:
        """The dtype a read hands out: the storage dtype, or float32 through the codec."""
        return "float32" if self.codec is not None else self.kv_dtype

    def save(self, key: str, kv: ChunkKV, reference: str | None = None, *,
             ids: Sequence[int] | None = None) -> bool:
        """Store ``kv`` under ``key``; whether it was stored (a failed write is logged by the
        store, never raised).

        ``ids``: the token ids ``kv`` is of, recorded as their digest so the entry leaves the
        cache with the last chunk of them (``CacheIndex.remove_documents``).

        ``reference``: the key of the same tokens' entry in another context (an anchor entry's
        prefix-context twin); when it is stored, ``kv`` is saved with its context score against
        it (:mod:`ragkv.engine.context_score`), else without one."""
        if reference is not None and kv.score is None:
            kv = self.scored(kv, reference)
        tensors = kv.to_tensors(self.read_dtype)
        if not ChunkKV(tensors["k"], tensors["v"]).finite():
            # Every read would reject it: storing it only costs a write and a recompute later.
            log.warning("not storing KV for %s: it holds non-finite values in %s", key,
                        self.read_dtype)
            return False
        return self.store.put(key, tensors, model_fp=self.fingerprint,
                              layout=KV_LAYOUT, n_tokens=kv.n_tokens, codec=self.codec,
                              ids_sha256=None if ids is None else ids_sha256(ids))

    def scored(self, kv: ChunkKV, reference: str,
               compute_reference: Callable[[], ChunkKV] | None = None,
               ids: Sequence[int] | None = None) -> ChunkKV:
        """``kv`` with its context score against the entry ``reference``; where that entry is
        missing, ``compute_reference`` computes it (stored, and ``kv`` scored against it as
        ingestion scores it), else ``kv`` stays unscored (also where it does not match)."""
        found = self.load(reference, kv.n_tokens, shared=True, record=False)
        if found is not None:
            return kv.with_score(context_score(found[0], kv))
        if compute_reference is None:
            return kv
        twin = compute_reference()
        self.save(reference, twin, ids=ids)
        return kv.with_score(context_score(twin, kv))

    def get_or_compute(self, key: str, n_tokens: int, compute: Callable[[], ChunkKV], *,
                       indexed: bool = True, shared: bool = False,
                       reference: str | None = None,
                       compute_reference: Callable[[], ChunkKV] | None = None,
                       ids: Sequence[int] | None = None,
                       record: bool = True) -> tuple[ChunkKV, str | None]:
        """The chunk's KV and the tier that served it (None: computed now and stored back,
        scored against ``reference`` (computed by ``compute_reference`` where it is missing
        too: stored back unscored, the entry changed every later preselection it was in) and
        recorded by ``ids`` as :meth:`save` says).

        ``indexed=False`` (the index already said the key is absent) skips the read;
        ``record=False``: a hit is not a use of the entry (:meth:`load`)."""
        loaded = self.load(key, n_tokens, shared=shared, record=record) if indexed else None
        if loaded is not None:
            return loaded
        kv = compute()
        if reference is not None:
            kv = self.scored(kv, reference, compute_reference, ids)
        self.save(key, kv, ids=ids)
        if self.codec is not None and self.store.memory is not None and key in self.store.memory:
            # the tier holds what the write just decoded: no second encode of the KV
            held = self.load(key, kv.n_tokens, shared=shared, record=False)
            if held is not None:  # (evicted meanwhile: read from disk, the same numbers)
                return held[0], None
        return self.as_stored(kv), None

    def as_stored(self, kv: ChunkKV) -> ChunkKV:
        """``kv`` as a later read of its entry hands it out: rounded to the storage dtype (no
        copy where that changes nothing), or through the codec (on the CPU, as a disk hit
        is). A miss is used so, or an answer would depend on whether its chunks were cache
        hits (with fp16 storage, a near tie could fall the other way)."""
        if self.codec is None or not kv.finite():  # (not stored: no read to match)
            dt = torch_dtype(self.read_dtype)  # not "int8": no torch dtype, a codec's name
            score = None if kv.score is None else kv.score.float()
            return ChunkKV(kv.k.to(dt), kv.v.to(dt), score)
        s = self.shape
        return ChunkKV.from_tensors(self.codec.roundtrip(kv.to_tensors("float32")),
                                    layers=s.layers, kv_heads=s.kv_heads, head_dim=s.head_dim,
                                    n_tokens=kv.n_tokens)

    def stored(self, keys: list[str], *, memory: bool = True,
               blobs: bool = False) -> dict[str, bool]:
        return self.store.contains(keys, memory=memory, blobs=blobs)
