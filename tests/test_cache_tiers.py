"""Tiers, budgets and eviction against a real SQLite file, a real blob folder and fsspec's
in-memory filesystem as the remote tier; plus a budget far below the working set under a
query loop with the tiny model: no failed query, the same answers."""

from __future__ import annotations

import pytest
import torch
from api_cases import (  # noqa: F401 - fixtures are used by name
    MAX_NEW,
    QUESTION,
    _one_thread,
    engine,
    make_config,
    seed,
)
from storage_cases import FP, LAYOUT, consistent, disk_path, get, key, kv, make_store, put

from ragkv.api import RagKV, RetrievedChunk
from ragkv.cache_index import LRU, PGDSF, MemoryTier, residency


def test_reads_walk_down_and_promote(tmp_path):
    store = make_store(tmp_path, memory=None, remote=True)
    want = put(store, 1)
    entry = store.index.get_entry(key(1))
    assert entry.on_disk and entry.on_remote and store.remote.get(entry.blob_name)
    assert get(store, 1).tier == "memory"
    store.memory.clear()
    assert get(store, 1).tier == "disk"
    store.memory.clear()
    disk_path(store, 1).unlink()  # lost locally, still remote
    found = get(store, 1)
    assert found.tier == "remote" and torch.equal(found.tensors["v"], want["v"])
    assert disk_path(store, 1).is_file() and store.index.get_entry(key(1)).on_disk  # promoted
    assert get(store, 1).tier == "memory"
    s = store.stats()
    assert s["memory"]["hits"] == 2 and s["disk"]["hits"] == 1 and s["remote"]["hits"] == 1
    assert s["remote"]["bytes_read"] == entry.nbytes and s["disk"]["corrupt"] == 1


def test_memory_tier_hands_out_copies(tmp_path):
    store = make_store(tmp_path, memory=None)
    want = put(store, 2)
    got = get(store, 2).tensors
    got["k"].zero_()  # a caller scribbling on its KV cannot poison the cache
    assert torch.equal(get(store, 2).tensors["k"], want["k"])


def test_a_shared_memory_hit_is_the_tiers_own_tensors_and_a_copy_is_not(tmp_path):
    store = make_store(tmp_path, memory=None)
    put(store, 3)
    a = store.fetch(key(3), model_fp=FP, layout=LAYOUT, shared=True)
    b = store.fetch(key(3), model_fp=FP, layout=LAYOUT, shared=True)
    c = store.fetch(key(3), model_fp=FP, layout=LAYOUT)
    assert a.tier == b.tier == c.tier == "memory"
    assert a.tensors["k"].data_ptr() == b.tensors["k"].data_ptr() != c.tensors["k"].data_ptr()
    assert torch.equal(a.tensors["k"], c.tensors["k"])


def test_memory_tier_budget_by_bytes():
    tier = MemoryTier(budget=3 * 2 * 2 * 4 * 5 * 8 * 4, policy=LRU())  # three entries
    for i in range(5):
        tier.put(key(i), kv(seed=i), model_fp=FP, layout=LAYOUT, tokens=5)
        tier.get(key(0), model_fp=FP, layout=LAYOUT)  # keep 0 recently used
    assert len(tier) == 3 and tier.nbytes <= tier.budget and key(0) in tier
    assert key(4) in tier and tier.evictions == 2
    assert not tier.put(key(9), kv(n_tokens=100), model_fp=FP, layout=LAYOUT, tokens=100)


def test_pgdsf_keeps_frequent_and_costly_lru_keeps_recent():
    p, lru = PGDSF(), LRU()
    # Same size: more hits wins. Same hits: more tokens per byte (costlier to recompute) wins.
    assert p.priority(hits=5, tokens=100, nbytes=1000, now=0, clock=0) > \
        p.priority(hits=1, tokens=100, nbytes=1000, now=0, clock=0)
    assert p.priority(hits=1, tokens=100, nbytes=500, now=0, clock=0) > \
        p.priority(hits=1, tokens=100, nbytes=1000, now=0, clock=0)
    # Aging: a new entry starts at the clock, above an old one never touched since.
    assert p.priority(hits=0, tokens=1, nbytes=1000, now=0, clock=0.5) > \
        p.priority(hits=3, tokens=100, nbytes=1000, now=0, clock=0)
    assert lru.priority(hits=99, tokens=1, nbytes=1, now=1.0, clock=0) < \
        lru.priority(hits=0, tokens=1, nbytes=1, now=2.0, clock=0)


