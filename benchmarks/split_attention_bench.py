"""Selected-query attention on the CPU: the split kernel (unmasked prefix + masked diagonal,
merged by log-sum-exp) per block ladder, against the masked-SDPA reference and causal prefill.

    python benchmarks/split_attention_bench.py [--lengths 1024,2048,3072,4096,8192] [--reps 7]

Queries as the blend has them: ~15% of positions scattered plus a contiguous question tail;
SmolLM2's shape (9 q heads, 3 kv heads, head_dim 64), fp32. Throughput is score elements
(query x visible key x q head) per second; causal prefill over all ``T`` positions is the
yardstick. Patterns: ``blend`` (the above), ``tail-only`` (the last 32 positions: ``reuse``
computes only the question) and ``half-tail`` (the last half: where the padded causal path
takes over). ``attend_selected`` is what the engine calls (the split kernel from
``MIN_KEYS`` keys on, masked SDPA below, padded causal SDPA for a long tail). Variants run
round-robin, rep by rep, so a load change hits them all alike; figures are medians (and
minima) over the reps, wall and CPU time (CPU time at ``--threads 1`` is the figure least
moved by other load on the machine).
Writes ``benchmarks/results/split_attention_cpu.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from bench_args import count, out_file

from ragkv.engine.kernels.reference import TorchOps
from ragkv.engine.kernels.split_attention import split_attention


def positions(T: int, share: float = 0.15, tail: int = 32, seed: int = 0) -> torch.Tensor:
    """Sorted positions: ``share`` of ``[0, T - tail)`` at random, then the last ``tail``."""
    g = torch.Generator().manual_seed(seed + T)
    n = int(share * (T - tail))
    body = torch.randperm(T - tail, generator=g)[:n].sort().values
    return torch.cat([body, torch.arange(T - tail, T)])


def _time(variants: dict, reps: int) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """Round-robin: every rep runs each variant once, so load changes hit them all alike.
    Wall and CPU (process) seconds per call."""
    wall: dict[str, list[float]] = {name: [] for name in variants}
    cpu: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(reps):
        for name, (_, fn) in variants.items():
            c, t = time.process_time(), time.perf_counter()
            fn()
            wall[name].append(time.perf_counter() - t)
            cpu[name].append(time.process_time() - c)
    return wall, cpu


def bench_length(T: int, pattern: str, blocks: list[tuple[int, ...]], share: float,
                 reps: int) -> list[dict]:
    hq, hkv, d, scale = 9, 3, 64, 64**-0.5
    ref = TorchOps()
    pos = {"blend": positions(T, share), "tail-only": torch.arange(T - 32, T),
           "half-tail": torch.arange(T // 2, T)}[pattern]
    n = pos.numel()
    g = torch.Generator().manual_seed(1)
    q = torch.randn(hq, n, d, generator=g)
    k, v = torch.randn(hkv, T, d, generator=g), torch.randn(hkv, T, d, generator=g)
    qc = torch.randn(hq, T, d, generator=g)
    sel = int((pos + 1).sum()) * hq
    variants = {
        "causal prefill": (T * (T + 1) // 2 * hq, lambda: F.scaled_dot_product_attention(
            qc[None], k[None], v[None], is_causal=True, scale=scale, enable_gqa=True)),
        "masked reference": (sel, lambda: ref.attend_selected_masked(q, k, v, pos, scale)),
    }
    for b in blocks:
        variants[f"split {','.join(map(str, b))}"] = (
            sel, lambda b=b: split_attention(q, k, v, pos, scale, blocks=b))
    variants["attend_selected"] = (sel, lambda: ref.attend_selected(q, k, v, pos, scale))
    want = ref.attend_selected_masked(q, k, v, pos, scale)
    for name, (_, fn) in variants.items():
        if name != "causal prefill":
            assert (fn() - want).abs().max() < 1e-4, name
    wall, cpu = _time(variants, reps)
    ce = variants["causal prefill"][0]
    causal = statistics.median(wall["causal prefill"]) / ce
    causal_cpu = statistics.median(cpu["causal prefill"]) / ce
    rows = []
    for name, (elems, _) in variants.items():
        med, med_cpu = statistics.median(wall[name]), statistics.median(cpu[name])
        rows.append({"keys": T, "pattern": pattern, "queries": n, "variant": name,
                     "elements": elems, "median_ms": 1e3 * med, "min_ms": 1e3 * min(wall[name]),
                     "cpu_median_ms": 1e3 * med_cpu, "gelem_per_s": elems / med / 1e9,
                     "time_per_element_vs_causal": med / elems / causal,
                     "cpu_per_element_vs_causal": med_cpu / elems / causal_cpu})
        print(f"T={T:5d} {pattern:9s} n={n:4d} {name:18s} {1e3 * med:8.1f} ms (min "
              f"{1e3 * min(wall[name]):7.1f}, cpu {1e3 * med_cpu:7.1f})  "
              f"{elems / med / 1e9:6.3f} Gelem/s  x{med / elems / causal:5.2f} causal's time "
              f"per element (cpu x{med_cpu / elems / causal_cpu:5.2f})", flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lengths", default="1024,2048,3072,4096,8192")
    ap.add_argument("--patterns", default="blend,tail-only,half-tail")
    ap.add_argument("--blocks", default="32;64;128,16;256,32;512,64;1024,256,64",
                    help="block ladders to compare, ';' between ladders")
    ap.add_argument("--share", type=float, default=0.15)
    ap.add_argument("--reps", type=count, default=7)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", type=out_file,
                    default=Path("benchmarks/results/split_attention_cpu.json"))
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    blocks = [tuple(int(x) for x in ladder.split(",")) for ladder in args.blocks.split(";")]
    rows = [r for pattern in args.patterns.split(",")
            for T in [int(x) for x in args.lengths.split(",")]
            for r in bench_length(T, pattern, blocks if pattern == "blend" else [], args.share,
                                  args.reps)]
    meta = {"torch": torch.__version__, "threads": torch.get_num_threads(),
            "machine": platform.machine(), "shape": {"q_heads": 9, "kv_heads": 3,
                                                     "head_dim": 64, "dtype": "float32"},
            "share": args.share, "reps": args.reps, "load_avg": os.getloadavg(),
            "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
