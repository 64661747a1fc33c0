"""The processes of the soak (``benchmarks/soak.py``): the corpus, a facade on the shared cache,
one client's, the ingester's and the quiet rerun's loops, and how the parent spawns them, waits
for them and reads what each wrote (``ROLE.json`` and ``logs/ROLE.log`` under the work folder).
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
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
    again, round after round; in those rounds every third document is removed first (its KV
    leaves the cache while clients read it) and then ingested again."""
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
        again = not todo
        todo = todo or rng.sample(docs, len(docs))
        for i, (name, text) in enumerate(todo):
            if time.time() >= deadline:
                break
            t = time.perf_counter()
            ev: dict[str, Any] = {"round": rounds, "name": name, "removed": False}
            try:
                if again and i % 3 == 0:
                    ev["removed"] = rag.remove_document(name)
                r = rag.ingest_text(name, text)
                ev.update(chunks=r.n_chunks, precomputed=r.precomputed, new=r.new_document,
                          error=None)
            except Exception as exc:  # noqa: BLE001 - counted and reported
                ev["error"] = f"{type(exc).__name__}: {exc}"
            ev["seconds"] = time.perf_counter() - t
            events.append(ev)
        rounds += 1
    return events


def spawn(ctx, roles: list[str], spec: dict, prompts: list | None = None,
          ready_timeout: float = 900.0) -> tuple[list, Any, Any]:
    """Start one process per role and wait until each is ready (or died before); returns
    them, the event that starts the clients and the shared deadline."""
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


def join_all(procs: list, timeout: float) -> list[str]:
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


def read_result(spec: dict, role: str) -> dict:
    """What the process ``role`` wrote (its ``fatal`` if it wrote nothing)."""
    path = Path(spec["work"]) / f"{role}.json"
    return json.loads(path.read_text()) if path.is_file() else {"fatal": "no result written"}


def logged_warnings(spec: dict) -> dict:
    """Per process log: how many warnings, and the first few distinct ones."""
    out = {}
    for log in sorted((Path(spec["work"]) / "logs").glob("*.log")):
        lines = [ln for ln in log.read_text(errors="replace").splitlines() if " WARNING " in ln]
        if lines:
            out[log.stem] = {"count": len(lines),
                             "first": sorted({ln.split(" WARNING ", 1)[1][:160]
                                              for ln in lines})[:5]}
    return out