def test_a_promoted_entry_ranks_by_its_hits_in_the_index(tmp_path):
    """PGDSF ranks by frequency: a chunk read up from disk brings the hits the index counted
    for it. Counted from zero, a frequent chunk ranked below every resident entry and the next
    promotion evicted it again, so it was read from disk on every query."""
    store = make_store(tmp_path, memory=2 * 2560)  # two entries of kv(5): 2 x 1280 bytes
    for i in range(3):
        put(store, i)
    store.memory.clear()
    for _ in range(10):  # entry 2 is the frequent one (one disk read, then memory hits)
        get(store, 2)
    store.memory.clear()
    for _ in range(3):
        get(store, 0)
    get(store, 1)  # memory: 0 (3 hits) and 1 (1 hit)
    evicted = store.memory.evictions
    assert get(store, 2).tier == "disk"  # promoted with its 11 hits: 1 leaves
    assert get(store, 1).tier == "disk"  # promoted: 0, the least frequent, leaves, not 2
    assert get(store, 2).tier == "memory" and key(0) not in store.memory
    assert store.memory.evictions - evicted == 2


def test_reads_that_promote_keep_the_disk_budget(tmp_path):
    store = make_store(tmp_path, remote=True)
    put(store, 0)
    size = store.index.get_entry(key(0)).nbytes
    for i in range(1, 8):
        put(store, i)
    store.budgets["disk"] = 3 * size
    store.apply_budgets()  # three on disk, all eight on the remote tier
    for i in range(8):  # queries only read: each disk miss is copied up from the remote tier
        assert get(store, i) is not None
    n, total = residency.tier_bytes(store.index, "disk")
    assert total <= 3 * size and n == 3
    consistent(store)


def test_the_memory_tier_counts_what_it_drops_again():
    tier = MemoryTier(budget=None, policy=LRU())
    empty = {"k": torch.zeros(2, 4, 0, 8), "v": torch.zeros(2, 4, 0, 8)}
    for i in range(3):
        tier.put(key(i), empty, model_fp=FP, layout=LAYOUT, tokens=0)
        tier.put(key(i), kv(seed=i), model_fp=FP, layout=LAYOUT, tokens=5)  # replaces it
        tier.put(key(i), empty, model_fp=FP, layout=LAYOUT, tokens=0)
    for i in range(3):
        tier.discard(key(i))
    assert len(tier) == 0 and tier.nbytes == 0


@pytest.mark.parametrize("policy", ["pgdsf", "lru"])
def test_disk_budget_evicts_by_policy_and_stays_consistent(tmp_path, policy):
    store = make_store(tmp_path, policy=policy)
    put(store, 0)
    size = store.index.get_entry(key(0)).nbytes
    store.budgets["disk"] = 4 * size
    for _ in range(3):
        assert get(store, 0) is not None  # entry 0 is hot, and touched before the others
    for i in range(1, 8):
        put(store, i)
    n, total = residency.tier_bytes(store.index, "disk")
    assert total <= 4 * size and n == 4
    hot_kept = store.index.get_entry(key(0)) is not None
    assert hot_kept == (policy == "pgdsf")  # LRU forgets it: the others were touched later
    assert store.index.get_entry(key(7)) is not None
    assert store.stats()["disk"]["evictions"] == 4
    consistent(store)
    if policy == "pgdsf":
        assert residency.clock(store.index) > 0  # aging advanced


def test_disk_eviction_keeps_remote_copy(tmp_path):
    store = make_store(tmp_path, remote=True)
    put(store, 1)
    size = store.index.get_entry(key(1)).nbytes
    store.budgets["disk"] = size
    put(store, 2)
    e1 = store.index.get_entry(key(1))
    assert e1 is not None and not e1.on_disk and e1.on_remote
    assert not disk_path(store, 1).exists()
    assert store.contains([key(1)]) == {key(1): True}
    assert get(store, 1).tier == "remote"
    consistent(store)
    store.budgets["remote"] = 0
    store.apply_budgets()
    assert store.index.stats()["kv_entries"] <= 1 and store.remote.names() == []


# ---- budgets far below the working set under a query loop ---------------------------------

def _combos(chunks):
    return [chunks[:3], chunks[1:4], [chunks[3], chunks[0]], chunks[2:5], chunks[:2]]


