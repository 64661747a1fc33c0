"""Where a default blend's time goes inside vLLM's worker, by kind of layer (in process).

    python benchmarks/vllm_breakdown.py [--cases 8] [--rounds 3] \
        [--case-file benchmarks/cases/pydoc.jsonl] [--out benchmarks/results/vllm_breakdown.json]

Precomputes the chunks of the first ``--cases`` cases (of pydoc, or ``--case-file``) through
vLLM, then blends each case ``--rounds`` times after one untimed round, timing the runner's
calls in vLLM's worker (the engine core runs in this process): q/k/v projections, attention
(vLLM's kernel over the paged cache), output projection + MLP, RoPE of the fresh rows, and the
correction's drift and its application. Layers that compute more than ``--big`` tokens (the
layers every chunk token goes through before the check) are reported apart from the later
layers. vLLM's prefix cache is emptied before each blend, so every timed blend is a new prompt
to vLLM (its chunks come from ragkv's memory tier); a case it still served whole (no fusion)
would be left out. Prints per-blend milliseconds (means) beside the medians of TTFT and fusion
time, and writes them as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import tempfile
import time
from collections import defaultdict
from pathlib import Path

from bench_args import out_file

# the worker must run in this process for its calls to be timed here
os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
os.environ.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")

RUNNER_CALLS = ("qkv", "attend", "finish", "rotate_qk")


def instrument(totals: dict, big: int) -> None:
    """Wrap the runner's calls and the correction so each adds its wall time to ``totals``
    under ``(name, "big" | "later")`` (the correction under ``"-"``)."""
    import ragkv.engine.blend as blend
    from ragkv.engine import correction
    from ragkv.engine.vllm.runner import VLLMRunner

    def timed(fn, name, rows_of):
        def wrapper(*args, **kwargs):
            t = time.perf_counter()
            out = fn(*args, **kwargs)
            rows = rows_of(args)
            kind = "-" if rows is None else ("big" if rows > big else "later")
            totals[(name, kind)] += time.perf_counter() - t
            return out
        return wrapper

    rows = {"qkv": lambda a: a[2].shape[0], "finish": lambda a: a[2].shape[0],
            "attend": lambda a: a[1].shape[1], "rotate_qk": lambda a: a[1].shape[1]}
    for name in RUNNER_CALLS:
        setattr(VLLMRunner, name, timed(getattr(VLLMRunner, name), name, rows[name]))
    blend.apply_drift = timed(blend.apply_drift, "apply_drift", lambda a: None)
    correction.LocalMeanDrift.drift = timed(correction.LocalMeanDrift.drift, "drift",
                                            lambda a: None)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--case-file", type=Path, default=Path("benchmarks/cases/pydoc.jsonl"))
    ap.add_argument("--big", type=int, default=800,
                    help="a layer computing more tokens than this counts as a full layer")
    ap.add_argument("--out", type=out_file, default=Path("benchmarks/results/vllm_breakdown.json"))
    a = ap.parse_args()

    from ragkv.api import RagKV
    from ragkv.bench import load_cases
    from ragkv.chunking import tokenize_chunk
    from ragkv.config import RagkvConfig, default_home
    from ragkv.engine.vllm.backend import VLLMBackend
    from ragkv.model_fetch import ensure_default_model

    home = Path(tempfile.mkdtemp(prefix="ragkv-breakdown-"))
    try:
        cfg = RagkvConfig(home=home, model=ensure_default_model(default_home()),
                          kv_dtype="float32", engine="vllm")
        rag = RagKV(cfg, backend=VLLMBackend.in_process(cfg, kv_cache_bytes=2 << 30))
        cases = load_cases(a.case_file)[: a.cases]
        ids = {c: tokenize_chunk(c, rag.tokenizer) for case in cases for c in case["chunks"]}
        rag.precompute_many(list(ids.values()))

        def blends():
            for case in cases:
                # every blend a new prompt to vLLM: its prefix cache would otherwise serve
                # part of a repeated prompt from the fused KV of the round before
                rag.backend.transport.llm.reset_prefix_cache()
                yield rag.generate([ids[c] for c in case["chunks"]], case["question"],
                                   mode="blend", max_new_tokens=1, log_query=False).trace

        list(blends())  # untimed: vLLM's first requests run slower
        totals: dict = defaultdict(float)
        instrument(totals, a.big)
        traces = [t for _ in range(a.rounds) for t in blends()]
        fused = [t for t in traces if t.fuse_s > 0]
        n = len(fused)
        per_blend = {f"{name}/{kind}": 1e3 * s / n for (name, kind), s in sorted(totals.items())}
        res = {"command": "python benchmarks/vllm_breakdown.py", "case_file": str(a.case_file),
               "cases": a.cases, "rounds": a.rounds, "blends": n, "left_out": len(traces) - n,
               "ttft_median_s": statistics.median(t.ttft_s for t in fused),
               "fuse_median_s": statistics.median(t.fuse_s for t in fused),
               "recomputed_per_layer_first": fused[0].recomputed_per_layer,
               "ms_per_blend": per_blend,
               "ms_per_blend_timed_total": sum(per_blend.values())}
        print(json.dumps(res, indent=2))
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(json.dumps(res, indent=2))
        rag.close()
    finally:
        shutil.rmtree(home, ignore_errors=True)


if __name__ == "__main__":
    main()
