"""ChunkStore's hit/miss rules (docs/design.md §3.6), on a real SQLite index and blob folder.

A stored chunk loads back as stored, from the tier that holds it, under the model and layout it
was stored for; a foreign or damaged entry is a miss, removed so it is recomputed; a miss is
computed once and stored back; nothing here raises for a cache problem.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from ragkv.cache_index import BlobStore, CacheIndex, Int8Codec, KVStore, MemoryTier
from ragkv.engine.chunk_store import ChunkStore, KVShape
from ragkv.engine.kv import ChunkKV
from ragkv.keys import KV_LAYOUT

SHAPE = KVShape(layers=2, kv_heads=2, head_dim=4)
FP = "a" * 64
KEY = "0" * 63 + "1"


def _kv(n_tokens: int = 3, seed: int = 0) -> ChunkKV:
    g = torch.Generator().manual_seed(seed)
    shape = (SHAPE.layers, SHAPE.kv_heads, n_tokens, SHAPE.head_dim)
    return ChunkKV(torch.randn(shape, generator=g), torch.randn(shape, generator=g))


@pytest.fixture
def kvstore(tmp_path: Path) -> Iterator[KVStore]:
    index = CacheIndex(f"sqlite:///{tmp_path / 'index.sqlite'}")
    yield KVStore(index, BlobStore(str(tmp_path / "blobs")))
    index.close()


@pytest.fixture
def with_memory(tmp_path: Path) -> Iterator[KVStore]:
    index = CacheIndex(f"sqlite:///{tmp_path / 'index.sqlite'}")
    yield KVStore(index, BlobStore(str(tmp_path / "blobs")), memory=MemoryTier(None))
    index.close()


class Compute:
    """A compute callback that counts its calls."""

    def __init__(self, kv: ChunkKV) -> None:
        self.kv, self.calls = kv, 0

    def __call__(self) -> ChunkKV:
        self.calls += 1
        return self.kv


def test_miss_then_saved_entry_loads_back_as_stored(kvstore):
    chunks = ChunkStore(kvstore, FP, SHAPE, "float32")
    assert chunks.load(KEY, 3) is None
    assert chunks.stored([KEY]) == {KEY: False}
    kv = _kv()
    chunks.save(KEY, kv)
    assert chunks.stored([KEY, "f" * 64]) == {KEY: True, "f" * 64: False}
    loaded, tier = chunks.load(KEY, 3)
    assert tier == "disk"
    assert torch.equal(loaded.k, kv.k) and torch.equal(loaded.v, kv.v)
    # The entry records what produced it: this model, this layout, its length and dtype.
    entry = kvstore.index.get_entry(KEY)
    assert (entry.model_fp, entry.layout, entry.n_tokens, entry.dtype) == (
        FP, KV_LAYOUT, 3, "float32")


@pytest.mark.parametrize(("kv_dtype", "dtype"), [("float16", torch.float16),
                                                 ("bfloat16", torch.bfloat16)])
def test_entries_are_stored_in_the_configured_dtype(kvstore, kv_dtype, dtype):
    chunks = ChunkStore(kvstore, FP, SHAPE, kv_dtype)
    kv = _kv()
    chunks.save(KEY, kv)
    assert kvstore.index.get_entry(KEY).dtype == kv_dtype
    loaded, _ = chunks.load(KEY, 3)
    assert loaded.k.dtype == dtype and loaded.v.dtype == dtype
    assert torch.equal(loaded.k, kv.k.to(dtype)) and torch.equal(loaded.v, kv.v.to(dtype))


def test_a_codec_quantizes_the_float32_kv(kvstore):
    codec = Int8Codec()
    chunks = ChunkStore(kvstore, FP, SHAPE, "float16", codec=codec)
    kv = _kv()
    chunks.save(KEY, kv)
    assert kvstore.index.get_entry(KEY).dtype == codec.tag
    loaded, _ = chunks.load(KEY, 3)
    # What the codec makes of the float32 KV (not of a float16 rounding of it).
    want = codec.roundtrip(kv.to_tensors("float32"))
    assert torch.equal(loaded.k, want["k"]) and torch.equal(loaded.v, want["v"])


def test_an_int8_miss_is_encoded_once_and_used_as_a_disk_hit_reads_it(with_memory,
                                                                       monkeypatch):
    """The write keeps its own decoded encoding in the memory tier, and the miss hands that
    out: the KV is quantized once, yet the answer is the one a later disk hit gives."""
    codec, encoded = Int8Codec(), []
    encode = Int8Codec.encode
    monkeypatch.setattr(Int8Codec, "encode", lambda self, t: encoded.append(1) or encode(self, t))
    chunks = ChunkStore(with_memory, FP, SHAPE, "float16", codec=codec)
    kv = _kv()
    got, tier = chunks.get_or_compute(KEY, 3, Compute(kv))
    assert tier is None and len(encoded) == 1
    assert with_memory.counters["hits"] == 0, "reading its own write back is not a hit"
    mine = chunks.load(KEY, 3, shared=True)[0]
    assert got.k.data_ptr() != mine.k.data_ptr(), "not shared: a copy the caller may modify"
    with_memory.memory.discard(KEY)
    disk, tier = chunks.load(KEY, 3)
    assert tier == "disk"
    assert torch.equal(got.k, disk.k) and torch.equal(got.v, disk.v)
    assert not torch.equal(got.k, kv.k), "quantized, not the computed KV"
    shared, _ = chunks.get_or_compute("c" * 64, 3, Compute(_kv(seed=2)), shared=True)
    tiers = chunks.load("c" * 64, 3, shared=True)[0]
    assert shared.k.data_ptr() == tiers.k.data_ptr(), "shared: the memory tier's own tensors"


def test_an_unquantized_miss_hands_out_the_computed_kv_even_with_a_memory_tier(with_memory):
    """Only a codec's miss is read back; in the stored dtype the computed KV is the entry."""
    kv = _kv()
    got, tier = ChunkStore(with_memory, FP, SHAPE, "float32").get_or_compute(KEY, 3, Compute(kv))
    assert tier is None and got.k.data_ptr() == kv.k.data_ptr()


