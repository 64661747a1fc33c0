"""Ingestion throughput on the transformers engine: ragkv's precompute (8 chunks per forward
pass, each after the template prefix) against the model's own batched prefill of the same
chunks, and against one chunk at a time, in tokens per second, in one run. ``ragkv_default``
is the whole of ragkv's ingestion at the default settings into an empty cache: with anchor
precompute, two entries per chunk (after the prefix, and after the prefix and the corpus
passage), their context scores and their storage.

    python benchmarks/ingest_bench.py [--chunks 32] [--out benchmarks/results/ingest_cpu.json]
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch
from bench_args import count, out_file


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--chunks", type=count, default=32)
    ap.add_argument("--repeats", type=count, default=3)
    ap.add_argument("--out", type=out_file, default=Path("benchmarks/results/ingest_cpu.json"))
    a = ap.parse_args()

    from ragkv.api import RagKV
    from ragkv.chunking import chunk_text
    from ragkv.config import RagkvConfig, default_home
    from ragkv.engine.blend import compute_span
    from ragkv.engine.precompute import BATCH, compute_spans
    from ragkv.ingest import pydoc_topics
    from ragkv.model_fetch import ensure_default_model

    with tempfile.TemporaryDirectory() as tmp:
        model = ensure_default_model(default_home())
        rag = RagKV(RagkvConfig(home=Path(tmp), model=model))
        eng = rag.backend.engine
        chunks: list[list[int]] = []
        for _, text in pydoc_topics():
            chunks += [c.token_ids for c in chunk_text(text, rag.tokenizer, 512)
                       if len(c.token_ids) >= 384]
            if len(chunks) >= a.chunks:
                break
        chunks = chunks[:a.chunks]
        tokens = sum(map(len, chunks))
        past = rag.backend.prefix_kv()
        prefix = list(rag.template.prefix_ids)

        def ragkv_batched() -> None:
            compute_spans(eng.runner, chunks, past)

        def one_at_a_time() -> None:
            for c in chunks:
                compute_span(eng.runner, torch.tensor(c), past)

        @torch.inference_mode()
        def model_batched() -> None:  # the model's own forward, prefix + chunk, padded batches
            order = sorted(chunks, key=len)
            for s in range(0, len(order), BATCH):
                group = order[s:s + BATCH]
                n = max(map(len, group))
                ids = torch.zeros(len(group), len(prefix) + n, dtype=torch.long)
                mask = torch.zeros_like(ids)
                for i, c in enumerate(group):
                    row = prefix + c
                    ids[i, :len(row)] = torch.tensor(row)
                    mask[i, :len(row)] = 1
                # One position's logits per row, as a serving engine's prefill computes
                # them: every position's would slow this side and flatter ragkv's ratio.
                eng.model(input_ids=ids, attention_mask=mask, use_cache=True, logits_to_keep=1)

        texts = [rag.tokenizer.decode(c) for c in chunks]
        fresh = itertools.count()

        def ragkv_default() -> None:  # a new cache each time, on the same loaded model
            home = Path(tmp) / f"cache{next(fresh)}"
            home.mkdir()
            (home / "models").symlink_to(default_home() / "models")
            r = RagKV(RagkvConfig(home=home, model=model), engine=eng)
            r.choose_anchor(texts)
            r.precompute_many(chunks)
            r.close()

        runs = {"ragkv_batched": ragkv_batched, "model_batched": model_batched,
                "one_at_a_time": one_at_a_time, "ragkv_default": ragkv_default}
        ragkv_batched()  # warm-up
        times: dict[str, list[float]] = {k: [] for k in runs}
        for _ in range(a.repeats):
            for name, fn in runs.items():
                t = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t)
    med = {k: statistics.median(v) for k, v in times.items()}
    result = {"chunks": len(chunks), "tokens": tokens, "batch": BATCH,
              "threads": torch.get_num_threads(), "seconds": times,
              "tokens_per_s": {k: tokens / v for k, v in med.items()},
              "ragkv_over_model_batched": med["model_batched"] / med["ragkv_batched"],
              "default_over_model_batched": med["model_batched"] / med["ragkv_default"]}
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(result, indent=1))
    for k, v in result["tokens_per_s"].items():
        print(f"{k:15s} {v:8.0f} tokens/s")
    print(f"ragkv / model's own batched prefill: {result['ragkv_over_model_batched']:.2f}")
    print(f"ragkv's ingestion at the default / model's own batched prefill: "
          f"{result['default_over_model_batched']:.2f}")


if __name__ == "__main__":
    main()
