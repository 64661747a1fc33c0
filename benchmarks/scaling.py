"""TTFT against prompt length on the CPU: full prefill and blend (the default config)
at ~1k, 2k, 4k and 8k tokens, several prompts each, with the fitted growth of each mode.

    python benchmarks/scaling.py [--lengths 1024,2048,4096,8192] [--prompts 3] \\
        [--also-ratios 0.08,0.06] [--out benchmarks/results/scaling_cpu.json] \\
        [--plot docs/scaling_cpu.png]

Prompts are built from the pydoc case set's chunks (``benchmarks/cases/pydoc.jsonl``): prompt
i of every length takes the chunks in its own shuffled order until the length is reached (the
last chunk cut to fit), with the question of case i. Every chunk is precomputed first (not
timed); each length starts with an untimed warm-up of both modes. Then, per prompt, an untimed
read puts its chunks in the memory tier, and full and blend run back to back (their order
alternating from prompt to prompt), through the public facade (``RagKV.generate``, the
transformers engine, SmolLM2 fp32 by default), and TTFT is the trace's (request to first
token, cache lookup and loading included).

``--also-ratios 0.08,0.06`` also times the blend at those ratios, interleaved with the default
on the same prompts (modes ``blend@0.08``...), each with its first-token KL against full
prefill: the speed/fidelity trade at long prompts.

``--also-preselect 3`` also times the default ratio with a preselection at layer 1
(``check_layers=(1, 2)``, ``start_factor=3``: layer 1 computes three times the ratio's tokens
instead of all of them), mode ``blend+pre3``, with its first-token KL the same way.

``--also-context 4`` also times the default ratio with the preselection by stored context
scores (``BlendConfig(preselect=4)``: only four times the ratio's tokens, the highest-ranked as
``preselect_by`` says, are computed before the check layer), mode ``blend+ctx4``.

``--also-whole`` also times the default without its preselection
(``BlendConfig(preselect_from=None)``: every token computed before the check layer at any
length; the default preselects from ``PRESELECT_FROM``, 512 prompt tokens), mode
``blend_whole``: what ``preselect_from`` buys at each length.

``--attention masked,split`` also times the blend with the old masked-SDPA selected-query
attention (``TorchOps.attend_selected_masked``) interleaved with the default, on the same
prompts: the A/B of the split kernel (below ``split_attention.MIN_KEYS`` keys both arms run
masked SDPA). Each query's CPU seconds (process time) are recorded beside its TTFT: with
``--threads 1`` they are the figure least moved by other load on the machine.

Per length: medians over the prompts of each mode's TTFT and of the per-prompt ratio
full / blend; the growth exponent of each mode is the slope of log(median TTFT) against
log(median prompt tokens) (least squares over the lengths), and between neighbours.
"""

from __future__ import annotations

import argparse
import atexit
import json
import math
import platform
import random
import shutil
import statistics
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import torch
from bench_args import count, out_file

from ragkv import metrics
from ragkv.api import RagKV
from ragkv.bench import BenchSpec, load_cases, read_into_memory, warm_config
from ragkv.bench_report import cpu_model
from ragkv.chunking import tokenize_chunk
from ragkv.config import DEFAULT_RATIO, BlendConfig, RagkvConfig
from ragkv.engine.hf import HFEngine
from ragkv.model_fetch import resolve_model

ATTENTION = ("split", "masked")
BLEND = f"blend {DEFAULT_RATIO}"


def label(mode: str) -> str:
    """What a mode is called in the table and the plot."""
    if mode.startswith("blend@"):
        return f"blend {mode[6:]}"
    if mode.startswith("blend+pre"):
        return f"{BLEND}, layer-1 preselection x{mode[9:]}"
    if mode == "blend_whole":
        return f"{BLEND}, every token before the check"
    if mode.startswith("blend+ctx"):
        return f"{BLEND}, context-score preselection x{mode[9:]}"
    return {"full": "full prefill", "blend": BLEND,
            "blend_masked": f"{BLEND}, masked attention"}[mode]


