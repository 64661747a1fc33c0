"""vLLM's paged CPU attention kernel, as the connector drives it for the blend
(``ragkv/engine/vllm/paged.py``), against ragkv's torch selected-query attention.

    python benchmarks/vllm_paged_bench.py [--keys 2011] [--block 128] [--reps 15]

Needs the ``vllm`` extra (``make vllm-install``). One layer of SmolLM2's shape (9 q heads,
3 kv heads, head_dim 64), fp32, keys and values written into a paged cache through vLLM's own
cache op (blocks in a shuffled order, as a request's block table has them); queries:

* ``scattered``: ~13% of positions at random plus a 32-token question tail (what a blend
  layer after the check attends: ~260 queries at 2,011 keys);
* ``long-tail``: every position after a 32-token prefix (the blend's layers 0-1);
* ``short-tail``: the last 32 positions only (``reuse``: the question);
* ``all``: every position (a plain causal prefill, the yardstick of kernel efficiency).

Variants, round-robin rep by rep (load changes hit all alike): vLLM's kernel
(:func:`paged_attention`), ragkv's torch path as the engine calls it
(``TorchOps.attend_selected``: at this length masked SDPA for scattered queries, the split
kernel for a short tail, padded causal SDPA for a long one), the masked-SDPA reference
(``TorchOps.attend_selected_masked``) and the split kernel forced (``split_attention``: it
shares each block's key reads across its queries). Reported per variant: median and minimum
wall time, CPU time, and GFLOP/s by each (4 x head_dim x q heads per visible query-key pair;
CPU time at ``--threads 1`` is the figure least moved by other load). Outputs are checked
against each other first. Writes ``benchmarks/results/vllm_paged_cpu.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path
from types import SimpleNamespace

import torch
from bench_args import count, out_file

from ragkv.engine.kernels.reference import TorchOps
from ragkv.engine.kernels.split_attention import split_attention
from ragkv.engine.vllm.paged import paged_attention, slots, write_layer

HQ, HKV, D = 9, 3, 64


def make_layer(ops, n_blocks: int, block: int):
    """A vLLM CPU attention layer's state (as tests/test_vllm_paged.py builds it): its paged
    cache, ISA and scales, cache writes through vLLM's own op."""
    cache = torch.zeros(n_blocks, HKV, block, 2 * D)
    isa = "vec" if block % 32 == 0 else "vec16"

    def update(layer, k, v, kv_cache, slot):
        kc, vc = kv_cache.view(n_blocks, HKV, 2 * block, D).chunk(2, dim=2)
        ops.cpu_attn_reshape_and_cache(k, v, kc, vc, slot, isa, 1.0, 1.0, "auto")

    return SimpleNamespace(kv_cache=cache, isa=isa, num_heads=HQ, _k_scale_float=1.0,
                           _v_scale_float=1.0, impl=SimpleNamespace(do_kv_cache_update=update))


def positions(T: int, pattern: str, share: float, g: torch.Generator) -> torch.Tensor:
    if pattern == "scattered":
        body = torch.randperm(T - 32, generator=g)[: int(share * (T - 32))].sort().values
        return torch.cat([body, torch.arange(T - 32, T)])
    return {"long-tail": torch.arange(32, T), "short-tail": torch.arange(T - 32, T),
            "all": torch.arange(T)}[pattern]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--keys", type=int, default=2011)
    ap.add_argument("--block", type=int, default=128)
    ap.add_argument("--share", type=float, default=0.115,
                    help="share of positions selected in 'scattered', before the tail")
    ap.add_argument("--patterns", default="scattered,long-tail,short-tail,all")
    ap.add_argument("--reps", type=count, default=15)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", type=out_file, default=Path("benchmarks/results/vllm_paged_cpu.json"))
    args = ap.parse_args()
    from vllm import _custom_ops as ops  # needs the vllm extra

    if args.threads:
        torch.set_num_threads(args.threads)
    T, block = args.keys, args.block
    g = torch.Generator().manual_seed(0)
    n_blocks = (T + block - 1) // block
    table = torch.randperm(n_blocks + 3, generator=g)[:n_blocks]
    layer = make_layer(ops, n_blocks + 3, block)
    k, v = (torch.randn(HKV, T, D, generator=g) for _ in "kv")
    write_layer(layer, k, v, slots(table.tolist(), block, 0, T))
    block_table = table.to(torch.int32)[None]
    scale = D**-0.5
    ref = TorchOps()
    rows = []
    for pattern in args.patterns.split(","):
        q_pos = positions(T, pattern, args.share, g)
        n = q_pos.numel()
        q = torch.randn(HQ, n, D, generator=g)
        variants = {
            "vllm paged kernel": lambda q=q, q_pos=q_pos: paged_attention(
                layer, q, q_pos, block_table, scale),
            "ragkv torch (attend_selected)": lambda q=q, q_pos=q_pos: ref.attend_selected(
                q, k, v, q_pos, scale),
            "torch masked SDPA (attend_selected_masked)":
                lambda q=q, q_pos=q_pos: ref.attend_selected_masked(q, k, v, q_pos, scale),
            "torch split kernel (split_attention)":
                lambda q=q, q_pos=q_pos: split_attention(q, k, v, q_pos, scale),
        }
        want = variants["torch masked SDPA (attend_selected_masked)"]().reshape(n, -1)
        for name, fn in variants.items():
            err = (fn().reshape(n, -1) - want).abs().max().item()
            assert err < 1e-4, (pattern, name, err)
        wall: dict[str, list[float]] = {name: [] for name in variants}
        cpu: dict[str, list[float]] = {name: [] for name in variants}
        for _ in range(args.reps):
            for name, fn in variants.items():
                c, t = time.process_time(), time.perf_counter()
                fn()
                wall[name].append(time.perf_counter() - t)
                cpu[name].append(time.process_time() - c)
        visible = int((q_pos + 1).sum())
        flop = 4 * D * HQ * visible
        base = statistics.median(wall["vllm paged kernel"])
        base_cpu = statistics.median(cpu["vllm paged kernel"])
        for name in variants:
            med = statistics.median(wall[name])
            rows.append({
                "pattern": pattern, "keys": T, "queries": n, "variant": name,
                "median_ms": 1e3 * med, "min_ms": 1e3 * min(wall[name]),
                "cpu_median_ms": 1e3 * statistics.median(cpu[name]),
                "gflops": flop / med / 1e9,
                "gflops_cpu": flop / statistics.median(cpu[name]) / 1e9,
                "vs_vllm": med / base,
                "vs_vllm_cpu": statistics.median(cpu[name]) / base_cpu})
            r = rows[-1]
            print(f"{pattern:10s} n={n:5d} {name:43s} {r['median_ms']:8.2f} ms (min "
                  f"{r['min_ms']:7.2f}, cpu {r['cpu_median_ms']:7.2f})  {r['gflops']:6.1f} "
                  f"GFLOP/s  x{r['vs_vllm']:.2f} vLLM's time (cpu x{r['vs_vllm_cpu']:.2f})",
                  flush=True)
    import vllm

    meta = {"vllm": vllm.__version__, "torch": torch.__version__,
            "threads": torch.get_num_threads(), "machine": platform.machine(),
            "shape": {"q_heads": HQ, "kv_heads": HKV, "head_dim": D, "dtype": "float32"},
            "keys": T, "block_size": block, "reps": args.reps, "load_avg": os.getloadavg(),
            "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