def _answers(rag: RagKV, chunks, rounds: int = 2):
    out = []
    for _ in range(rounds):
        for combo in _combos(chunks):
            a = rag.generate(combo, QUESTION, mode="blend", max_new_tokens=MAX_NEW,
                             keep_kv=True, log_query=False)
            out.append((a.tokens, a.first.logits, [c.tier for c in a.trace.chunks]))
    return out


@pytest.mark.parametrize("memory", [0, 40_000])
def test_tiny_budgets_never_fail_or_change_answers(tmp_path, seed, engine, memory):
    ref_rag = RagKV(make_config(tmp_path / "ref"), engine=engine)
    base = RagKV(make_config(seed[0]), engine=engine)
    chunks = [RetrievedChunk(c.token_ids, c.cache_key) for c in base.index.chunks()][:5]
    base.index.close()
    assert len(chunks) == 5
    ref = _answers(ref_rag, chunks)
    # An entry of this model is ~10-40 kB: a 30 kB disk budget holds about one.
    rag = RagKV(make_config(tmp_path / "tight", memory_budget_bytes=memory,
                            disk_budget_bytes=30_000), engine=engine)
    got = _answers(rag, chunks)
    for (t_ref, l_ref, _), (t, logits, _) in zip(ref, got, strict=True):
        assert t == t_ref and torch.equal(logits, l_ref)
    stats = rag.backend.store.stats()
    assert stats["disk"]["evictions"] > 0 and stats["disk"]["resident_bytes"] <= 30_000
    tiers = {t for _, _, ts in got for t in ts}
    assert None in tiers  # some chunks were evicted and recomputed
    if memory:
        assert "memory" in tiers and rag.backend.store.memory.nbytes <= memory
    consistent(rag.backend.store)
    ref_rag.index.close()
    rag.index.close()


def test_queries_fuse_from_the_memory_tiers_own_tensors_without_changing_them(tmp_path, seed,
                                                                               engine):
    """The transformers engine reads memory-tier hits without copying them: no mode, nor
    decoding or scoring after it, may write into them, and a memory hit answers exactly as
    the disk hit that filled the tier."""
    import shutil

    from ragkv.keys import KV_LAYOUT

    shutil.copytree(seed[0], tmp_path / "home")
    rag = RagKV(make_config(tmp_path / "home", memory_budget_bytes=64 << 20), engine=engine)
    chunks = [RetrievedChunk(c.token_ids, c.cache_key) for c in rag.index.chunks()][:3]
    store, fp = rag.backend.store, rag.backend.chunks.fingerprint
    for mode in ("reuse", "blend"):
        store.memory.clear()
        first = rag.generate(chunks, QUESTION, mode=mode, keep_kv=True, max_new_tokens=MAX_NEW)
        assert {c.tier for c in first.trace.chunks} == {"disk"}
        keys = [c.key for c in first.trace.chunks]
        held = [store.memory.get(k, model_fp=fp, layout=KV_LAYOUT, shared=True) for k in keys]
        before = [{n: t.clone() for n, t in h.items()} for h in held]
        first.score(first.tokens)
        again = rag.generate(chunks, QUESTION, mode=mode, keep_kv=True, max_new_tokens=MAX_NEW)
        again.score(first.tokens)
        assert {c.tier for c in again.trace.chunks} == {"memory"}
        assert again.tokens == first.tokens and torch.equal(again.first.logits,
                                                            first.first.logits)
        for h, b in zip(held, before, strict=True):
            assert all(torch.equal(h[n], b[n]) for n in b)
    rag.index.close()


def spy_on_touch(monkeypatch) -> list[tuple[list[str], bool]]:
    """The keys and hit flag of every index transaction that records reads (still made)."""
    calls = []
    real = residency.touch

    def touch(index, keys, policy, *, hit):
        calls.append((list(keys), hit))
        real(index, keys, policy, hit=hit)

    monkeypatch.setattr(residency, "touch", touch)
    return calls


