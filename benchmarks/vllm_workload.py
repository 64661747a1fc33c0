"""Workload benchmark: a stream of RAG queries served by plain vLLM vs vLLM + ragkv fusion.

The corpus is the chunks of the first ``--cases`` pydoc cases. Each query takes its case's
question and six chunks (its case's four and two from the next case, as a retriever's top-6
would mix them), in an order shuffled per query; some queries repeat a case with another
order. Both arms serve the same stream after the corpus has been seen once:

* ``plain``: vLLM with prefix caching on and no connector, chunk text in the prompt; its warm
  pass prefills every chunk once after the template prefix (so a query whose first chunk was
  seen gets that prefix from the cache: the best plain vLLM can do without fusion);
* ``ragkv``: vLLM with ragkv's connector, every chunk precomputed through vLLM, queries fused
  with ``blend`` at ``--ratio``.

Before timing, each arm serves ``--warm`` queries of the same shape over the chunks of other
cases (seen the same way as the corpus, never in the stream): a fresh engine's first few
multi-thousand-token requests ran 20-50 % slower in both arms, which a one-chunk warm-up did
not cover. TTFT is the wall time of a one-token request. Each arm runs in a subprocess of its
own (one vLLM engine per process), ``--rounds`` times (2), the arms' order alternating from
round to round so that the machine's drift between runs does not fall on one arm; the summary
pools the rounds (and gives the ratio of each) and is written as JSON. Both arms run with
``VLLM_CPU_NUM_OF_RESERVED_CPU=0``: by default vLLM's CPU build keeps one core for its
scheduler unless a KV connector is configured, which on a 2-core machine binds plain vLLM's
worker to a single core and would flatter the connector arm::

    python benchmarks/vllm_workload.py --out benchmarks/results/vllm_workload.json
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench_args import out_file

from ragkv.bench_report import cpu_model, percentile
from ragkv.config import DEFAULT_RATIO

CASES = Path(__file__).resolve().parent / "cases" / "pydoc.jsonl"


def make_stream(cases: list[dict], n_queries: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    stream = []
    for i in range(n_queries):
        case, other = cases[i % len(cases)], cases[(i + 1) % len(cases)]
        chunks = list(case["chunks"]) + rng.sample(list(other["chunks"]), 2)
        rng.shuffle(chunks)
        stream.append({"case": case["id"], "question": case["question"], "chunks": chunks})
    return stream


def run_arm(arm: str, stream: list[dict], ratio: float, home: Path,
            warm_stream: list[dict] | None = None, kv_dtype: str = "float32",
            preselect: float | None = None) -> dict:
    from ragkv.api import RagKV
    from ragkv.chunking import tokenize_chunk
    from ragkv.config import BlendConfig, RagkvConfig
    from ragkv.engine.vllm.backend import VLLMBackend
    from ragkv.engine.vllm.client import VLLMRequest

    cfg = RagkvConfig(home=home, kv_dtype=kv_dtype, engine="vllm")
    t0 = time.perf_counter()
    backend = VLLMBackend.in_process(cfg, kv_cache_bytes=2 << 30, connector=arm == "ragkv")
    rag = RagKV(cfg, backend=backend)
    load_s = time.perf_counter() - t0
    warm_stream = warm_stream or []
    corpus = {c: tokenize_chunk(c, rag.tokenizer) for q in stream + warm_stream
              for c in q["chunks"]}
    t0 = time.perf_counter()
    if arm == "ragkv":
        rag.precompute_many(list(corpus.values()))
        mode, blend = "blend", BlendConfig(ratio=ratio, preselect=preselect)
    else:  # the corpus seen once: each chunk after the prefix, the prompt ragkv's arm prefills
        seen = [backend.builder.precompute(ids) for ids in corpus.values()]
        backend.transport.complete([VLLMRequest(r.ids, None, None) for r in seen], 1)
        mode, blend = "prefix", None  # plain vLLM, its prefix cache on
    seen_s = time.perf_counter() - t0
    for q in warm_stream:
        rag.generate([corpus[c] for c in q["chunks"]], q["question"], mode=mode, blend=blend,
                     max_new_tokens=1, log_query=False)
    records = []
    for q in stream:
        a = rag.generate([corpus[c] for c in q["chunks"]], q["question"], mode=mode,
                         blend=blend, max_new_tokens=1, log_query=False)
        t = a.trace
        records.append({"case": q["case"], "ttft_s": t.ttft_s, "tokens": t.context_tokens,
                        "engine_ttft_s": t.engine_ttft_s, "first_token": a.tokens[:1],
                        "hits": t.hits, "misses": t.misses, "load_s": t.load_s,
                        "tiers": t.tiers,
                        "recomputed": t.recomputed_tokens, "error": t.error})
        print(arm, q["case"], f"{t.ttft_s:.3f}s", file=sys.stderr, flush=True)
    rag.close()
    return {"arm": arm, "engine_load_s": load_s, "corpus_seen_s": seen_s,
            "corpus_chunks": len(corpus), "records": records}


def summarize(arms: dict[str, dict], meta: dict) -> dict:
    out: dict = {"meta": meta, "arms": {}}
    for name, arm in arms.items():
        ttft = [r["ttft_s"] for r in arm["records"]]
        out["arms"][name] = {"n": len(ttft), "ttft_mean_s": statistics.fmean(ttft),
                             "ttft_median_s": statistics.median(ttft),
                             "ttft_p90_s": percentile(ttft, 90), "ttft_p99_s": percentile(ttft, 99),
                             "engine_load_s": arm["engine_load_s"],
                             "corpus_seen_s": arm["corpus_seen_s"],
                             "corpus_chunks": arm["corpus_chunks"]}
    plain, fused = arms["plain"]["records"], arms["ragkv"]["records"]
    out["ragkv_over_plain_mean"] = (out["arms"]["ragkv"]["ttft_mean_s"]
                                    / out["arms"]["plain"]["ttft_mean_s"])
    out["first_token_agree"] = statistics.fmean(
        float(a["first_token"] == b["first_token"]) for a, b in zip(plain, fused, strict=True))
    out["ragkv_misses"] = sum(r["misses"] or 0 for r in fused)
    out["ragkv_recomputed_share"] = statistics.fmean((r["recomputed"] or 0) / r["tokens"]
                                                     for r in fused)
    rounds = sorted({r.get("round", 0) for r in fused})
    out["ragkv_over_plain_mean_by_round"] = [
        statistics.fmean(r["ttft_s"] for r in fused if r.get("round", 0) == n)
        / statistics.fmean(r["ttft_s"] for r in plain if r.get("round", 0) == n)
        for n in rounds]
    out["ragkv_load_median_s"] = statistics.median(r.get("load_s") or 0.0 for r in fused)
    out["queries"] = [{"round": a.get("round", 0), "case": a["case"], "tokens": a["tokens"],
                       "plain_ttft_s": a["ttft_s"],
                       "ragkv_ttft_s": b["ttft_s"], "ragkv_load_s": b.get("load_s"),
                       "ragkv_tiers": b.get("tiers")}
                      for a, b in zip(plain, fused, strict=True)]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", type=Path, default=CASES)
    ap.add_argument("--n-cases", type=int, default=8)
    ap.add_argument("--queries", type=int, default=16)
    ap.add_argument("--ratio", type=float, default=DEFAULT_RATIO)
    ap.add_argument("--warm", type=int, default=3, help="untimed queries over other cases first")
    ap.add_argument("--preselect", type=float, default=None,
                    help="the ragkv arm's preselection by stored context scores "
                         "(BlendConfig.preselect; default: off)")
    ap.add_argument("--kv-dtype", default="float32",
                    help="ragkv's stored chunk KV (the library's default is float16; float32 "
                         "is what the published runs used)")
    ap.add_argument("--rounds", type=int, default=2,
                    help="runs of each arm, their order alternating from round to round")
    ap.add_argument("--out", type=out_file, default=Path("benchmarks/results/vllm_workload.json"))
    ap.add_argument("--arm", choices=("plain", "ragkv"), help=argparse.SUPPRESS)
    ap.add_argument("--arm-out", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--home", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    every = [json.loads(line) for line in args.cases.read_text().splitlines()]
    cases, others = every[:args.n_cases], every[args.n_cases:]
    stream = make_stream(cases, args.queries)
    warm = make_stream(others, min(args.warm, len(others)), seed=1) if others else []
    if args.arm:  # one arm, in this process
        result = run_arm(args.arm, stream, args.ratio, args.home, warm, args.kv_dtype,
                         args.preselect)
        args.arm_out.write_text(json.dumps(result))
        return
    arms: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="ragkv-workload-") as tmp:
        # Rounds alternate the arms' order (plain first, then ragkv first, ...): the machine's
        # speed drifts between runs, and a fixed order would hand the drift to one arm.
        for r in range(args.rounds):
            for arm in ("plain", "ragkv") if r % 2 == 0 else ("ragkv", "plain"):
                part = Path(tmp) / f"{arm}-{r}.json"
                subprocess.run([sys.executable, __file__, "--cases", str(args.cases),
                                "--n-cases", str(args.n_cases), "--queries", str(args.queries),
                                "--ratio", str(args.ratio), "--warm", str(args.warm),
                                "--kv-dtype", args.kv_dtype,
                                *(["--preselect", str(args.preselect)] if args.preselect else []),
                                "--arm",
                                arm, "--arm-out", str(part), "--home",
                                str(Path(tmp) / f"home-{r}")], check=True,
                               env={**os.environ, "VLLM_CPU_NUM_OF_RESERVED_CPU": "0"})
                run = json.loads(part.read_text())
                for rec in run["records"]:
                    rec["round"] = r
                if arm in arms:
                    arms[arm]["records"] += run["records"]
                else:
                    arms[arm] = run
    meta = {"date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "cases": args.n_cases,
            "queries": args.queries, "rounds": args.rounds, "warm_queries": args.warm,
            "chunks_per_query": 6,
            "ratio": args.ratio, "preselect": args.preselect, "kv_dtype": args.kv_dtype,
            "engine": "vllm (CPU build), SmolLM2, fp32, eager, prefix caching on",
            "cpu": cpu_model()}
    result = summarize(arms, meta)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    print(json.dumps({k: v for k, v in result.items() if k != "queries"}, indent=1))


if __name__ == "__main__":
    main()
