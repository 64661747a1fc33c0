"""The speed/fidelity frontier from `ragkv bench` results: one point per (set, method, ratio).

Usage: python benchmarks/frontier.py benchmarks/results/pydoc_main.json \
           benchmarks/results/prose_main.json --out benchmarks/results/frontier.json \
           --plot docs/frontier.png [--also benchmarks/results/pydoc_check1.json ...]

Reads the summaries that `ragkv bench` wrote (each figure measured in that run against full
prefill on the same prompts), writes them as one JSON list and, when matplotlib is installed
(`pip install 'ragkv[bench]'`), a plot: TTFT ratio against median first-token KL and against
teacher-forced agreement.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from bench_args import out_file


def method(s: dict, check_layers: list[int]) -> str:
    """A point's method label, e.g. ``blend qhkvd chunk_mean L2 (anchor)``."""
    parts = [s["mode"]]
    if s["mode"] == "blend":
        parts += [s["policy"], s.get("correction") or "none",
                  "L" + ",".join(map(str, check_layers))]
    return " ".join(parts) + f" ({s['context']})"


def points(path: Path, blend_only: bool = False) -> list[dict]:
    data = json.loads(path.read_text())
    name = path.stem.split("_")[0]
    layers = data["meta"]["spec"].get("check_layers", [1])
    out = []
    for s in data["summary"]:
        if s["mode"] == "full" or (blend_only and s["mode"] != "blend"):
            continue
        out.append({"set": name, "method": method(s, layers), "ratio": s["ratio"],
                    "speedup_median": s["speedup_median"],
                    "first_token_kl_median": s["first_token_kl_median"],
                    "first_token_agree": s["first_token_agree"], "tf_agree": s["tf_agree"],
                    "recomputed_share": s["recomputed_share"], "n": s["n"]})
    return out


def plot(rows: list[dict], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sets = sorted({r["set"] for r in rows})
    methods = sorted({r["method"] for r in rows})
    marks = dict(zip(sets, "os^D", strict=False))
    colors = {m: f"C{i % 10}" for i, m in enumerate(methods)}
    fig, axes = plt.subplots(1, 2, figsize=(14, 4.2))
    for ax, key, label in ((axes[0], "first_token_kl_median", "median first-token KL (lower "
                            "is better)"), (axes[1], "tf_agree", "teacher-forced agreement")):
        for m in methods:
            for s in sets:
                pts = sorted((r for r in rows if r["method"] == m and r["set"] == s
                              and r[key] is not None), key=lambda r: r["speedup_median"])
                if not pts:
                    continue
                ax.plot([p["speedup_median"] for p in pts], [p[key] for p in pts],
                        marker=marks[s], color=colors[m], linestyle="-" if s == sets[0]
                        else "--", label=f"{m} [{s}]")
        ax.set_xlabel("TTFT full / mode (median)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0].set_yscale("log")
    axes[0].axhline(0.02, color="grey", linewidth=0.8)
    axes[1].axhline(0.95, color="grey", linewidth=0.8)
    # beside the plots: inside, it hid the points it names
    axes[1].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("results", nargs="+", type=Path)
    ap.add_argument("--out", type=out_file, default=Path("benchmarks/results/frontier.json"))
    ap.add_argument("--plot", type=Path, default=None)
    ap.add_argument("--also", type=Path, nargs="*", default=[],
                    help="results of other runs whose blend points are added (e.g. an earlier "
                         "default's grid)")
    args = ap.parse_args()
    rows = [p for path in args.results for p in points(path)]
    rows += [p for path in args.also for p in points(path, blend_only=True)]
    args.out.write_text(json.dumps(rows, indent=1))
    print("| set | method | ratio | TTFT ratio | 1st-token KL | 1st agree | TF agree |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        ratio = "-" if r["ratio"] is None else f"{r['ratio']:.2f}"
        tf = "-" if r["tf_agree"] is None else f"{r['tf_agree']:.3f}"
        print(f"| {r['set']} | {r['method']} | {ratio} | x{r['speedup_median']:.2f} "
              f"| {r['first_token_kl_median']:.4f} | {r['first_token_agree']:.3f} | {tf} |")
    print(f"wrote {args.out}")
    if args.plot:
        try:
            plot(rows, args.plot)
            print(f"wrote {args.plot}")
        except ImportError:
            print("matplotlib is not installed: no plot (pip install 'ragkv[bench]')")


if __name__ == "__main__":
    main()
