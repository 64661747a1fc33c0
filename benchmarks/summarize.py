"""Render benchmark result JSON files as one markdown table (used for the README).

Usage: python benchmarks/summarize.py benchmarks/results/pydoc_main.json [more.json ...]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def num(value: float | None, fmt: str) -> str:
    """``value`` as ``fmt``, or ``-`` where the engine has no such figure (vLLM: no
    teacher-forced rows)."""
    return "-" if value is None else format(value, fmt)


def rows(path: Path) -> list[str]:
    data = json.loads(path.read_text())
    out = []
    for s in data["summary"]:
        if s["mode"] == "full":  # its answer-contains rate is the reference
            if s.get("contains") is not None:
                out.append(f"| - | full | - | - | - | 100.0% | x1.00 | 1.000 | 0.0000 | 1.000 "
                           f"| 0.0000 | 1.000 | {s['contains']:.3f} |")
            continue
        out.append(
            f"| {s['context']} | {s['mode']} | {s['policy'] or '-'} | {num(s['ratio'], '.2f')} "
            f"| {s.get('correction') or 'none'} "
            f"| {100 * s['recomputed_share']:.1f}% | x{s['speedup_median']:.2f} "
            f"| {num(s['first_token_agree'], '.3f')} | {num(s['first_token_kl_median'], '.4f')} "
            f"| {num(s['tf_agree'], '.3f')} | {num(s['tf_kl_median'], '.4f')} "
            f"| {num(s['rouge_l'], '.3f')} | {num(s.get('contains'), '.3f')} |")
    return out


def main(paths: list[str]) -> None:
    print("| precompute | mode | policy | ratio | correction | recomputed "
          "| TTFT full/mode (median) | 1st-token agree | 1st-token KL (median) | TF agree "
          "| TF KL (median) | ROUGE-L | answer contains |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    seen: set[str] = set()
    for p in paths:
        for row in rows(Path(p)):
            if row not in seen:
                seen.add(row)
                print(row)
    for p in paths:
        lc = json.loads(Path(p).read_text()).get("long_context")
        if lc:
            print(f"\nLong prompt ({lc['context_tokens']} tokens, {lc['chunks']} chunks): "
                  f"full {lc['full_ttft_s']:.1f} s, blend {lc['blend_ttft_s']:.1f} s "
                  f"(x{lc['speedup']:.2f}), first-token KL {lc['first_token_kl']:.3f}.")


if __name__ == "__main__":
    main(sys.argv[1:])
