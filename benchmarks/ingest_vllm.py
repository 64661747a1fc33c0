"""Ingestion throughput on the vLLM engine (in process): ragkv's precompute through its KV
connector against vLLM's own batched prefill of the same prompts, in chunk tokens per second,
in one run.

    python benchmarks/ingest_vllm.py [--chunks 16] [--repeats 3] [--context prefix]

Both sides prefill the same prompts (the template prefix and, with ``--context anchor``, the
anchor passage, then the chunk) through the same ``LLM``, batched by vLLM's scheduler; ragkv's
side also saves each chunk's KV to the cache (the work ingestion is for). Every repeat takes
chunks neither side has seen (pydoc topics, 384-512 tokens each) and empties vLLM's prefix
cache before each side, so neither reads what the other computed; the side that goes first
alternates. With the anchor context the passage is a shared prefix both sides reuse from
vLLM's prefix cache within a batch. Writes ``benchmarks/results/ingest_vllm.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

from bench_args import count, out_file


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--chunks", type=count, default=16, help="chunks per repeat")
    ap.add_argument("--repeats", type=count, default=3)
    ap.add_argument("--context", choices=("prefix", "anchor"), default="prefix")
    ap.add_argument("--out", type=out_file, default=Path("benchmarks/results/ingest_vllm.json"))
    a = ap.parse_args()
    # vLLM's CPU build keeps cores back for its own front end unless told otherwise; both sides
    # here run in this process, so every core prefills
    os.environ.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")

    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    from ragkv.api import RagKV
    from ragkv.chunking import chunk_text
    from ragkv.config import RagkvConfig, default_home
    from ragkv.ingest import pydoc_topics
    from ragkv.model_fetch import ensure_default_model

    with tempfile.TemporaryDirectory() as tmp:
        model = ensure_default_model(default_home())
        rag = RagKV(RagkvConfig(home=Path(tmp), model=model, engine="vllm",
                                precompute_context=a.context, anchor_source="builtin"))
        llm = rag.backend.transport.llm
        need = a.chunks * (a.repeats + 1)  # the first group warms both sides up
        chunks: list[list[int]] = []
        for _, text in pydoc_topics():
            chunks += [c.token_ids for c in chunk_text(text, rag.tokenizer, 512)
                       if len(c.token_ids) >= 384]
            if len(chunks) >= need:
                break
        if len(chunks) < need:
            raise SystemExit(f"only {len(chunks)} chunks of 384-512 tokens; ask for fewer")
        before = list(rag.backend.keys.before(a.context))
        params = SamplingParams(temperature=0, max_tokens=1)

        def vllm_batched(group: list[list[int]]) -> None:
            llm.generate([TokensPrompt(prompt_token_ids=before + c) for c in group], params,
                         use_tqdm=False)

        def ragkv_precompute(group: list[list[int]]) -> None:
            if not all(rag.precompute_many(group)):
                raise SystemExit("a chunk was already stored; the repeat is not fresh")

        sides = {"vllm_batched": vllm_batched, "ragkv_precompute": ragkv_precompute}
        times: dict[str, list[float]] = {k: [] for k in sides}
        tokens: list[int] = []
        for r in range(a.repeats + 1):
            group = chunks[r * a.chunks:(r + 1) * a.chunks]
            order = list(sides) if r % 2 == 0 else list(sides)[::-1]
            for name in order:
                llm.reset_prefix_cache()
                t = time.perf_counter()
                sides[name](group)
                if r:  # group 0: warm-up
                    times[name].append(time.perf_counter() - t)
            if r:
                tokens.append(sum(map(len, group)))
        rag.close()
    per_s = {k: [n / s for n, s in zip(tokens, v, strict=True)] for k, v in times.items()}
    ratios = [p / b for p, b in zip(per_s["ragkv_precompute"], per_s["vllm_batched"],
                                    strict=True)]
    result = {"engine": "vLLM in process (CPU build)", "context": a.context,
              "prompt_tokens_before_chunk": len(before), "chunks_per_repeat": a.chunks,
              "chunk_tokens": tokens, "seconds": times,
              "chunk_tokens_per_s": per_s,
              "chunk_tokens_per_s_median": {k: statistics.median(v) for k, v in per_s.items()},
              "ragkv_over_vllm_batched": ratios,
              "ragkv_over_vllm_batched_median": statistics.median(ratios)}
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(result, indent=1))
    for k, v in result["chunk_tokens_per_s_median"].items():
        print(f"{k:17s} {v:8.0f} chunk tokens/s (median of {a.repeats})")
    print(f"ragkv precompute / vLLM's own batched prefill: "
          f"{result['ragkv_over_vllm_batched_median']:.2f}")


if __name__ == "__main__":
    main()