def test_batched_hits_record_every_read_in_one_transaction_when_the_block_ends(tmp_path,
                                                                              monkeypatch):
    """A fused request reads an entry per chunk; its hits reach the index together, with the
    counts that one transaction per read gave, also when the block raises."""
    store = make_store(tmp_path)
    for i in range(3):
        put(store, i)
    calls = spy_on_touch(monkeypatch)
    hits = lambda i: store.index.get_entry(key(i)).hits  # noqa: E731
    before = [hits(i) for i in range(3)]
    with store.batched_hits():
        get(store, 0)
        get(store, 0)
        get(store, 2)
        with store.batched_hits():  # nested: the outer block records it
            get(store, 1)
        assert calls == [] and hits(0) == before[0]
    assert calls == [([key(0), key(0), key(2), key(1)], True)]
    assert [hits(i) - b for i, b in enumerate(before)] == [2, 1, 1]
    get(store, 1)  # outside a block: at once
    assert len(calls) == 2 and hits(1) == before[1] + 2
    with pytest.raises(RuntimeError), store.batched_hits():
        get(store, 2)
        raise RuntimeError("the fusion failed")
    assert calls[-1] == ([key(2)], True) and hits(2) == before[2] + 2


def test_a_fused_query_records_its_chunks_hits_in_one_transaction(tmp_path, seed, engine,
                                                                  monkeypatch):
    import shutil

    shutil.copytree(seed[0], tmp_path / "home")
    rag = RagKV(make_config(tmp_path / "home"), engine=engine)
    chunks = [RetrievedChunk(c.token_ids, c.cache_key) for c in rag.index.chunks()][:3]
    rag.generate(chunks, QUESTION, mode="blend", max_new_tokens=1)  # the template prefix
    calls = spy_on_touch(monkeypatch)
    trace = rag.generate(chunks, QUESTION, mode="blend", max_new_tokens=1).trace
    assert all(c.hit for c in trace.chunks)
    assert calls == [([c.key for c in trace.chunks], True)]
    rag.index.close()


@pytest.mark.parametrize("policy", ["pgdsf", "lru"])
def test_an_entry_promoted_to_a_full_disk_stays_there(tmp_path, policy):
    """A read copied an entry up from the remote tier with the rank it was evicted with, at
    or below the eviction clock, so its own budget pass evicted it again: every read of it
    went to the remote tier."""
    store = make_store(tmp_path, remote=True, policy=policy)
    for i in (1, 2, 3):
        put(store, i)
    store.budgets["disk"] = 2 * store.index.get_entry(key(1)).nbytes
    store.apply_budgets()
    (gone,) = [i for i in (1, 2, 3) if not store.index.get_entry(key(i)).on_disk]
    assert [get(store, gone).tier for _ in range(3)] == ["remote", "disk", "disk"]
    assert store.index.get_entry(key(gone)).on_disk
    consistent(store)


def test_reads_for_bookkeeping_count_no_miss(tmp_path):
    """``record=False`` reads (ragkv's own, such as scoring an anchor entry) counted the
    misses of foreign entries and bad blobs into the store's hit rate."""
    store = make_store(tmp_path)
    put(store, 1)
    put(store, 2)
    disk_path(store, 2).write_bytes(disk_path(store, 2).read_bytes()[:-3])
    assert store.fetch(key(1), model_fp="e" * 64, layout=LAYOUT, record=False) is None
    assert store.fetch(key(2), model_fp=FP, layout=LAYOUT, record=False) is None
    assert store.counters["misses"] == 0 and store.ledger.tier_counts()["disk"]["misses"] == 0
    assert store.counters["corrupt"] == 2  # both bad entries are still counted as bad


def test_a_removal_by_another_process_reaches_this_processs_memory_copies(tmp_path) -> None:
    """A served engine's connector kept serving removed documents' KV from its memory tier,
    reported as hits, after the app process removed them (rows and blobs gone)."""
    server = make_store(tmp_path, memory=None)  # the process that answers, with a memory tier
    app = make_store(tmp_path)  # the process that removes, over the same index and blobs
    put(server, 1, ids_sha256="d1")
    put(server, 2, ids_sha256="d2")
    put(server, 3, ids_sha256="d3")
    assert get(server, 1).tier == "memory"
    # An entry a budget evicted stays servable from memory until something is removed.
    assert residency.drop_resident(server.index, key(3), "disk")
    assert get(server, 3).tier == "memory"
    assert app.remove_unreferenced(["d1"]) == 1  # no chunk names these ids: removed
    assert server.contains([key(1), key(2)]) == {key(1): False, key(2): True}
    assert get(server, 1) is None and key(1) not in server.memory
    assert get(server, 2).tier == "memory"
    assert get(server, 3) is None  # its row went too: checked with the removal