def build_prompts(rag: RagKV, cases: list[dict], length: int, count: int,
                  pool: list[list[int]]) -> list[tuple[list[list[int]], str]]:
    """``count`` prompts of about ``length`` tokens: chunks of ``pool`` in a per-prompt order,
    the last one cut so the assembled prompt lands on ``length``."""
    out = []
    for i in range(count):
        question = cases[i % len(cases)]["question"]
        order = list(range(len(pool)))
        random.Random(i).shuffle(order)
        overhead = len(rag.template.assemble([[0]], question).ids) - 1
        chunks: list[list[int]] = []
        used = overhead
        sep = len(rag.template.sep_ids)
        for j in order:
            room = length - used - (sep if chunks else 0)
            if room < 16:
                break
            chunks.append(pool[j][:room])
            used += len(chunks[-1]) + (sep if len(chunks) > 1 else 0)
        out.append((chunks, question))
    return out


def _time(rag: RagKV, chunks, question: str, mode: str, blend: BlendConfig | None = None
          ) -> dict:
    cpu = time.process_time()
    ans = rag.generate(chunks, question, mode=mode, blend=blend, max_new_tokens=1,
                       log_query=False)
    cpu = time.process_time() - cpu
    t = ans.trace
    return {"ttft_s": t.ttft_s, "cpu_s": cpu, "context_tokens": t.context_tokens,
            "recomputed_tokens": t.recomputed_tokens, "load_s": t.load_s,
            "lookup_s": t.lookup_s, "hits": t.hits, "misses": t.misses,
            "tiers": t.tiers, "first": ans.first}


def _slope(xs: list[float], ys: list[float]) -> float | None:
    if len(xs) < 2:
        return None
    lx, ly = [math.log(x) for x in xs], [math.log(y) for y in ys]
    mx, my = statistics.fmean(lx), statistics.fmean(ly)
    den = sum((a - mx) ** 2 for a in lx)
    return sum((a - mx) * (b - my) for a, b in zip(lx, ly, strict=True)) / den if den else None


def summarize(rows: list[dict], modes: list[str]) -> dict:
    lengths = sorted({r["length"] for r in rows})
    table = []
    for n in lengths:
        rs = [r for r in rows if r["length"] == n]
        entry = {"length": n, "prompts": len(rs),
                 "tokens_median": statistics.median(r["context_tokens"] for r in rs)}
        for m in modes:
            entry[f"{m}_ttft_median_s"] = statistics.median(r[m]["ttft_s"] for r in rs)
            entry[f"{m}_cpu_median_s"] = statistics.median(r[m]["cpu_s"] for r in rs)
            if m != "full":
                entry[f"{m}_speedup_median"] = statistics.median(
                    r["full"]["ttft_s"] / r[m]["ttft_s"] for r in rs)
                entry[f"{m}_recomputed_share"] = statistics.fmean(
                    r[m]["recomputed_tokens"] / r[m]["context_tokens"] for r in rs)
                entry[f"{m}_first_token_agree"] = statistics.fmean(
                    r[m]["first_token_agree"] for r in rs)
                entry[f"{m}_first_token_kl_median"] = statistics.median(
                    r[m]["first_token_kl"] for r in rs)
                entry[f"{m}_cpu_ratio_median"] = statistics.median(
                    r["full"]["cpu_s"] / r[m]["cpu_s"] for r in rs)
        if "blend" in modes and "blend_masked" in modes:
            for what in ("ttft", "cpu"):
                entry[f"masked_over_split_{what}_median"] = statistics.median(
                    r["blend_masked"][f"{what}_s"] / r["blend"][f"{what}_s"] for r in rs)
        table.append(entry)
    xs = [e["tokens_median"] for e in table]
    growth = {}
    for m in modes:
        ys = [e[f"{m}_ttft_median_s"] for e in table]
        growth[m] = {"exponent": _slope(xs, ys),
                     "between": [{"from": a, "to": b, "exponent": _slope([a, b], [ya, yb])}
                                 for a, b, ya, yb in zip(xs, xs[1:], ys, ys[1:], strict=False)]}
    return {"table": table, "growth": growth}


