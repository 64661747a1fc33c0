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
  before again (its evicted chunks are computed back), then all of it again, in a loop.

Afterwards one quiet process (one thread, nothing else running) asks every distinct prompt
again (a seeded sample of ``--rerun`` when there are more): the cache may miss, but an answer
must never change. Last, ``ragkv cache verify``'s check (the same function, report only) must
find no bad entry and no orphan blob. Prints a summary and writes
``benchmarks/results/soak.json``; exits 1 if a query or ingestion failed, an answer differs
or verify found anything.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import multiprocessing as mp
import os
import random
import shutil
import statistics
import sys
import tempfile
import time
import traceback
import warnings
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
CASE_FILES = [ROOT / "benchmarks" / "cases" / "pydoc.jsonl",
              ROOT / "benchmarks" / "cases" / "prose.jsonl"]
MAX_NEW_TOKENS = 8
RATIO = 0.15
KV_BYTES = 2  # float16 storage, the default


def load_cases(limit: int | None) -> list[dict]:
    """The first ``limit`` cases of each public case file (all with None)."""
    cases = []
    for path in CASE_FILES:
        lines = path.read_text().splitlines()
        cases += [json.loads(line) for line in lines[:limit]]
    return cases


def corpus(cases: list[dict]) -> list[tuple[str, str]]:
    """(document name, text): every distinct case chunk once, in case order."""
    docs: dict[str, str] = {}
    for case in cases:
        for text in case["chunks"]:
            docs.setdefault(text, f"{case['id'].split('-')[0]}:"
                                  f"{hashlib.sha256(text.encode()).hexdigest()[:12]}")
    return [(name, text) for text, name in docs.items()]


def make_config(spec: dict) -> Any:
    from ragkv.config import BlendConfig, RagkvConfig

    return RagkvConfig(home=Path(spec["home"]), model=Path(spec["model"]),
                       chunk_tokens=spec["chunk_tokens"], kv_dtype="float16",
                       disk_budget_bytes=spec["disk_budget"],
                       memory_budget_bytes=spec["memory_budget"],
                       blend=BlendConfig(ratio=RATIO))