def test_another_models_entry_is_a_miss(kvstore):
    ChunkStore(kvstore, FP, SHAPE, "float32").save(KEY, _kv())
    assert ChunkStore(kvstore, "b" * 64, SHAPE, "float32").load(KEY, 3) is None


def test_another_layouts_entry_is_a_miss(kvstore):
    kvstore.put(KEY, _kv().to_tensors("float32"), model_fp=FP, layout=KV_LAYOUT + "x",
                n_tokens=3)
    assert ChunkStore(kvstore, FP, SHAPE, "float32").load(KEY, 3) is None


@pytest.mark.parametrize("bad", ["length", "shape", "tensors", "non-finite", "dtype"])
def test_an_unusable_entry_is_a_logged_miss_and_removed(kvstore, caplog, bad):
    chunks = ChunkStore(kvstore, FP, SHAPE, "float32")
    n = 3
    tensors = _kv().to_tensors("float32")
    if bad == "length":  # stored for another length than the prompt's chunk
        n = 4
    elif bad == "shape":  # another model geometry
        tensors = ChunkKV(torch.zeros(2, 1, 3, 8), torch.zeros(2, 1, 3, 8)).to_tensors("float32")
    elif bad == "tensors":  # not a K/V pair at all
        tensors = {"x": tensors["k"]}
    elif bad == "dtype":  # the right shape, but not the KV this store reads (a foreign writer)
        tensors = {name: t.to(torch.int64) for name, t in tensors.items()}
    else:
        tensors["v"][0, 0, 0, 0] = float("inf")
    kvstore.put(KEY, tensors, model_fp=FP, layout=KV_LAYOUT, n_tokens=3)
    with caplog.at_level(logging.WARNING, logger="ragkv"):
        assert chunks.load(KEY, n) is None
    # The warning names the entry and why it was unusable.
    reason = {"length": "expected", "shape": "expected", "tensors": "'k'",
              "non-finite": "non-finite", "dtype": "expected torch.float32"}[bad]
    assert any(r.getMessage().startswith(f"cache entry {KEY} unusable, recomputing: unusable (")
               and reason in r.getMessage() for r in caplog.records)
    assert chunks.stored([KEY]) == {KEY: False}, "a bad entry is removed, so it is recomputed"
    # ... and the next get-or-compute stores a good one in its place.
    kv = _kv(n)
    got, tier = chunks.get_or_compute(KEY, n, Compute(kv))
    assert tier is None and torch.equal(got.k, kv.k)
    assert chunks.load(KEY, n) is not None