def markdown(summary: dict, modes: list[str]) -> str:
    head = ["tokens (median)", "prompts", "full TTFT"]
    for m in modes[1:]:
        head += [f"{label(m)} TTFT", f"x full/{m}"]
    head += ["recomputed", "1st-token agree", "1st-token KL (median)"]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for e in summary["table"]:
        cells = [f"{e['tokens_median']:,.0f}", str(e["prompts"]),
                 f"{e['full_ttft_median_s']:.2f} s"]
        for m in modes[1:]:
            cells += [f"{e[f'{m}_ttft_median_s']:.2f} s", f"x{e[f'{m}_speedup_median']:.2f}"]
        cells += [" / ".join(f"{100 * e[f'{m}_recomputed_share']:.1f}%" for m in modes[1:]),
                  " / ".join(f"{e[f'{m}_first_token_agree']:.2f}" for m in modes[1:]),
                  " / ".join(f"{e[f'{m}_first_token_kl_median']:.4f}" for m in modes[1:])]
        lines.append("| " + " | ".join(cells) + " |")
    g = summary["growth"]
    lines.append("")
    lines.append("Fitted growth (log-log slope of median TTFT vs tokens): " + ", ".join(
        f"{m} {g[m]['exponent']:.2f}" for m in modes if g[m]["exponent"] is not None))
    for m in modes:
        steps = ", ".join(f"{s['from']:.0f}->{s['to']:.0f}: {s['exponent']:.2f}"
                          for s in g[m]["between"])
        if steps:
            lines.append(f"  {m} between lengths: {steps}")
    lines.append("CPU seconds per query (process time, all threads; robust to other load at "
                 "--threads 1), x full/blend: " + ", ".join(
                     f"{e['tokens_median']:.0f}: {e['full_cpu_median_s']:.2f} / "
                     f"{e['blend_cpu_median_s']:.2f} s x{e['blend_cpu_ratio_median']:.2f}"
                     for e in summary["table"]))
    if "blend_masked" in modes:
        lines.append("blend, masked attention / split attention (median per prompt), TTFT | CPU: "
                     + ", ".join(f"{e['tokens_median']:.0f}: "
                                 f"x{e['masked_over_split_ttft_median']:.2f} | "
                                 f"x{e['masked_over_split_cpu_median']:.2f}"
                                 for e in summary["table"]))
    return "\n".join(lines)


