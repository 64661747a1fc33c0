"""How well the quality guard (``BlendConfig.coverage``) predicts a blend that parts from full.

Usage: python benchmarks/guard_eval.py --plain benchmarks/results/prose_main.json \
           --guarded benchmarks/results/prose_guard.json [--kl 0.02] [--out FILE]
       python benchmarks/guard_eval.py --lab benchmarks/results/guard_lab.jsonl \
           --plain-var prefix/qhkvd/0.75 --guarded-var prefix/qhkvd/0.75/0.9/- [--kl 0.02]

``--plain``: a `ragkv bench` run with the guard off (its default blend row is the reference);
``--guarded``: the same cases with ``--coverage C``. A case is *bad* when the plain blend's
first-token KL exceeds ``--kl``; the guard *fires* when it added tokens. Prints how often it
fires, its precision and recall against bad cases, and the median KL and TTFT ratio with and
without it. ``--lab``: the same from one ``benchmarks/correction_lab.py`` file (first-token
KL only, no TTFT; the guard fired where it recomputed a larger share than the plain variant).
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from bench_args import out_file


def blend_rows(path: Path, ratio: float, correction: str) -> dict[str, dict]:
    data = json.loads(path.read_text())
    return {r["case"]: r for r in data["cases"]
            if r["mode"] == "blend" and r["ratio"] == ratio
            and r.get("correction", "none") == correction}


def evaluate(plain: dict[str, dict], guarded: dict[str, dict], kl: float) -> dict:
    cases = sorted(set(plain) & set(guarded))
    bad = {c for c in cases if plain[c]["first_token_kl"] > kl}
    fired = {c for c in cases if guarded[c].get("guard_tokens", 0) > 0}
    hit = bad & fired

    def med(rows, key):
        return statistics.median(rows[c][key] for c in cases)

    return {
        "cases": len(cases), "kl_threshold": kl, "bad": len(bad), "fired": len(fired),
        "fire_rate": len(fired) / len(cases) if cases else None,
        "precision": len(hit) / len(fired) if fired else None,
        "recall": len(hit) / len(bad) if bad else None,
        "kl_median_plain": med(plain, "first_token_kl"),
        "kl_median_guarded": med(guarded, "first_token_kl"),
        "speedup_median_plain": med(plain, "speedup"),
        "speedup_median_guarded": med(guarded, "speedup"),
        "recomputed_share_plain": statistics.fmean(
            plain[c]["recomputed_tokens"] / plain[c]["context_tokens"] for c in cases),
        "recomputed_share_guarded": statistics.fmean(
            guarded[c]["recomputed_tokens"] / guarded[c]["context_tokens"] for c in cases),
    }


def evaluate_lab(path: Path, plain_var: str, guarded_var: str, kl: float) -> dict:
    """Per set: the guard's fire rate, precision and recall from correction_lab records."""
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    out = {}
    for name in sorted({r["set"] for r in rows}):
        plain = {r["case"]: r for r in rows if r["set"] == name and r["var"] == plain_var}
        guarded = {r["case"]: r for r in rows if r["set"] == name and r["var"] == guarded_var}
        cases = sorted(set(plain) & set(guarded))
        bad = {c for c in cases if plain[c]["kl"] > kl}
        fired = {c for c in cases if guarded[c]["share"] > plain[c]["share"] + 1e-9}
        hit = bad & fired
        out[name] = {
            "cases": len(cases), "kl_threshold": kl, "bad": len(bad), "fired": len(fired),
            "fire_rate": len(fired) / len(cases) if cases else None,
            "precision": len(hit) / len(fired) if fired else None,
            "recall": len(hit) / len(bad) if bad else None,
            "kl_median_plain": statistics.median(plain[c]["kl"] for c in cases),
            "kl_median_guarded": statistics.median(guarded[c]["kl"] for c in cases),
            "bad_after_guard": sum(guarded[c]["kl"] > kl for c in cases),
            "recomputed_share_plain": statistics.fmean(plain[c]["share"] for c in cases),
            "recomputed_share_guarded": statistics.fmean(guarded[c]["share"] for c in cases),
        }
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--plain", type=Path, nargs="+", default=[])
    ap.add_argument("--guarded", type=Path, nargs="+", default=[])
    ap.add_argument("--lab", type=Path, default=None)
    ap.add_argument("--plain-var", default="prefix/qhkvd/0.75")
    ap.add_argument("--guarded-var", default="prefix/qhkvd/0.75/0.9/-")
    ap.add_argument("--ratio", type=float, default=0.15)
    ap.add_argument("--correction", default="chunk_mean")
    ap.add_argument("--kl", type=float, default=0.02)
    ap.add_argument("--out", type=out_file, default=None)
    args = ap.parse_args()
    results = {}
    if args.lab:
        results = evaluate_lab(args.lab, args.plain_var, args.guarded_var, args.kl)
        print(json.dumps(results, indent=1))
    for p, g in zip(args.plain, args.guarded, strict=True):
        res = evaluate(blend_rows(p, args.ratio, args.correction),
                       blend_rows(g, args.ratio, args.correction), args.kl)
        results[p.stem] = res
        print(p.stem, json.dumps(res, indent=1))
    if args.out:
        args.out.write_text(json.dumps(results, indent=1))
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