def test_an_unusable_entry_is_a_miss_even_when_removing_it_fails(kvstore, monkeypatch):
    from sqlalchemy.exc import OperationalError

    def index_down(*_args, **_kwargs):
        raise OperationalError("DELETE", {}, Exception("server closed the connection"))

    chunks = ChunkStore(kvstore, FP, SHAPE, "float32")
    kvstore.put(KEY, _kv(4).to_tensors("float32"), model_fp=FP, layout=KV_LAYOUT, n_tokens=4)
    monkeypatch.setattr(kvstore.index, "delete_entry", index_down)
    assert chunks.load(KEY, 3) is None
    kv = _kv()
    got, tier = chunks.get_or_compute(KEY, 3, Compute(kv))
    assert tier is None and torch.equal(got.k, kv.k)


def test_rejecting_an_entry_spares_the_one_stored_after_it_was_read(kvstore):
    bad = kvstore.fetch(KEY, model_fp=FP, layout=KV_LAYOUT)
    assert bad is None
    kvstore.put(KEY, _kv(4).to_tensors("float32"), model_fp=FP, layout=KV_LAYOUT, n_tokens=4)
    bad = kvstore.fetch(KEY, model_fp=FP, layout=KV_LAYOUT)
    assert bad is not None and bad.blob is not None
    good = _kv(3, seed=1)
    ChunkStore(kvstore, FP, SHAPE, "float32").save(KEY, good)  # another writer, meanwhile
    kvstore.reject(KEY, bad, "stored for 4 tokens")
    loaded = ChunkStore(kvstore, FP, SHAPE, "float32").load(KEY, 3)
    assert loaded is not None and torch.equal(loaded[0].k, good.k)
    assert not kvstore.blobs.exists(bad.blob)  # the replaced blob went with the re-put


def test_get_or_compute_hit_does_not_compute(kvstore):
    chunks = ChunkStore(kvstore, FP, SHAPE, "float32")
    kv = _kv()
    chunks.save(KEY, kv)
    compute = Compute(_kv(seed=1))
    got, tier = chunks.get_or_compute(KEY, 3, compute)
    assert compute.calls == 0 and tier == "disk"
    assert torch.equal(got.k, kv.k) and torch.equal(got.v, kv.v)


def test_get_or_compute_counts_a_hit_as_a_use_unless_told(kvstore):
    """A prompt fused again for the rest of its answer reads its chunks without a new use."""
    chunks = ChunkStore(kvstore, FP, SHAPE, "float32")
    chunks.save(KEY, _kv())
    compute = Compute(_kv(seed=1))
    chunks.get_or_compute(KEY, 3, compute)
    assert kvstore.index.get_entry(KEY).hits == 1
    _, tier = chunks.get_or_compute(KEY, 3, compute, record=False)
    assert tier == "disk" and compute.calls == 0
    assert kvstore.index.get_entry(KEY).hits == 1


def test_get_or_compute_miss_computes_once_and_stores_back(kvstore):
    chunks = ChunkStore(kvstore, FP, SHAPE, "float32")
    kv = _kv()
    compute = Compute(kv)
    got, tier = chunks.get_or_compute(KEY, 3, compute)
    assert compute.calls == 1 and tier is None and got.k.data_ptr() == kv.k.data_ptr()
    again, tier = chunks.get_or_compute(KEY, 3, compute)
    assert compute.calls == 1 and tier == "disk"
    assert torch.equal(again.k, kv.k) and torch.equal(again.v, kv.v)


@pytest.mark.parametrize(("kv_dtype", "value", "codec"), [
    ("float32", float("nan"), None), ("float16", 1e6, None),  # fp16 overflows to inf
    ("int8", float("inf"), Int8Codec())])  # raised: went through the codec; or took "int8"
    # for a torch dtype, which failed the query that computed it