def plot(rows: list[dict], summary: dict, modes: list[str], path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(6.4, 4.4), dpi=120)
    xs = [e["tokens_median"] for e in summary["table"]]
    colors = ("tab:red", "tab:blue", "tab:gray", "tab:green", "tab:orange", "tab:purple")
    for m, color in zip(modes, colors, strict=False):
        ys = [e[f"{m}_ttft_median_s"] for e in summary["table"]]
        k = summary["growth"][m]["exponent"]
        ax.plot(xs, ys, "-o", color=color,
                label=f"{label(m)} (median; growth ~ n^{k:.2f})" if k else label(m))
        ax.scatter([r["context_tokens"] for r in rows], [r[m]["ttft_s"] for r in rows],
                   s=10, color=color, alpha=0.4)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xticks(xs, [f"{x:,.0f}" for x in xs])
    ax.minorticks_off()
    ax.set_xlabel("prompt tokens")
    ax.set_ylabel("TTFT (s)")
    threads = torch.get_num_threads()
    ax.set_title(f"SmolLM2-135M fp32, transformers engine, CPU ({threads} "
                 f"thread{'s' if threads > 1 else ''})")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return True


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lengths", default="1024,2048,4096,8192")
    ap.add_argument("--prompts", type=count, default=3)
    ap.add_argument("--cases", type=Path, default=Path("benchmarks/cases/pydoc.jsonl"))
    ap.add_argument("--attention", default="split",
                    help="blend's selected-query attention: split (default), or masked,split "
                         "to time both interleaved")
    ap.add_argument("--also-ratios", default="",
                    help="comma-separated blend ratios to time beside the default's")
    ap.add_argument("--also-preselect", default="",
                    help="comma-separated start factors of a layer-1 preselection to time at "
                         "the default ratio (check layers 1 and 2)")
    ap.add_argument("--also-context", default="",
                    help="comma-separated factors of the preselection by stored context scores "
                         "(BlendConfig.preselect) to time at the default ratio")
    ap.add_argument("--also-whole", action="store_true",
                    help="also time the default with no preselection "
                         "(preselect_from=None)")
    ap.add_argument("--model", type=Path, default=None)
    ap.add_argument("--threads", type=int, default=None,
                    help="torch threads (default: torch's, one per core)")
    ap.add_argument("--out", type=out_file, default=Path("benchmarks/results/scaling_cpu.json"))
    ap.add_argument("--plot", type=Path, default=Path("docs/scaling_cpu.png"))
    args = ap.parse_args()
    attention = args.attention.split(",")
    if not attention or any(a not in ATTENTION for a in attention):
        ap.error(f"--attention: comma-separated among {', '.join(ATTENTION)}")
    modes = ["full", "blend"] + (["blend_masked"] if "masked" in attention else [])
    try:  # mode name -> its blend, e.g. "blend@0.08"
        extra = {f"blend@{float(r):g}": BlendConfig(ratio=float(r))
                 for r in args.also_ratios.split(",") if r.strip()}
    except ValueError as exc:
        ap.error(f"--also-ratios: {exc}")
    try:
        extra |= {f"blend+pre{float(f):g}": BlendConfig(check_layers=(1, 2),
                                                        start_factor=float(f))
                  for f in args.also_preselect.split(",") if f.strip()}
    except ValueError as exc:
        ap.error(f"--also-preselect: {exc}")
    try:
        extra |= {f"blend+ctx{float(f):g}": BlendConfig(preselect=float(f))
                  for f in args.also_context.split(",") if f.strip()}
    except ValueError as exc:
        ap.error(f"--also-context: {exc}")
    if args.also_whole:
        extra["blend_whole"] = BlendConfig(preselect_from=None)
    modes += list(extra)
    if args.threads:
        torch.set_num_threads(args.threads)
    home = Path(tempfile.mkdtemp(prefix="ragkv-scaling-"))
    atexit.register(shutil.rmtree, home, ignore_errors=True)  # each run holds GBs of KV
    cfg = RagkvConfig(home=home)
    engine = HFEngine.load(resolve_model(args.model, RagkvConfig().home), cfg.device, cfg.dtype)
    rag = RagKV(cfg, engine=engine)
    ops = engine.runner.ops
    max_len = rag.backend.max_model_len - 1
    cases = load_cases(args.cases)
    pool = [tokenize_chunk(c, rag.tokenizer) for case in cases for c in case["chunks"]]
    lengths = [min(int(x), max_len) for x in args.lengths.split(",")]
    prompts = {n: build_prompts(rag, cases, n, args.prompts, pool) for n in lengths}
    t0 = time.perf_counter()
    rag.precompute_many([c for ps in prompts.values() for chunks, _ in ps for c in chunks])
    print(f"precomputed in {time.perf_counter() - t0:.0f} s", flush=True)

    def run(chunks, question, mode):
        if mode == "blend_masked":
            ops.attend_selected = ops.attend_selected_masked  # this instance only
            try:
                return _time(rag, chunks, question, "blend")
            finally:
                del ops.attend_selected
        if mode in extra:
            return _time(rag, chunks, question, "blend", extra[mode])
        return _time(rag, chunks, question, mode)

    rows = []
    warm = warm_config(BenchSpec(ratios=[DEFAULT_RATIO]))
    for n in lengths:
        chunks, question = prompts[n][0]
        for mode in modes:  # untimed warm-up at this length
            run(chunks, question, mode)
        for i, (chunks, question) in enumerate(prompts[n]):
            # the prompt's chunks into the memory tier, as ``ragkv bench`` does: the blend
            # reads the tier it would on a chunk seen before, not whatever the last prompt left
            read_into_memory(rag, chunks, question, warm)
            order = modes if i % 2 == 0 else modes[::-1]
            res = {m: run(chunks, question, m) for m in order}
            row = {"length": n, "prompt": i, "chunks": len(chunks),
                   "context_tokens": res["full"]["context_tokens"]}
            firsts = {m: res[m].pop("first") for m in modes}
            for m in modes:
                if m != "full":
                    res[m].update(metrics.first_token(firsts["full"], firsts[m]))
                row[m] = res[m]
            rows.append(row)
            print(f"{n:5d} #{i} {row['context_tokens']:5d} tokens: " + ", ".join(
                f"{m} {row[m]['ttft_s']:.3f} s" for m in modes), flush=True)
    summary = summarize(rows, modes)
    meta = {"engine": rag.backend.description, "model_fingerprint": rag.fingerprint[:16],
            "blend": asdict(cfg.blend),
            "kv_dtype": cfg.kv_dtype, "precompute_context": cfg.precompute_context,
            "torch": torch.__version__, "threads": torch.get_num_threads(),
            "machine": platform.machine(), "cpu": cpu_model(),
            "python": platform.python_version(),
            "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "lengths": lengths, "prompts": args.prompts, "attention": attention}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"meta": meta, **summary, "rows": rows}, indent=1) + "\n")
    print()
    print(markdown(summary, modes))
    if plot(rows, summary, modes, args.plot):
        print(f"\nwrote {args.out} and {args.plot}")
    else:
        print(f"\nwrote {args.out}; no plot: matplotlib is not installed")


if __name__ == "__main__":
    main()
