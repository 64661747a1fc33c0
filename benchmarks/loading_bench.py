"""Loading controller on the CPU benchmark: blended TTFT with cached KV placed layer by layer
behind the compute (pipelined) vs placed before layer 0, and the share of TTFT spent in cache
lookup + load, with and without the in-process memory tier.

    python benchmarks/loading_bench.py --cases benchmarks/cases/pydoc.jsonl --limit 8

Variants run interleaved on every case (same engine, same prompts); figures are medians.
"""

from __future__ import annotations

import argparse
import atexit
import json
import shutil
import statistics
import tempfile
from pathlib import Path

from bench_args import count, out_file

from ragkv.api import RagKV
from ragkv.bench import load_cases
from ragkv.chunking import tokenize_chunk
from ragkv.config import BlendConfig, RagkvConfig
from ragkv.engine.hf import HFEngine
from ragkv.model_fetch import resolve_model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", type=Path, default=Path("benchmarks/cases/pydoc.jsonl"))
    ap.add_argument("--limit", type=count, default=8)
    ap.add_argument("--reps", type=count, default=2)
    ap.add_argument("--out", type=out_file, default=Path("benchmarks/results/loading_cpu.json"))
    args = ap.parse_args()
    home = Path(tempfile.mkdtemp(prefix="ragkv-loading-"))
    atexit.register(shutil.rmtree, home, ignore_errors=True)  # each run holds GBs of KV
    base = RagkvConfig(home=home)
    engine = HFEngine.load(resolve_model(None, RagkvConfig().home), base.device, base.dtype)
    rags = {"memory+disk": RagKV(base, engine=engine),
            "disk": RagKV(RagkvConfig(home=home, memory_budget_bytes=0), engine=engine)}
    cases = load_cases(args.cases)[: args.limit]
    ids = [[tokenize_chunk(c, engine.tokenizer) for c in case["chunks"]] for case in cases]
    for per_case in ids:
        for c in per_case:
            rags["disk"].precompute(c)
    blend = BlendConfig()
    rows = []
    for case, chunks in zip(cases, ids, strict=True):
        for rep in range(args.reps + 1):  # the first pass warms the memory tier and caches
            for tier, rag in rags.items():
                for pipelined in (True, False):
                    engine.pipelined = pipelined
                    t = rag.generate(chunks, case["question"], blend=blend, max_new_tokens=1,
                                     log_query=False).trace
                    if rep:
                        rows.append({"case": case["id"], "tier": tier, "pipelined": pipelined,
                                     "ttft_s": t.ttft_s, "lookup_s": t.lookup_s,
                                     "load_s": t.load_s, "fuse_s": t.fuse_s,
                                     "context_tokens": t.context_tokens, "hits": t.hits})
        print(case["id"], flush=True)
    engine.pipelined = None
    summary = []
    for tier in rags:
        for pipelined in (True, False):
            rs = [r for r in rows if r["tier"] == tier and r["pipelined"] == pipelined]
            summary.append({
                "tier": tier, "pipelined": pipelined, "n": len(rs),
                "ttft_median_s": statistics.median(r["ttft_s"] for r in rs),
                "fuse_median_s": statistics.median(r["fuse_s"] for r in rs),
                "lookup_load_share_median": statistics.median(
                    (r["lookup_s"] + r["load_s"]) / r["ttft_s"] for r in rs),
                "lookup_median_ms": 1e3 * statistics.median(r["lookup_s"] for r in rs),
                "load_median_ms": 1e3 * statistics.median(r["load_s"] for r in rs)})
    for s in summary:
        print(f"{s['tier']:12s} pipelined={s['pipelined']!s:5s} TTFT {s['ttft_median_s']:.3f} s "
              f"fuse {s['fuse_median_s']:.3f} s lookup+load share "
              f"{100 * s['lookup_load_share_median']:.1f}% (lookup {s['lookup_median_ms']:.1f} "
              f"ms, load {s['load_median_ms']:.1f} ms)")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"summary": summary, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