def test_kv_with_non_finite_values_is_handed_out_but_not_stored(kvstore, caplog, kv_dtype,
                                                                 value, codec):
    """Every read would reject such an entry: it is not written, and a warning says why."""
    chunks = ChunkStore(kvstore, FP, SHAPE, kv_dtype, codec)
    kv = _kv()
    kv.v[1, 0, 2, 3] = value
    compute = Compute(kv)
    with caplog.at_level(logging.WARNING):
        got, tier = chunks.get_or_compute(KEY, 3, compute)
    assert tier is None and compute.calls == 1 and got.n_tokens == 3
    assert [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING] == [
        f"not storing KV for {KEY}: it holds non-finite values in {chunks.read_dtype}"]
    assert chunks.stored([KEY]) == {KEY: False}
    assert kvstore.ledger.counters["puts"] == 0
    chunks.get_or_compute(KEY, 3, compute)
    assert compute.calls == 2
    assert chunks.save(KEY, kv) is False and chunks.save("b" * 64, _kv()) is True  # not raised


def test_get_or_compute_not_indexed_skips_the_read(kvstore):
    """``indexed=False``: the caller already knows the key is absent, so nothing is read."""
    chunks = ChunkStore(kvstore, FP, SHAPE, "float32")
    chunks.save(KEY, _kv())
    kv = _kv(seed=1)
    compute = Compute(kv)
    got, tier = chunks.get_or_compute(KEY, 3, compute, indexed=False)
    assert compute.calls == 1 and tier is None and got.k.data_ptr() == kv.k.data_ptr()
    assert torch.equal(chunks.load(KEY, 3)[0].k, kv.k), "the computed KV is what is stored"


def test_shared_memory_hits_hand_out_the_tiers_tensors(with_memory):
    chunks = ChunkStore(with_memory, FP, SHAPE, "float32")
    chunks.save(KEY, _kv())
    a, tier = chunks.load(KEY, 3, shared=True)
    b, _ = chunks.load(KEY, 3, shared=True)
    assert tier == "memory"
    assert a.k.data_ptr() == b.k.data_ptr(), "shared: the memory tier's own tensors"
    c, _ = chunks.load(KEY, 3)
    assert c.k.data_ptr() != a.k.data_ptr(), "not shared: a copy the caller may modify"
    d, tier = chunks.get_or_compute(KEY, 3, Compute(_kv(seed=1)), shared=True)
    assert tier == "memory" and d.k.data_ptr() == a.k.data_ptr()
    e, _ = chunks.get_or_compute(KEY, 3, Compute(_kv(seed=1)))
    assert e.k.data_ptr() != a.k.data_ptr()


def test_a_score_already_given_is_stored_as_given(kvstore):
    """Ingestion scores an anchor entry from the twin it just computed and hands the score in,
    so ``save`` neither reads the twin back nor scores again."""
    chunks = ChunkStore(kvstore, FP, SHAPE, "float32")
    chunks.save("b" * 64, _kv(seed=1))  # the twin: stored, and scoring against it is possible
    given = torch.tensor([3.0, 2.0, 1.0])
    chunks.save(KEY, _kv().with_score(given), reference="b" * 64)
    assert torch.equal(chunks.load(KEY, 3)[0].score, given)


def test_a_miss_whose_twin_is_missing_too_is_scored_against_the_twin_computed_now(kvstore):
    """Both of a chunk's entries gone (deleted, evicted, never stored): the anchor entry was
    stored back unscored for good, and every later preselection it was in chose otherwise
    than with the healthy cache. Its twin is now computed, stored and scored against."""
    from ragkv.cache_index.models import ids_sha256
    from ragkv.engine.context_score import context_score

    chunks = ChunkStore(kvstore, FP, SHAPE, "float32")
    twin, kv = _kv(seed=1), _kv()
    make_twin = Compute(twin)
    got, tier = chunks.get_or_compute(KEY, 3, Compute(kv), reference="b" * 64,
                                      compute_reference=make_twin, ids=[5, 6, 7])
    expected = context_score(twin, kv)
    assert tier is None and make_twin.calls == 1 and torch.equal(got.score, expected)
    assert torch.equal(chunks.load(KEY, 3)[0].score, expected)
    stored_twin = chunks.load("b" * 64, 3)[0]
    assert torch.equal(stored_twin.k, twin.k) and stored_twin.score is None
    assert kvstore.index.get_entry("b" * 64).ids_sha256 == ids_sha256([5, 6, 7])
    # a twin that is stored is read, not computed; without a way to compute it, no score
    chunks.get_or_compute("c" * 64, 3, Compute(_kv(seed=2)), reference="b" * 64,
                          compute_reference=make_twin)
    assert make_twin.calls == 1
    assert torch.equal(chunks.load("c" * 64, 3)[0].score, context_score(twin, _kv(seed=2)))
    assert chunks.get_or_compute("d" * 64, 3, Compute(kv), reference="e" * 64)[0].score is None


