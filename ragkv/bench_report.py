"""What ``ragkv bench`` writes besides its per-case records: the medians and means of each
variant over the cases, and what the run must name to be compared with another (the engine,
library versions, the machine and the anchor passage): TTFT ratios follow the machine."""

from __future__ import annotations

import platform
import statistics
import time
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import transformers

if TYPE_CHECKING:
    from ragkv.api import RagKV


def percentile(xs: list[float], q: int) -> float:
    """The ``q``-th percentile of ``xs`` (inclusive method, interpolated: the 50th is the
    median); the value itself for a single one."""
    if len(xs) == 1:
        return float(xs[0])
    return statistics.quantiles(xs, n=100, method="inclusive")[q - 1]


def summarize(records: list[dict]) -> list[dict]:
    groups: dict[tuple, list[dict]] = {}
    for r in records:
        key = (r["context"], r["mode"], r["policy"], r["ratio"], r.get("correction", "none"))
        groups.setdefault(key, []).append(r)
    out = []
    for (ctx, mode, policy, ratio, correction), rs in groups.items():
        def mean(k, rs=rs):
            vals = [r[k] for r in rs if r[k] is not None]
            return statistics.fmean(vals) if vals else None

        def med(k, rs=rs):
            vals = [r[k] for r in rs if r[k] is not None]
            return statistics.median(vals) if vals else None

        out.append({
            "context": ctx, "mode": mode, "policy": policy, "ratio": ratio,
            "correction": correction, "n": len(rs),
            "kl_basis": rs[0]["kl_basis"], "engine_ttft_median_s": med("engine_ttft_s"),
            "speedup_median": med("speedup"), "ttft_median_s": med("ttft_s"),
            "first_token_agree": mean("first_token_agree"),
            "first_token_kl_median": med("first_token_kl"),
            "tf_agree": mean("tf_agree"), "tf_kl_median": med("tf_kl"),
            "rouge_l": mean("rouge_l"), "contains": mean("contains"),
            "storage_share_median": med("storage_share"),
            "recomputed_share": statistics.fmean(
                r["recomputed_tokens"] / r["context_tokens"] for r in rs),
        })
    return out


def cpu_model() -> str:
    """The processor's model name: TTFT ratios follow the machine, so results name theirs."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:  # not Linux
        pass
    return platform.processor() or platform.machine()


def run_meta(rag: RagKV, spec: dict, n_cases: int) -> dict:
    """What a result must name besides its figures: engine, versions, machine, date, spec."""
    return {
        "engine": rag.backend.description, "model_fingerprint": rag.fingerprint[:16],
        "torch": torch.__version__, "transformers": transformers.__version__,
        "threads": torch.get_num_threads(),
        "machine": platform.machine(), "cpu": cpu_model(), "python": platform.python_version(),
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "cases": n_cases,
        "spec": spec,
    }


def anchor_meta(rag: RagKV, corpus: str | None) -> dict:
    """Which passage anchor-context chunks were precomputed after: where it came from, its
    length in tokens and its opening words."""
    ids = list(rag.backend.keys.anchor_ids)
    source = ("corpus" if corpus is not None
              else "anchor_text" if rag.config.anchor_text is not None else "builtin")
    text = rag.tokenizer.decode(ids, skip_special_tokens=True).strip()
    return {"source": source, "tokens": len(ids), "opening": text[:80]}
