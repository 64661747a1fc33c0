"""Write long RAG cases (~7.4k chunk tokens each) from a public case set, for `ragkv bench`;
or short ones (two chunks), to measure defaults on short prompts.

    python benchmarks/long_cases.py [--cases benchmarks/cases/pydoc.jsonl] [--count 6] \\
        [--tokens 7400] [--out benchmarks/cases/pydoc_long.jsonl]
    ragkv bench --cases benchmarks/cases/pydoc_long.jsonl --modes full,blend --ratios 0.12,0.1
    python benchmarks/long_cases.py --short [--cut 250] --cases benchmarks/cases/prose.jsonl \\
        --out benchmarks/cases/prose_short.jsonl

Case i keeps the question, expected answer and chunks of source case i, and adds chunks of the
other cases (in an order shuffled with seed i, each chunk once) until the chunks hold about
``--tokens`` tokens of the default model's tokenizer; then all of them are shuffled with the
same seed, so the chunks that answer sit anywhere in the prompt. With ``--short``, every case
keeps two of its chunks instead: the one that holds its answer (the first where the set names
none) and its shortest other chunk; ``--cut N`` then cuts each to its first N tokens, back to
the last sentence end in the second half. Deterministic: the same source gives the same file.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

from bench_args import out_file

from ragkv.bench import load_cases
from ragkv.config import default_home
from ragkv.model_fetch import ensure_default_model


def long_cases(cases: list[dict], count: int, tokens: int, length) -> list[dict]:
    """``count`` cases of about ``tokens`` chunk tokens (``length(text)`` counts a chunk's)."""
    pool = list(dict.fromkeys(c for case in cases for c in case["chunks"]))  # cases share some
    out = []
    for i, case in enumerate(cases[:count]):
        rng = random.Random(i)
        chunks = list(dict.fromkeys(case["chunks"]))
        used = sum(length(c) for c in chunks)
        others = [c for c in pool if c not in chunks]
        rng.shuffle(others)
        for c in others:
            n = length(c)
            if used + n > tokens:
                continue
            chunks.append(c)
            used += n
        rng.shuffle(chunks)
        out.append({**case, "id": f"{case['id']}-long", "chunks": chunks,
                    "chunk_tokens": used})
    return out


def short_cases(cases: list[dict], length, cut=None) -> list[dict]:
    """Two-chunk cases (see the module's docstring); ``cut(text)``: a chunk's shortened text."""
    out = []
    for case in cases:
        chunks = list(dict.fromkeys(case["chunks"]))
        answer = case.get("answer")
        first = next((c for c in chunks if answer and answer in c), chunks[0])
        pick = [first, min((c for c in chunks if c != first), key=length)]
        if cut is not None:
            pick = [cut(c) for c in pick]
        out.append({**case, "id": f"{case['id']}-short", "chunks": pick,
                    "chunk_tokens": sum(length(c) for c in pick)})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", type=Path, default=Path("benchmarks/cases/pydoc.jsonl"))
    ap.add_argument("--count", type=int, default=6)
    ap.add_argument("--tokens", type=int, default=7400)
    ap.add_argument("--out", type=out_file, default=Path("benchmarks/cases/pydoc_long.jsonl"))
    ap.add_argument("--short", action="store_true",
                    help="two chunks per case (every case of the set) instead of long cases")
    ap.add_argument("--cut", type=int, default=None,
                    help="with --short: each chunk cut to about this many tokens")
    args = ap.parse_args()
    if args.count < 1 or args.tokens < 1 or (args.cut is not None and args.cut < 1):
        ap.error("--count, --tokens and --cut must be at least 1")
    if args.cut is not None and not args.short:
        ap.error("--cut goes with --short")
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(ensure_default_model(default_home()))

    def length(text: str) -> int:
        return len(tok(text, add_special_tokens=False).input_ids)

    def cut(text: str) -> str:
        head = tok.decode(tok(text, add_special_tokens=False).input_ids[:args.cut])
        end = max(head.rfind(". "), head.rfind(".\n"))
        return head[:end + 1] if end > len(head) // 2 else head

    if args.short:
        cases = short_cases(load_cases(args.cases), length,
                            cut if args.cut is not None else None)
    else:
        cases = long_cases(load_cases(args.cases), args.count, args.tokens, length)
    args.out.write_text("".join(json.dumps(c) + "\n" for c in cases))
    print(f"wrote {len(cases)} cases to {args.out} "
          f"({min(c['chunk_tokens'] for c in cases)}-{max(c['chunk_tokens'] for c in cases)} "
          "chunk tokens)")


if __name__ == "__main__":
    main()