def test_entries_record_the_digest_of_their_token_ids(kvstore):
    """By it, an entry leaves the cache with the last chunk of those ids
    (``CacheIndex.remove_documents``); an entry saved without ids records none."""
    from ragkv.cache_index.models import ids_sha256

    chunks = ChunkStore(kvstore, FP, SHAPE, "float32")
    chunks.save(KEY, _kv(), ids=[5, 6, 7])
    chunks.get_or_compute("b" * 64, 3, Compute(_kv(seed=1)), ids=[8, 9, 10])
    chunks.save("c" * 64, _kv(seed=2))
    assert [kvstore.index.get_entry(k).ids_sha256 for k in (KEY, "b" * 64, "c" * 64)] == [
        ids_sha256([5, 6, 7]), ids_sha256([8, 9, 10]), None]
    assert ids_sha256([5, 6, 7]) != ids_sha256([5, 6]) and len(ids_sha256([])) == 64


def test_stored_asks_the_memory_tier_unless_told_not_to(with_memory):
    chunks = ChunkStore(with_memory, FP, SHAPE, "float32")
    chunks.save(KEY, _kv())
    with_memory.index.delete_entry(KEY)  # the row gone, as a removal leaves it: memory holds it
    assert chunks.stored([KEY]) == {KEY: True}
    assert chunks.stored([KEY], memory=False) == {KEY: False}


def test_stored_checks_the_blobs_only_when_told(kvstore):
    """A blob deleted behind the cache's back: the row alone says stored; asked with
    ``blobs``, the store looks, and the row goes."""
    chunks = ChunkStore(kvstore, FP, SHAPE, "float32")
    chunks.save(KEY, _kv())
    kvstore.blobs.delete(kvstore.index.get_entry(KEY).blob_name)
    assert chunks.stored([KEY]) == {KEY: True}
    assert chunks.stored([KEY], memory=False, blobs=True) == {KEY: False}
    assert kvstore.index.get_entry(KEY) is None


@pytest.mark.parametrize("scored", [True, False])
@pytest.mark.parametrize(("kv_dtype", "codec"), [("float16", None), ("bfloat16", None),
                                                 ("float32", Int8Codec())])
def test_a_computed_miss_is_used_as_a_later_hit_will_read_it(kvstore, kv_dtype, codec, scored):
    """A miss hands out the KV as stored (rounded to the storage dtype, or through the codec),
    not as computed: else an answer would depend on whether its chunks hit."""
    chunks = ChunkStore(kvstore, FP, SHAPE, kv_dtype, codec)
    computed = _kv().with_score(torch.tensor([0.5, 0.25, 0.125])) if scored else _kv()
    missed, tier = chunks.get_or_compute(KEY, 3, Compute(computed))
    hit, tier2 = chunks.get_or_compute(KEY, 3, Compute(_kv(seed=1)))
    assert tier is None and tier2 == "disk"
    assert not torch.equal(missed.k.float(), computed.k)  # rounded: the test can tell
    assert (missed.k.dtype, missed.v.dtype) == (hit.k.dtype, hit.v.dtype)
    for a, b in ((missed.k, hit.k), (missed.v, hit.v)):
        assert torch.equal(a, b)
    if scored:
        assert missed.score.dtype == hit.score.dtype == torch.float32
        assert torch.equal(missed.score, hit.score)
    else:
        assert missed.score is None and hit.score is None
