"""First-token KL of blend variants against full prefill, per case, for choosing defaults.

Usage: python benchmarks/correction_lab.py --limit 10 --sets prose,pydoc \
           --variants prefix/qhkvd/0,prefix/qhkvd/0.75,cold/qhkvd/0.75 \
           --out benchmarks/results/correction_lab.jsonl

A variant is ``context/policy/correction_strength[/coverage/floor_ratio]`` (strength 0: no
correction; coverage and floor: the per-prompt budget, e.g. ``prefix/qhkvd/0.75/0.9/0.05``;
``-`` for none). Each record carries ``share``, the chunk tokens recomputed. Chunk KV is
computed here (fp16 round trip, as stored by default), full prefill is the reference; one JSON
line per case and variant. Cheaper than `ragkv bench` (no decoding), for sweeps.
"""
from __future__ import annotations

import argparse
import json
import os

import torch
from bench_args import count, out_file

from ragkv.chunking import tokenize_chunk
from ragkv.config import BlendConfig, RagkvConfig, default_home
from ragkv.engine.blend import compute_span, fuse
from ragkv.engine.hf import HFEngine
from ragkv.engine.kv import ChunkKV
from ragkv.engine.plan import exact_end, plan_prefill
from ragkv.model_fetch import ensure_default_model
from ragkv.prompt import PromptTemplate

SETS = {"pydoc": "benchmarks/cases/pydoc.jsonl", "prose": "benchmarks/cases/prose.jsonl"}


def kl(pf: torch.Tensor, pm: torch.Tensor) -> float:
    lp, lq = torch.log_softmax(pf.float(), -1), torch.log_softmax(pm.float(), -1)
    return float((lp.exp() * (lp - lq)).sum())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sets", default="pydoc,prose")
    ap.add_argument("--limit", type=count, default=8)
    ap.add_argument("--variants", default="prefix/qhkvd/0,prefix/qhkvd/0.75")
    ap.add_argument("--ratio", type=float, default=0.15)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=out_file, default="benchmarks/results/correction_lab.jsonl")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    eng = HFEngine.load(ensure_default_model(default_home()), device="cpu")
    tpl = PromptTemplate.from_tokenizer(eng.tokenizer, RagkvConfig().system_prompt)
    r = eng.runner
    done = set()
    if os.path.exists(args.out):  # resumable: cases and variants already written are skipped
        for line in open(args.out):
            rec = json.loads(line)
            done.add((rec["case"], rec["var"], rec["ratio"]))
    with torch.inference_mode(), open(args.out, "a") as out:
        prefix_kv = compute_span(r, torch.tensor(tpl.prefix_ids))
        for name in args.sets.split(","):
            cases = [json.loads(line) for line in open(SETS[name])][: args.limit]
            for case in cases:
                todo = [v for v in args.variants.split(",")
                        if (case["id"], v, args.ratio) not in done]
                if todo:
                    run_case(eng, tpl, prefix_kv, name, case, todo, args.ratio, out)


def run_case(eng, tpl, prefix_kv, name, case, todo, ratio, out) -> None:
    r = eng.runner
    chunks = [tokenize_chunk(c, eng.tokenizer) for c in case["chunks"]]
    p = tpl.assemble(chunks, case["question"])
    ids = torch.tensor(p.ids)
    full = eng._full(ids).logits
    kvs = {}
    for ctx in sorted({v.split("/")[0] for v in todo}):
        past = prefix_kv if ctx == "prefix" else None
        kvs[ctx] = [compute_span(r, torch.tensor(c), past) for c in chunks]
        kvs[ctx] = [ChunkKV(kv.k.half().float(), kv.v.half().float()) for kv in kvs[ctx]]
    for var in todo:
        ctx, policy, strength, cov, floor = (var.split("/") + ["0", "-", "-"][
            len(var.split("/")) - 2:])[:5]
        cached = [(0, prefix_kv)] + [(s, kv) for (s, _), kv in
                                     zip(p.chunk_spans, kvs[ctx], strict=True)]
        exact = exact_end(p.prefix_len, p.chunk_spans, ctx, range(len(chunks)))
        cfg = BlendConfig(ratio=ratio, policy=policy, correction_strength=float(strength),
                          coverage=None if cov == "-" else float(cov),
                          floor_ratio=None if floor == "-" else float(floor))
        plan = plan_prefill(len(p.ids), p.chunk_spans, p.suffix_start,
                            [(s, kv.n_tokens) for s, kv in cached], exact, "blend", cfg,
                            r.n_layers)
        out_ = fuse(r, ids, cached, plan.ctx, plan.policy, pipelined=False,
                    correction=plan.correction)
        logits = out_.logits
        forced = int(plan.ctx.forced.sum())
        share = (out_.recomputed_per_layer[-1] - forced) / plan.ctx.chunk_tokens
        rec = {"set": name, "case": case["id"], "var": var, "ratio": ratio,
               "kl": kl(full, logits), "agree": int(full.argmax() == logits.argmax()),
               "T": len(p.ids), "share": share}
        out.write(json.dumps(rec) + "\n")
        out.flush()
        print(rec, flush=True)


if __name__ == "__main__":
    main()
