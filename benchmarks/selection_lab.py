"""Which tokens to recompute, at the corpus-anchor default: the selection's knobs one at a time
(policy, check layer, what the deviation is measured on, the correction), blend 0.15, against
full prefill on every other case of a public set.

    python benchmarks/selection_lab.py pydoc [--variants reuse,q_L1_k,...] [--threads 1] [--odd]
    python benchmarks/selection_lab.py --cases benchmarks/cases/pydoc_long.jsonl [--variants ...]

Each variant changes settings of the default of its time (``qhkvd``, check layer 1, deviation on
K, ``chunk_mean`` 0.75, every token computed before the check layer at any length); the
``r12_*`` variants compare corrections at the check-layer-2 default, the ``narrow_*`` and
``pre_L12_*`` variants narrowing after it and a layer-1 preselection before it, with the local
correction, and the ``ctx_*`` and ``question_*`` variants the preselection by stored context
scores, alone or times the question's attention (``BlendConfig.preselect``, ``preselect_by``).
The cases are the set's even-numbered ones (``--odd``: the odd ones, left to confirm a
choice); the anchor passage is picked from the whole set's chunks, as ``ragkv bench`` does.
``--cases FILE`` runs every case of another case file instead (e.g. the long cases of
``benchmarks/long_cases.py``). Writes ``benchmarks/results/selection_lab_<set>.json``
(``<set>``: the file's name with ``--cases``; or ``--out``): per variant the median first-token
KL, mean teacher-forced agreement and median teacher-forced KL, median TTFT ratio, and every
case's record.
"""

from __future__ import annotations

import argparse
import atexit
import json
import shutil
import statistics
import tempfile
from pathlib import Path

import torch
from bench_args import out_file

from ragkv.api import RagKV
from ragkv.bench import BenchSpec, _record, _scores, load_cases, read_into_memory, warm_config
from ragkv.chunking import tokenize_chunk
from ragkv.config import BlendConfig, RagkvConfig, default_home

ROOT = Path(__file__).resolve().parents[1]
DEFAULT = dict(ratio=0.15, policy="qhkvd", check_layers=(1,), deviation_on="k",
               correction="chunk_mean", correction_strength=0.75, preselect_from=None)
VARIANTS: dict[str, tuple[str, dict]] = {
    "reuse": ("reuse", {}),
    "q_L1_k": ("blend", {}),  # the default
    "h_L1_k": ("blend", {"policy": "hkvd"}),
    "q_L1_kv": ("blend", {"deviation_on": "kv"}),
    "q_L1_v": ("blend", {"deviation_on": "v"}),
    "q_L2_k": ("blend", {"check_layers": (2,)}),
    "q_L3_k": ("blend", {"check_layers": (3,)}),
    # a later check layer costs one more layer computed whole: paid back by a smaller ratio?
    "q_L2_k_r12": ("blend", {"check_layers": (2,), "ratio": 0.12}),
    "q_L2_k_r10": ("blend", {"check_layers": (2,), "ratio": 0.10}),
    "q_L1_k_nocorr": ("blend", {"correction": "none"}),
    # a preselection at layer 1 spares most of layer 1's compute before the check at layer 2
    "q_L12_k_r12": ("blend", {"check_layers": (1, 2), "ratio": 0.12}),
    "q_L12_k_r12_s3": ("blend", {"check_layers": (1, 2), "ratio": 0.12, "start_factor": 3.0}),
    "q_L12_k_r15": ("blend", {"check_layers": (1, 2), "ratio": 0.15}),
    # the correction at the check-layer-2 default: the chunk's mean drift, or a mix of it with
    # the mean drift of the recomputed tokens within a window of positions
    "r12_mean": ("blend", {"check_layers": (2,), "ratio": 0.12, "correction": "chunk_mean"}),
    **{f"r12_local{w}": ("blend", {"check_layers": (2,), "ratio": 0.12,
                                   "correction": "local_mean", "correction_window": w,
                                   "correction_mix": 0.5}) for w in (8, 16, 32)},
    # narrowing after the check: 1.5x the ratio from layer 2 to the second check layer, the
    # ratio after it; about the default's work (layers x tokens) or less
    **{f"narrow_L2_{second}_r{round(r * 100)}": (
        "blend", {"check_layers": (2, second), "ratio": r, "start_factor": 1.5,
                  "correction": "local_mean", "correction_window": 16, "correction_mix": 0.5})
       for second, r in ((6, 0.11), (8, 0.10), (12, 0.10))},
    # the preselection at layer 1 with the local correction
    **{f"pre_L12_r{round(r * 100)}_s{f:g}": (
        "blend", {"check_layers": (1, 2), "ratio": r, "start_factor": f,
                  "correction": "local_mean", "correction_window": 16, "correction_mix": 0.5})
       for r, f in ((0.15, 2.0), (0.13, 3.0), (0.12, 3.0))},
    # the preselection by stored context scores (BlendConfig.preselect) before the layer-2
    # check: no layer computed for every token; ranked by the scores alone (ctx_*) or by the
    # scores times the question's probed attention (question_*)
    **{f"{name}_r{round(r * 100)}_s{f:g}": (
        "blend", {"check_layers": (2,), "ratio": r, "preselect": f, "preselect_by": by,
                  "correction": "local_mean", "correction_window": 16, "correction_mix": 0.5})
       for name, by in (("ctx", "context"), ("question", "question"))
       for r, f in ((0.12, 3.0), (0.12, 4.0), (0.12, 6.0), (0.15, 4.0))},
}


