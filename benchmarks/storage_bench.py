"""Storage benchmark: index lookup latency and per-tier load throughput.

    python benchmarks/storage_bench.py --name sqlite
    python benchmarks/storage_bench.py --name pg --index-url postgresql+psycopg://.../ragkv_bench

Lookups time the index alone (rows point at fake blobs): presence (``contains``) and full rows
for 1, 8 and 64 random keys at each table size. Rows are bulk-inserted with a ``zz`` key prefix
and deleted at the end, so point ``--index-url`` at a scratch database. Throughput times
``KVStore.fetch`` (read, sha256, decode, hand-out copy) of SmolLM2-135M-sized entries per tier;
the disk figures are with a warm page cache, and the "remote" tier is fsspec's in-memory
filesystem, so it measures the tier's code path, not a network.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import tempfile
import time
import uuid
from pathlib import Path

import torch
from bench_args import count
from sqlalchemy import delete

from ragkv.cache_index import BlobStore, CacheIndex, Int8Codec, KVStore, MemoryTier, residency
from ragkv.cache_index.models import KVEntry
from ragkv.cache_index.policy import POLICIES

# SmolLM2-135M: 30 layers, 3 KV heads, head_dim 64; one 512-token chunk.
LAYERS, KV_HEADS, HEAD_DIM, TOKENS = 30, 3, 64, 512
FP, LAYOUT = "b" * 64, "bench"


def _key(i: int) -> str:
    return f"zz{i:062x}"


def _ms(samples: list[float]) -> dict[str, float]:
    s = sorted(samples)
    return {"median_ms": 1e3 * statistics.median(s), "p95_ms": 1e3 * s[int(0.95 * (len(s) - 1))]}


def lookups(url: str, sizes: list[int], repeats: int) -> list[dict]:
    index = CacheIndex(url)
    out, have = [], 0
    try:
        for n in sizes:
            t = time.perf_counter()
            residency.bulk_insert_entries(index, [
                dict(key=_key(i), model_fp=FP, layout=LAYOUT, n_tokens=TOKENS, nbytes=1,
                     blob_name=f"fake/{i}", checksum="0" * 64, dtype="float16")
                for i in range(have, n)])
            populate_s, have = time.perf_counter() - t, n
            rng = random.Random(n)
            for k in (1, 8, 64):
                for what, fn in (("contains", index.has_entries),
                                 ("rows", lambda ks: residency.lookup_entries(index, ks))):
                    samples = []
                    for _ in range(repeats):
                        keys = [_key(rng.randrange(n)) for _ in range(k)]
                        t = time.perf_counter()
                        found = fn(keys)
                        samples.append(time.perf_counter() - t)
                        assert len(found) == len(set(keys))
                    out.append({"entries": n, "keys": k, "op": what, **_ms(samples),
                                "populate_s": populate_s})
                    print(f"{n:>7} entries {k:>2} keys {what:>8}: "
                          f"{out[-1]['median_ms']:.2f} ms median, {out[-1]['p95_ms']:.2f} p95")
    finally:
        with index.transaction() as s:
            s.execute(delete(KVEntry).where(KVEntry.key.like("zz%")))
        index.close()
    return out


def throughput(root: Path, entries: int, repeats: int) -> list[dict]:
    gen = torch.Generator().manual_seed(0)
    shape = (LAYERS, KV_HEADS, TOKENS, HEAD_DIM)
    out = []
    for dtype in ("float16", "int8"):
        codec = Int8Codec() if dtype == "int8" else None
        sub = root / dtype
        store = KVStore(CacheIndex(f"sqlite:///{sub / 'index.sqlite'}"), BlobStore(str(sub / "b")),
                        remote=BlobStore(f"memory://storage-bench-{uuid.uuid4().hex}"),
                        memory=MemoryTier(None))
        keys = [_key(i) for i in range(entries)]
        for key in keys:
            t = {n: torch.randn(shape, generator=gen).to(torch.float16 if codec is None
                                                          else torch.float32) for n in "kv"}
            assert store.put(key, t, model_fp=FP, layout=LAYOUT, n_tokens=TOKENS, codec=codec)
        blob_bytes = store.index.get_entry(keys[0]).nbytes
        used_bytes = sum(x.numel() * x.element_size()
                         for x in store.fetch(keys[0], model_fp=FP, layout=LAYOUT).tensors.values())
        for tier in ("memory", "disk", "remote"):
            samples = []
            for _ in range(repeats):
                for key in keys:
                    if tier != "memory":
                        store.memory.clear()
                    if tier == "remote":  # force the remote read: drop the local copy first
                        e = store.index.get_entry(key)
                        residency.drop_resident(store.index, key, "disk")
                        store.blobs.delete(e.blob_name)
                    t = time.perf_counter()
                    found = store.fetch(key, model_fp=FP, layout=LAYOUT)
                    samples.append(time.perf_counter() - t)
                    assert found is not None and found.tier == tier, (tier, found and found.tier)
            med = statistics.median(samples)
            out.append({"tier": tier, "kv_dtype": dtype, "blob_bytes": blob_bytes,
                        "decoded_bytes": used_bytes, "fetch_ms_median": 1e3 * med,
                        "stored_MBps": blob_bytes / med / 1e6,
                        "decoded_MBps": used_bytes / med / 1e6})
            print(f"{dtype:>7} {tier:>6}: {1e3 * med:.1f} ms per {blob_bytes / 2**20:.2f} MiB "
                  f"entry, {out[-1]['stored_MBps']:.0f} MB/s stored, "
                  f"{out[-1]['decoded_MBps']:.0f} MB/s decoded")
        store.index.close()
    return out


def policies(n_keys: int = 400, requests: int = 20_000, budget_share: float = 0.1) -> list[dict]:
    """Hit ratio of each eviction policy in a byte-bounded memory tier on a Zipf(0.9) request
    stream over chunks of 64-1024 tokens (bytes proportional to tokens x a per-key width, so
    cost per byte varies across keys as it does across models and dtypes)."""
    rng = random.Random(0)
    tokens = [rng.choice((64, 128, 256, 512, 1024)) for _ in range(n_keys)]
    width = [rng.choice((1, 2, 4)) for _ in range(n_keys)]
    weights = [1 / (r + 1) ** 0.9 for r in range(n_keys)]
    stream = rng.choices(range(n_keys), weights=weights, k=requests)
    total = sum(t * w for t, w in zip(tokens, width, strict=True)) * 4
    out = []
    for name, policy in POLICIES.items():
        tier = MemoryTier(int(total * budget_share), policy)
        hits = saved = 0
        for i in stream:
            if tier.get(_key(i), model_fp=FP, layout=LAYOUT) is not None:
                hits += 1
                saved += tokens[i]
            else:
                tier.put(_key(i), {"k": torch.empty(tokens[i] * width[i], dtype=torch.int8)},
                         model_fp=FP, layout=LAYOUT, tokens=tokens[i])
        out.append({"policy": name, "hit_ratio": hits / requests,
                    "recompute_tokens_saved": saved / sum(tokens[i] for i in stream)})
        print(f"{name:>6}: hit ratio {hits / requests:.3f}, "
              f"recompute tokens saved {out[-1]['recompute_tokens_saved']:.3f}")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--name", default="sqlite")
    ap.add_argument("--index-url", default=None, help="SQLAlchemy URL (default: a temp SQLite)")
    ap.add_argument("--sizes", default="10000,100000")
    ap.add_argument("--repeats", type=count, default=200)
    ap.add_argument("--entries", type=count, default=4, help="entries per tier for throughput")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = ap.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        url = args.index_url or f"sqlite:///{Path(tmp) / 'lookup.sqlite'}"
        result = {
            "name": args.name,
            "index": url.split("://")[0],
            "entry": {"layers": LAYERS, "kv_heads": KV_HEADS, "head_dim": HEAD_DIM,
                      "tokens": TOKENS,
                      "fp16_bytes": 2 * LAYERS * KV_HEADS * TOKENS * HEAD_DIM * 2},
            "lookups": lookups(url, [int(s) for s in args.sizes.split(",")], args.repeats),
            "throughput": throughput(Path(tmp), args.entries, 3),
            "policies": policies(),
        }
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"storage_{args.name}.json"
    path.write_text(json.dumps(result, indent=1))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
