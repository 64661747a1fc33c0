"""Soak: many client processes over one cache for minutes, with a cache budget below the
working set and ingestion running meanwhile; then a quiet rerun and the cache verify.

    python benchmarks/soak.py [--minutes 10] [--clients 8] [--home DIR] [--out FILE]

One SQLite index and one blob folder (a fresh temporary home unless ``--home``); the corpus is
every chunk of the public pydoc and prose cases, one document each. A part of it (``--initial``)
is ingested first; the disk budget is set clearly below the working set (all chunks' KV) and
each process's memory tier is small, so eviction runs throughout. Then, at once:

* ``--clients`` processes (spawned, one torch thread each) ask case questions over the case's
  chunks in random orders (seeded per client): blend at ratio 0.15, 8 greedy new tokens;
  every query's chunk keys, question, token ids, TTFT, hits and error (caught) are recorded;
* one process ingests the rest of the corpus, each new document followed by one ingested
  before again (its evicted chunks are computed back), then all of it again, in a loop,
  removing every third document first (its KV leaves the cache while clients read it).

Afterwards one quiet process (one thread, nothing else running) asks every distinct prompt
again (a seeded sample of ``--rerun`` when there are more): the cache may miss, but an answer
must never change. Last, ``ragkv cache verify``'s check (the same function, report only) must
find no bad entry and no orphan blob. Prints a summary and writes
``benchmarks/results/soak.json``; exits 1 if a query or ingestion failed, an answer differs
or verify found anything. What each process does is in ``soak_clients.py``.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import random
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

from bench_args import out_file
from soak_clients import (
    ROOT,
    corpus,
    join_all,
    load_cases,
    logged_warnings,
    make_config,
    open_rag,
    read_result,
    spawn,
    store_counters,
)

KV_BYTES = 2  # float16 storage, the default


def setup(spec: dict, docs: list[tuple[str, str]]) -> dict:
    """Working set vs budgets, then the first part of the corpus ingested (in this process)."""
    rag = open_rag(spec, "setup", threads=max(1, min(4, os.cpu_count() or 1)))
    r = rag.backend.engine.runner
    per_token = 2 * r.n_layers * r.kv_heads * r.head_dim * KV_BYTES
    tokens = sum(len(rag.tokenizer(t, add_special_tokens=False).input_ids) for _, t in docs)
    working_set = tokens * per_token
    # The budgets were unknown until the model was open: set them on this store too.
    spec["disk_budget"] = int(working_set * spec["budget_fraction"])
    rag.backend.store.budgets["disk"] = spec["disk_budget"]
    t = time.perf_counter()
    for name, text in docs[:spec["initial"]]:
        rag.ingest_text(name, text)
    info = {"documents": len(docs), "tokens": tokens, "kv_bytes_per_token": per_token,
            "working_set_bytes": working_set, "disk_budget_bytes": spec["disk_budget"],
            "memory_budget_bytes_per_process": spec["memory_budget"],
            "initial_documents": spec["initial"],
            "initial_ingest_s": time.perf_counter() - t, "store": store_counters(rag)}
    rag.close()
    return info


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--minutes", type=float, default=10.0)
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--home", type=Path, default=None,
                    help="cache home to use and keep (default: a fresh temporary one)")
    ap.add_argument("--out", type=out_file, default=ROOT / "benchmarks/results/soak.json")
    ap.add_argument("--cases", type=int, default=None,
                    help="first N cases of each case file (default: all)")
    ap.add_argument("--budget-fraction", type=float, default=0.4,
                    help="disk budget as a fraction of the working set")
    ap.add_argument("--memory-mb", type=float, default=64.0,
                    help="memory tier budget of each process")
    ap.add_argument("--initial", type=float, default=0.25,
                    help="fraction of the corpus ingested before the soak starts")
    ap.add_argument("--rerun", type=int, default=100,
                    help="distinct prompts rerun quietly: all up to N, else a sample of N "
                         "(0: all)")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    from ragkv.config import default_home
    from ragkv.model_fetch import ensure_default_model

    model = ensure_default_model(default_home())
    cases = load_cases(a.cases)
    docs = corpus(cases)
    tmp = None if a.home else tempfile.mkdtemp(prefix="ragkv-soak-")
    home = (a.home or Path(tmp)).resolve()  # type: ignore[arg-type]
    work = home / "soak"
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    spec = {"home": str(home), "model": str(model), "work": str(work), "cases": a.cases,
            "chunk_tokens": 2048, "memory_budget": int(a.memory_mb * 2**20),
            "budget_fraction": a.budget_fraction, "initial": int(len(docs) * a.initial),
            "seed": a.seed,
            "disk_budget": None}
    try:
        return run(a, spec, docs)
    finally:
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)


def run(a: argparse.Namespace, spec: dict, docs: list[tuple[str, str]]) -> int:
    t0 = time.time()
    info = setup(spec, docs)
    mib = 2**20
    print(f"corpus: {info['documents']} documents, {info['tokens']} tokens; working set "
          f"{info['working_set_bytes'] / mib:.0f} MiB vs disk budget "
          f"{info['disk_budget_bytes'] / mib:.0f} MiB, memory budget "
          f"{spec['memory_budget'] / mib:.0f} MiB per process; {spec['initial']} documents "
          f"ingested first ({info['initial_ingest_s']:.0f} s)", flush=True)

    ctx = mp.get_context("spawn")
    roles = [f"client-{i}" for i in range(a.clients)] + ["ingest"]
    procs, start, deadline = spawn(ctx, roles, spec)
    deadline.value = time.time() + a.minutes * 60
    started = time.time()
    start.set()
    print(f"soak: {a.clients} clients + ingestion for {a.minutes:g} min", flush=True)
    hung = join_all(procs, a.minutes * 60 + 900)
    soak_s = time.time() - started
    results = {r: read_result(spec, r) for r in roles}
    records = [dict(rec, client=r) for r in roles[:-1] for rec in results[r].get("records", [])]
    events = results["ingest"].get("events", [])

    # Quiet rerun: one process, nothing else running.
    distinct = sorted({(rec["case"], tuple(rec["order"])) for rec in records})
    chosen = distinct
    if a.rerun and len(distinct) > a.rerun:
        chosen = sorted(random.Random(a.seed).sample(distinct, a.rerun))
    t = time.time()
    rprocs, _, _ = spawn(ctx, ["rerun"], spec, [list(p) for p in chosen])
    hung += join_all(rprocs, 60 * 60)
    rerun_s = time.time() - t
    rerun = read_result(spec, "rerun")
    quiet = {(r["case"], tuple(r["order"])): r for r in rerun.get("records", [])}
    compared = differ = 0
    differing = []
    for rec in records:
        q = quiet.get((rec["case"], tuple(rec["order"])))
        if rec["error"] or q is None or q["error"]:
            continue
        compared += 1
        if rec["tokens"] != q["tokens"]:
            differ += 1
            differing.append({"case": rec["case"], "order": rec["order"],
                              "client": rec["client"], "tokens": rec["tokens"],
                              "quiet_tokens": q["tokens"], "tiers": rec["tiers"],
                              "quiet_tiers": q["tiers"]})

    # The check `ragkv cache verify` runs, report only, every writer stopped.
    from ragkv.cache_index import KVStore, verify

    cfg = make_config({**spec, "memory_budget": 0})
    store = KVStore.from_config(cfg)
    report = verify(store, repair=False, orphan_grace_s=0)
    index_stats = store.index.stats()

    ok = [r for r in records if not r["error"]]
    failed = [r for r in records if r["error"]]
    rerun_failed = [r for r in rerun.get("records", []) if r["error"]]
    ingest_failed = [e for e in events if e["error"]]
    fatal = {r: res["fatal"] for r, res in {**results, "rerun": rerun}.items()
             if "fatal" in res}
    hits = sum(r["hits"] for r in ok)
    looked = sum(r["hits"] + r["misses"] for r in ok)
    ttft = sorted(r["ttft_s"] for r in ok)
    stores = {r: res.get("store", {}) for r, res in results.items()}
    stores["setup"] = info["store"]
    summary = {
        "minutes": a.minutes, "clients": a.clients, "soak_s": soak_s,
        "queries": len(records), "qps": len(records) / soak_s if soak_s else 0.0,
        "failed_queries": len(failed), "distinct_prompts": len(distinct),
        "rerun_prompts": len(chosen), "rerun_failed": len(rerun_failed), "rerun_s": rerun_s,
        "answers_compared": compared, "answers_differing": differ,
        "hit_rate": hits / looked if looked else 0.0,
        "rerun_hit_rate": (sum(r["hits"] for r in quiet.values() if not r["error"])
                           / max(1, sum(r["hits"] + r["misses"] for r in quiet.values()
                                        if not r["error"]))),
        "ttft_p50_s": statistics.median(ttft) if ttft else None,
        "ttft_p99_s": ttft[min(len(ttft) - 1, round(0.99 * (len(ttft) - 1)))] if ttft else None,
        "ingest_documents": len(events), "ingest_failed": len(ingest_failed),
        "ingest_rounds": 1 + max((e["round"] for e in events), default=-1),
        "ingest_precomputed": sum(e.get("precomputed") or 0 for e in events),
        "ingest_removed": sum(1 for e in events if e.get("removed")),
        "disk_evictions": sum(s.get("disk_evictions", 0) for s in stores.values()),
        "memory_evictions": sum(s.get("memory_evictions", 0) for s in stores.values()),
        "puts": sum(s.get("puts", 0) for s in stores.values()),
        "corrupt_reads": sum(s.get("corrupt", 0) for s in stores.values()),
        "verify_entries": report.entries, "verify_blobs_checked": report.blobs_checked,
        "verify_bad": len(report.bad), "verify_orphans": len(report.orphans),
        "hung_processes": hung, "fatal": sorted(fatal),
    }
    passed = not (failed or rerun_failed or ingest_failed or differ or report.bad
                  or report.orphans or hung or fatal)
    summary["passed"] = passed
    result = {"summary": summary, "setup": info, "index": index_stats,
              "errors": sorted({r["error"] for r in failed + rerun_failed}
                               | {e["error"] for e in ingest_failed})[:50],
              "differing": differing[:50], "verify_bad": report.bad[:50],
              "verify_orphans": report.orphans[:50], "fatal": fatal, "stores": stores,
              "warnings": logged_warnings(spec), "wall_s": time.time() - t0,
              "records": records, "rerun": rerun.get("records", []), "ingest": events}
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(result, indent=1, default=str))

    s = summary
    print(f"queries {s['queries']} ({s['qps']:.2f}/s over {s['soak_s']:.0f} s, "
          f"{a.clients} clients), failed {s['failed_queries']}; TTFT p50 "
          f"{s['ttft_p50_s'] or float('nan'):.2f} s, p99 {s['ttft_p99_s'] or float('nan'):.2f} s;"
          f" hit rate {s['hit_rate']:.3f}")
    print(f"ingestion: {s['ingest_documents']} documents in {s['ingest_rounds']} rounds, "
          f"{s['ingest_precomputed']} chunks computed, failed {s['ingest_failed']}; "
          f"evictions: disk {s['disk_evictions']}, memory {s['memory_evictions']}; puts "
          f"{s['puts']}; bad copies read (then recomputed) {s['corrupt_reads']}")
    print(f"quiet rerun: {s['rerun_prompts']} of {s['distinct_prompts']} distinct prompts "
          f"({s['rerun_s']:.0f} s, hit rate {s['rerun_hit_rate']:.3f}, failed "
          f"{s['rerun_failed']}); answers compared {s['answers_compared']}, differing "
          f"{s['answers_differing']}")
    print(f"verify: {s['verify_entries']} entries, {s['verify_blobs_checked']} blobs read; "
          f"{s['verify_bad']} bad, {s['verify_orphans']} orphan blobs")
    for problem in result["errors"][:5] + [f"{k}: {v[-300:]}" for k, v in fatal.items()]:
        print(f"  error: {problem}")
    if hung:
        print(f"  hung and killed: {', '.join(hung)}")
    print(f"{'PASSED' if passed else 'FAILED'}; wrote {a.out}")
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