def summarize(rows: dict[str, list[dict]]) -> dict[str, dict]:
    return {name: {"n": len(rs),
                   "first_token_kl_median": statistics.median(r["first_token_kl"] for r in rs),
                   "tf_agree_mean": statistics.mean(r["tf_agree"] for r in rs),
                   "tf_kl_median": statistics.median(r["tf_kl"] for r in rs),
                   "first_token_agree": statistics.mean(r["first_token_agree"] for r in rs),
                   "speedup_median": statistics.median(r["speedup"] for r in rs)}
            for name, rs in rows.items() if rs}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("set", nargs="?", choices=("pydoc", "prose"))
    ap.add_argument("--cases", type=Path, default=None,
                    help="every case of this JSONL file instead of half a public set")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--odd", action="store_true",
                    help="the odd-numbered cases (to confirm a choice made on the even ones)")
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--out", type=out_file, default=None,
                    help="default: benchmarks/results/selection_lab_<set>.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    names = args.variants.split(",")
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        raise SystemExit(f"unknown variants {unknown}; choose from {', '.join(VARIANTS)}")
    if (args.set is None) == (args.cases is None):
        raise SystemExit("give one of: a public set (pydoc or prose), --cases FILE")
    if args.cases is not None:
        args.set = args.cases.stem
        every = cases = load_cases(args.cases)
    else:
        every = load_cases(ROOT / "benchmarks" / "cases" / f"{args.set}.jsonl")
        cases = every[1::2] if args.odd else every[::2]
    home = Path(tempfile.mkdtemp(prefix="ragkv-selection-"))
    atexit.register(shutil.rmtree, home, ignore_errors=True)  # each run holds GBs of KV
    (home / "models").symlink_to(default_home() / "models")
    rag = RagKV(RagkvConfig(home=home))
    rag.choose_anchor([c for case in every for c in case["chunks"]], record=False)
    ids = [[tokenize_chunk(c, rag.tokenizer) for c in case["chunks"]] for case in cases]
    for chunk_ids in ids:
        rag.precompute_many(chunk_ids)
    rows: dict[str, list[dict]] = {n: [] for n in names}
    # each ratio once: BenchSpec refuses repeats, and several variants share one
    warm = warm_config(BenchSpec(ratios=sorted({BlendConfig(**{**DEFAULT, **c}).ratio
                                                for _, c in VARIANTS.values()})))
    for case, chunk_ids in zip(cases, ids, strict=True):
        q = case["question"]
        # every variant reads the case's chunks from the memory tier (as in ``ragkv bench``)
        read_into_memory(rag, chunk_ids, q, warm)
        full = rag.generate(chunk_ids, q, mode="full", keep_kv=True, log_query=False,
                            max_new_tokens=args.max_new_tokens)
        scores = _scores(full, full.tokens)
        for name in names:
            mode, change = VARIANTS[name]
            blend = BlendConfig(**{**DEFAULT, **change})
            ans = rag.generate(chunk_ids, q, mode=mode, blend=blend, keep_kv=True,
                               log_query=False, max_new_tokens=args.max_new_tokens)
            rows[name].append(_record(case, "anchor", ans, full, scores, blend.correction))
            if ans.generation is not None:
                ans.generation.close()
        full.generation.close()
        print(case["id"], {n: (round(rows[n][-1]["first_token_kl"], 4),
                               round(rows[n][-1]["tf_agree"], 3)) for n in names}, flush=True)
    summary = summarize(rows)
    for name, s in summary.items():
        print(f"{args.set} {name}: KL {s['first_token_kl_median']:.4f} "
              f"TF {s['tf_agree_mean']:.3f} TF KL {s['tf_kl_median']:.4f} "
              f"x{s['speedup_median']:.2f}")
    out = args.out or ROOT / "benchmarks" / "results" / f"selection_lab_{args.set}.json"
    half = "all" if args.cases else "odd" if args.odd else "even"
    out.write_text(json.dumps({"set": args.set, "half": half,
                               "cases": [c["id"] for c in cases],
                               "default": {k: list(v) if isinstance(v, tuple) else v
                                           for k, v in DEFAULT.items()},
                               "threads": args.threads, "summary": summary, "rows": rows},
                              indent=1))


if __name__ == "__main__":
    main()