def open_rag(spec: dict, role: str, threads: int = 1) -> Any:
    """A facade on the shared cache, its warnings logged to ``logs/ROLE.log``."""
    import torch

    torch.set_num_threads(threads)
    warnings.filterwarnings("ignore")
    logs = Path(spec["work"]) / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    logging.basicConfig(filename=logs / f"{role}.log", level=logging.WARNING, force=True,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    from ragkv.api import RagKV

    return RagKV(make_config(spec))


def store_counters(rag: Any) -> dict:
    store = rag.backend.store
    stats = store.stats()
    return {**store.counters,
            "disk_evictions": stats["disk"]["evictions"],
            "disk_evicted_bytes": stats["disk"]["evicted_bytes"],
            "memory_evictions": store.memory.evictions if store.memory is not None else 0}


def ask(rag: Any, ids: dict[str, list[int]], case: dict, order: list[int]) -> dict:
    """One blend query; anything raised is caught and recorded, never re-raised."""
    texts = [case["chunks"][i] for i in order]
    rec: dict[str, Any] = {"case": case["id"], "order": order, "question": case["question"],
                           "keys": [rag.key_for(ids[t]) for t in texts], "t": time.time()}
    try:
        a = rag.generate([ids[t] for t in texts], case["question"], mode="blend",
                         max_new_tokens=MAX_NEW_TOKENS)
        rec.update(tokens=a.tokens, ttft_s=a.trace.ttft_s, hits=a.trace.hits,
                   misses=a.trace.misses, tiers=[c.tier for c in a.trace.chunks], error=None)
    except Exception as exc:  # noqa: BLE001 - counted and reported, the soak goes on
        rec.update(tokens=None, ttft_s=None, hits=0, misses=0, tiers=None,
                   error=f"{type(exc).__name__}: {exc}")
    return rec


def _worker(role: str, spec: dict, ready, start, deadline, prompts: list | None) -> None:
    """A client (``client-N``), the ingester or the quiet rerun; writes ``ROLE.json``."""
    out = Path(spec["work"]) / f"{role}.json"
    result: dict[str, Any] = {"role": role}
    try:
        rag = open_rag(spec, role)
        cases = {c["id"]: c for c in load_cases(spec["cases"])}
        ids = {t: rag.tokenizer(t, add_special_tokens=False).input_ids
               for c in cases.values() for t in c["chunks"]}
        ready.put(role)
        if role == "rerun":
            result["records"] = [ask(rag, ids, cases[case_id], list(order))
                                 for case_id, order in prompts or []]
        else:
            start.wait()
            if role == "ingest":
                result["events"] = _ingest_loop(rag, spec, deadline.value)
            else:
                result["records"] = _client_loop(rag, ids, list(cases.values()),
                                                 random.Random(f"{spec['seed']}:{role}"),
                                                 deadline.value)
        result["store"] = store_counters(rag)
    except BaseException:  # noqa: BLE001 - reported to the parent through the file
        result["fatal"] = traceback.format_exc()
    out.write_text(json.dumps(result))


def _client_loop(rag: Any, ids: dict, cases: list[dict], rng: random.Random,
                 deadline: float) -> list[dict]:
    records = []
    while time.time() < deadline:
        case = rng.choice(cases)
        records.append(ask(rag, ids, case, rng.sample(range(len(case["chunks"])),
                                                      len(case["chunks"]))))
    return records


def _ingest_loop(rag: Any, spec: dict, deadline: float) -> list[dict]:
    """Until the deadline: the documents not ingested yet, each followed by one already
    ingested again (its evicted chunks are computed and stored back), then every document
    again, round after round."""
    docs = corpus(load_cases(spec["cases"]))
    done, new = docs[:spec["initial"]], docs[spec["initial"]:]
    rng = random.Random(f"{spec['seed']}:ingest")
    events: list[dict] = []
    rounds = 0
    while time.time() < deadline:
        todo = []
        for doc in new:
            todo += [doc, rng.choice(done)] if done else [doc]
            done.append(doc)
        new = []
        todo = todo or rng.sample(docs, len(docs))
        for name, text in todo:
            if time.time() >= deadline:
                break
            t = time.perf_counter()
            ev: dict[str, Any] = {"round": rounds, "name": name}
            try:
                r = rag.ingest_text(name, text)
                ev.update(chunks=r.n_chunks, precomputed=r.precomputed, new=r.new_document,
                          error=None)
            except Exception as exc:  # noqa: BLE001 - counted and reported
                ev["error"] = f"{type(exc).__name__}: {exc}"
            ev["seconds"] = time.perf_counter() - t
            events.append(ev)
        rounds += 1
    return events


def _spawn(ctx, roles: list[str], spec: dict, prompts: list | None = None,
           ready_timeout: float = 900.0) -> tuple[list, Any, Any]:
    ready, start, deadline = ctx.Queue(), ctx.Event(), ctx.Value("d", 0.0)
    procs = [ctx.Process(target=_worker, name=r, args=(r, spec, ready, start, deadline, prompts))
             for r in roles]
    for p in procs:
        p.start()
    import queue

    end, waiting = time.time() + ready_timeout, set(roles)
    while waiting and time.time() < end:
        try:
            waiting.discard(ready.get(timeout=5))
        except queue.Empty:  # one that died before it was ready writes why, and is not waited on
            waiting -= {p.name for p in procs if not p.is_alive()}
    return procs, start, deadline


def _join(procs: list, timeout: float) -> list[str]:
    """Wait for every process; one that hangs is killed and named."""
    hung = []
    end = time.time() + timeout
    for p in procs:
        p.join(max(1.0, end - time.time()))
        if p.is_alive():
            hung.append(p.name)
            p.kill()
            p.join(30)
    return hung


def _read(spec: dict, role: str) -> dict:
    path = Path(spec["work"]) / f"{role}.json"
    return json.loads(path.read_text()) if path.is_file() else {"fatal": "no result written"}


def _warnings(spec: dict) -> dict:
    out = {}
    for log in sorted((Path(spec["work"]) / "logs").glob("*.log")):
        lines = [ln for ln in log.read_text(errors="replace").splitlines() if " WARNING " in ln]
        if lines:
            out[log.stem] = {"count": len(lines),
                             "first": sorted({ln.split(" WARNING ", 1)[1][:160]
                                              for ln in lines})[:5]}
    return out


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
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/soak.json")
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
    procs, start, deadline = _spawn(ctx, roles, spec)
    deadline.value = time.time() + a.minutes * 60
    started = time.time()
    start.set()
    print(f"soak: {a.clients} clients + ingestion for {a.minutes:g} min", flush=True)
    hung = _join(procs, a.minutes * 60 + 900)
    soak_s = time.time() - started
    results = {r: _read(spec, r) for r in roles}
    records = [dict(rec, client=r) for r in roles[:-1] for rec in results[r].get("records", [])]
    events = results["ingest"].get("events", [])

    # Quiet rerun: one process, nothing else running.
    distinct = sorted({(rec["case"], tuple(rec["order"])) for rec in records})
    chosen = distinct
    if a.rerun and len(distinct) > a.rerun:
        chosen = sorted(random.Random(a.seed).sample(distinct, a.rerun))
    t = time.time()
    rprocs, _, _ = _spawn(ctx, ["rerun"], spec, [list(p) for p in chosen])
    hung += _join(rprocs, 60 * 60)
    rerun_s = time.time() - t
    rerun = _read(spec, "rerun")
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
              "warnings": _warnings(spec), "wall_s": time.time() - t0,
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
