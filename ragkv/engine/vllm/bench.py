"""``ragkv bench --engine vllm``: TTFT and fidelity of fused modes inside vLLM vs vLLM's own
full prefill, on the same prompts, in one run (chunks precomputed through vLLM first).

Two baselines: ``full`` is vLLM as users run it, prefix caching on (the template prefix and a
first chunk seen before come from its cache); ``full_cold`` is the same prompt with a unique
cache salt, so vLLM prefills every token. Fidelity uses what vLLM returns: the top-20
log-probabilities of the first token (agreement of the top-1, and KL(full || mode) over
full's top-20 with the mode's missing entries floored at its own 20th value: an approximation
of the full-vocabulary KL) and ROUGE-L of greedy answers.
"""

from __future__ import annotations

import math
import statistics
import time
from dataclasses import asdict

from ragkv import metrics
from ragkv.bench import BenchSpec
from ragkv.chunking import tokenize_chunk
from ragkv.config import BlendConfig


def top_kl(full: dict[int, float], mode: dict[int, float]) -> float:
    if not full or not mode:
        return float("nan")
    floor = min(mode.values())
    return sum(math.exp(lp) * (lp - mode.get(t, floor)) for t, lp in full.items())


def run_vllm_bench(rag, cases: list[dict], spec: BenchSpec, progress=None) -> dict:
    eng = rag.engine
    cases = cases[: spec.limit] if spec.limit else cases
    chunk_ids = [[tokenize_chunk(c, eng.tokenizer) for c in case["chunks"]] for case in cases]
    for ids in (i for per in chunk_ids for i in per):
        eng.precompute(ids)
    # Warm-up on a prompt of its own: one built from a case would leave that case's full
    # prefill in vLLM's prefix cache and time a cache hit as "full".
    warm = [tokenize_chunk("A warm-up chunk, shared by no case.", eng.tokenizer)]
    eng.precompute(warm[0])
    eng.generate(warm, "Warm up?", mode="full", max_new_tokens=1)
    eng.generate(warm, "Warm up?", mode="blend", max_new_tokens=1)
    todo = [("reuse", None)] if "reuse" in spec.modes else []
    if "blend" in spec.modes:
        todo += [("blend", r) for r in spec.ratios]
    records = []
    for n, (case, ids) in enumerate(zip(cases, chunk_ids, strict=True)):
        q = case["question"]
        cold = eng.generate(ids, q, mode="full", max_new_tokens=1, fresh=True)
        full = eng.generate(ids, q, mode="full", max_new_tokens=spec.max_new_tokens)
        for mode, ratio in todo:
            blend = BlendConfig(ratio=ratio or 0.0, policy=spec.policies[0],
                                check_layers=spec.check_layers,
                                deviation_on=spec.deviation_on)  # type: ignore[arg-type]
            a = eng.generate(ids, q, mode=mode, blend=blend, max_new_tokens=spec.max_new_tokens)
            records.append({
                "case": case["id"], "mode": mode, "ratio": ratio, "ttft_s": a.ttft_s,
                "full_ttft_s": full.ttft_s, "speedup": full.ttft_s / a.ttft_s,
                "full_cold_ttft_s": cold.ttft_s, "speedup_vs_cold": cold.ttft_s / a.ttft_s,
                "context_tokens": a.context_tokens, "recomputed": a.trace.get("recomputed"),
                "hits": a.trace.get("hits"), "misses": a.trace.get("misses"),
                "error": a.trace.get("error"), "fuse_s": a.trace.get("fuse_s"),
                "load_s": a.trace.get("load_s"), "write_s": a.trace.get("write_s"),
                "first_token_agree": float(a.tokens[:1] == full.tokens[:1]),
                "first_token_kl_top20": top_kl(full.first_logprobs, a.first_logprobs),
                "rouge_l": metrics.rouge_l(full.tokens, a.tokens),
            })
        if progress:
            progress("cases", n + 1, len(cases))
    summary = []
    for mode, ratio in todo:
        rs = [r for r in records if r["mode"] == mode and r["ratio"] == ratio]
        summary.append({
            "mode": mode, "ratio": ratio, "n": len(rs),
            "speedup_median": statistics.median(r["speedup"] for r in rs),
            "ttft_median_s": statistics.median(r["ttft_s"] for r in rs),
            "full_ttft_median_s": statistics.median(r["full_ttft_s"] for r in rs),
            "speedup_vs_cold_median": statistics.median(r["speedup_vs_cold"] for r in rs),
            "full_cold_ttft_median_s": statistics.median(r["full_cold_ttft_s"] for r in rs),
            "first_token_agree": statistics.fmean(r["first_token_agree"] for r in rs),
            "first_token_kl_top20_median": statistics.median(r["first_token_kl_top20"]
                                                             for r in rs),
            "rouge_l": statistics.fmean(r["rouge_l"] for r in rs),
            "recomputed_share": statistics.fmean((r["recomputed"] or 0) / r["context_tokens"]
                                                 for r in rs),
        })
    meta = {"engine": "vllm", "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "cases": len(cases), "spec": asdict(spec)}
    return {"meta": meta, "summary": summary, "cases": records}
