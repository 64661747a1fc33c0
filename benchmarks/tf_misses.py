"""Where the default blend's teacher-forced answer parts from full prefill's, and whether the
KV storage precision alone would part it.

    python benchmarks/tf_misses.py [--cases benchmarks/cases/pydoc.jsonl] [--limit N] \\
        [--out benchmarks/results/tf_misses_pydoc.json]

Per case: full prefill's greedy answer (32 tokens), then, teacher-forced along it, the default
blend and full prefill itself with every layer's K/V rounded to the stored dtype (fp16) and
back. For each position where the blend's top-1 differs from full's token: full's own margin
between its top-1 and top-2 logits there (nats). A miss at a margin near zero is a near-tie
of full prefill that any perturbation may flip; a miss at a wide margin is the blend's KV
steering the answer. One torch thread, the transformers engine in process (the rounded copy is
scored from its fused KV); the chunks are precomputed first (anchor context, the corpus
passage picked from the cases, as ``ragkv bench`` does).
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import torch
from bench_args import count, out_file

from ragkv import metrics
from ragkv.api import RagKV
from ragkv.bench import load_cases
from ragkv.chunking import tokenize_chunk
from ragkv.config import RagkvConfig
from ragkv.engine.kv import torch_dtype
from ragkv.model_fetch import resolve_model

BANDS = (0.1, 0.3, 1.0)  # margin bands (nats) the misses are counted in


def margins(rows: torch.Tensor) -> list[float]:
    """Top-1 minus top-2 logit of each row of ``rows [n, vocab]``."""
    top = rows.float().topk(2, dim=-1).values
    return (top[:, 0] - top[:, 1]).tolist()


def run_case(rag: RagKV, case: dict, dtype: torch.dtype, max_new_tokens: int) -> dict:
    ids = [tokenize_chunk(c, rag.tokenizer) for c in case["chunks"]]
    rag.precompute_many(ids)
    q = case["question"]
    full = rag.generate(ids, q, mode="full", keep_kv=True, log_query=False,
                        max_new_tokens=max_new_tokens)
    blend = rag.generate(ids, q, mode="blend", keep_kv=True, log_query=False,
                         max_new_tokens=max_new_tokens)
    target = list(full.tokens)
    full_rows, blend_rows = full.score(target), blend.score(target)
    # the rounded copy is scored through the engine itself: in process only
    rounded = copy.copy(full.generation.fused)
    rounded.k = [k.to(dtype).to(k.dtype) for k in rounded.k]
    rounded.v = [v.to(dtype).to(v.dtype) for v in rounded.v]
    rounded_rows = full.generation.engine.score(rounded, target)
    full.generation.close()
    blend.generation.close()
    gap = margins(torch.stack([r.logits for r in full_rows]))
    miss = [i for i, (r, t) in enumerate(zip(blend_rows, target, strict=True)) if r.argmax != t]
    return {"case": case["id"], "tokens": len(target),
            "blend_tf_agree": metrics.teacher_forced(full_rows, blend_rows, target)["tf_agree"],
            "rounded_kv_tf_agree": float((rounded_rows.argmax(-1) == torch.tensor(target))
                                         .float().mean()),
            "miss_margins": [round(gap[i], 4) for i in miss],
            "full_margins": [round(g, 4) for g in gap]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", type=Path, default=Path("benchmarks/cases/pydoc.jsonl"))
    ap.add_argument("--limit", type=count, default=None,
                    help="first N cases; the anchor passage is then picked from these only")
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--model", type=Path, default=None)
    ap.add_argument("--out", type=out_file, default=None)
    a = ap.parse_args()
    torch.set_num_threads(1)
    cases = load_cases(a.cases)[:a.limit]
    out = a.out or Path(f"benchmarks/results/tf_misses_{a.cases.stem}.json")
    # int8 storage has per-channel scales; its rounding is not reproduced here (fp16 is)
    with tempfile.TemporaryDirectory(prefix="ragkv-tf-misses-") as home:
        cfg = RagkvConfig(home=Path(home), model=resolve_model(a.model, RagkvConfig().home))
        rag = RagKV(cfg)
        rag.choose_anchor([c for case in cases for c in case["chunks"]], record=False)
        dtype = torch_dtype(cfg.kv_dtype) if cfg.kv_dtype != "int8" else torch.float16
        rows = []
        for case in cases:
            rows.append(run_case(rag, case, dtype, a.max_new_tokens))
            r = rows[-1]
            print(f"{r['case']}: blend TF {r['blend_tf_agree']:.3f}, rounded KV TF "
                  f"{r['rounded_kv_tf_agree']:.3f}, misses at margins {r['miss_margins']}",
                  flush=True)
        rag.close()
    misses = [m for r in rows for m in r["miss_margins"]]
    every = [m for r in rows for m in r["full_margins"]]
    summary = {
        "cases": len(rows), "blend": asdict(cfg.blend), "kv_dtype": cfg.kv_dtype,
        "blend_tf_agree": statistics.fmean(r["blend_tf_agree"] for r in rows),
        "rounded_kv_tf_agree": statistics.fmean(r["rounded_kv_tf_agree"] for r in rows),
        "misses": len(misses), "positions": len(every),
        "misses_below": {str(b): sum(m < b for m in misses) for b in BANDS},
        "positions_below": {str(b): sum(m < b for m in every) for b in BANDS},
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"summary": summary, "cases": rows}, indent=1) + "\n")
    print(f"\nblend TF agreement {summary['blend_tf_agree']:.3f}; full prefill with its KV "
          f"rounded to {cfg.kv_dtype}: {summary['rounded_kv_tf_agree']:.3f}")
    for b in BANDS:
        print(f"misses where full's top-2 margin < {b} nats: {summary['misses_below'][str(b)]} "
              f"of {len(misses)} (such positions: {summary['positions_below'][str(b)]} of "
              f"{len(every)})")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
