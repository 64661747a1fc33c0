"""The benchmark: TTFT and fidelity of every mode against full prefill, measured in one run.

Per case, chunks are ingested (precomputed and stored) before anything is timed; ``full`` runs
once per case and is the reference for every other mode, policy, ratio and precompute context
on that case. Ratios are per case (full TTFT / mode TTFT), summarised by their median.

Every timed run reads the case's chunks from the same tier: an untimed read before the case
puts them in the engine's memory tier. Without it the first run after ``full`` alone paid the
read from blob storage (~125 ms a 2k-token pydoc case at one thread), which biased comparisons
of methods within one run; what storage reads cost is measured by ``benchmarks/loading_bench.py``.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ragkv import metrics
from ragkv.api import Answer, RagKV
from ragkv.bench_report import anchor_meta, run_meta, summarize
from ragkv.chunking import tokenize_chunk
from ragkv.config import (
    DEFAULT_CHECK_LAYERS,
    DEFAULT_RATIO,
    MODES,
    PRECOMPUTE_CONTEXTS,
    BlendConfig,
)
from ragkv.engine.base import EngineError, NextToken
from ragkv.prompt import require_str

Progress = Callable[[str, int, int], None]


@dataclass
class BenchSpec:
    modes: list[str] = field(default_factory=lambda: ["full", "prefix", "reuse", "blend"])
    ratios: list[float] = field(default_factory=lambda: [0.05, DEFAULT_RATIO, 0.3])
    policies: list[str] = field(default_factory=lambda: ["qhkvd"])
    contexts: list[str] = field(default_factory=lambda: ["anchor"])
    check_layers: tuple[int, ...] = DEFAULT_CHECK_LAYERS
    #: with several check layers, the share the first keeps (times the ratio)
    start_factor: float = BlendConfig.start_factor
    #: the preselection by stored context scores (times the ratio; None: off)
    preselect: float | None = None
    #: prompts of at least this many tokens preselect anyway (None: never)
    preselect_from: int | None = BlendConfig.preselect_from
    #: what the preselection ranks by (``BlendConfig.preselect_by``)
    preselect_by: str = BlendConfig.preselect_by
    deviation_on: str = "k"
    corrections: list[str] = field(default_factory=lambda: [BlendConfig.correction])
    correction_strength: float = BlendConfig.correction_strength
    coverage: float | None = None
    floor_ratio: float | None = None
    max_new_tokens: int = 32
    limit: int | None = None

    def __post_init__(self) -> None:
        """Every setting checked before anything is precomputed: a typo in the last mode of
        a grid is an error now, not after the corpus's KV."""
        for name in ("modes", "ratios", "policies", "contexts", "corrections"):
            values = getattr(self, name)
            twice = next((v for i, v in enumerate(values) if v in values[:i]), None)
            if twice is not None:  # each variant would run (and count) twice per case
                raise ValueError(f"{name} name {twice!r} twice")
        for mode in self.modes:
            if mode not in MODES:
                raise ValueError(f"unknown mode {mode!r}; choose from {', '.join(MODES)}")
        for context in self.contexts:
            if context not in PRECOMPUTE_CONTEXTS:
                raise ValueError(f"unknown context {context!r}; choose from "
                                 f"{', '.join(PRECOMPUTE_CONTEXTS)}")
        for policy in self.policies:
            for ratio in self.ratios:
                for correction in self.corrections:
                    self.blend(ratio, policy, correction)
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be at least 1, got {self.max_new_tokens}")
        if self.limit is not None and self.limit < 1:
            raise ValueError(f"limit must be at least 1 (or none for every case), got "
                             f"{self.limit}")

    def blend(self, ratio: float, policy: str, correction: str) -> BlendConfig:
        """One variant's blend: its ratio, policy and correction, and the spec's other
        settings (checked as any BlendConfig is)."""
        return BlendConfig(ratio=ratio, policy=policy, check_layers=self.check_layers,
                           start_factor=self.start_factor, preselect=self.preselect,
                           preselect_from=self.preselect_from,
                           preselect_by=self.preselect_by,  # type: ignore[arg-type]
                           deviation_on=self.deviation_on,  # type: ignore[arg-type]
                           correction=correction, correction_strength=self.correction_strength,
                           coverage=self.coverage, floor_ratio=self.floor_ratio)


def load_cases(path: Path) -> list[dict]:
    """Read a JSONL case file; each line needs ``id``, ``chunks`` (list of str), ``question``."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise ValueError(f"{path}: not UTF-8 text; a case file is JSON lines") from None
    except OSError as exc:
        raise ValueError(f"cannot read the case file {path}: {exc.strerror or exc}") from None
    cases: list[dict] = []
    lines: dict[str, int] = {}  # id -> its line
    # JSON lines end at "\n" alone: a raw U+2028 or U+0085 inside a string is JSON text
    for n, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        try:
            case = json.loads(line)
        except (RecursionError, ValueError) as exc:  # (a JSONDecodeError is a ValueError)
            raise ValueError(f"{path}:{n}: not JSON ({exc})") from None
        if not isinstance(case, dict):
            raise ValueError(f"{path}:{n}: each line must be a JSON object with 'chunks' and "
                             f"'question', got {type(case).__name__}")
        if not isinstance(case.get("chunks"), list) or not case["chunks"] or not all(
                isinstance(c, str) and c.strip() for c in case["chunks"]):
            raise ValueError(f"{path}:{n}: 'chunks' must be a non-empty list of strings")
        if not isinstance(case.get("question"), str) or not case["question"].strip():
            raise ValueError(f"{path}:{n}: 'question' must be a non-empty string")
        if case.get("answer") is not None and not (isinstance(case["answer"], str)
                                                   and case["answer"].strip()):
            # (a blank one would be "contained" in every answer)
            raise ValueError(f"{path}:{n}: 'answer' must be a non-empty string when given")
        try:  # what no tokenizer reads (a lone surrogate, as a JSON escape can leave)
            for i, chunk in enumerate(case["chunks"]):
                require_str(chunk, f"chunk {i}")
        except ValueError as exc:
            raise ValueError(f"{path}:{n}: {exc}") from None
        case.setdefault("id", f"case-{n}")
        if not isinstance(case["id"], str) or not case["id"].strip():
            raise ValueError(f"{path}:{n}: 'id' must be a non-empty string when given")
        if case["id"] in lines:  # its records could not be told from the other's
            raise ValueError(f"{path}:{n}: id {case['id']!r} is line {lines[case['id']]}'s too; "
                             f"ids are unique")
        lines[case["id"]] = n
        cases.append(case)
    if not cases:
        raise ValueError(f"{path}: no cases")
    return cases


def variants(spec: BenchSpec) -> list[tuple[str, str | None, float | None, str]]:
    """(mode, policy, ratio, correction) of every prefill run against full on each case."""
    out: list[tuple[str, str | None, float | None, str]] = []
    for mode in spec.modes:
        if mode == "blend":
            out += [("blend", p, r, c) for p in spec.policies for r in spec.ratios
                    for c in spec.corrections]
        elif mode != "full":
            out.append((mode, None, None, "none"))
    return out


def warm_config(spec: BenchSpec) -> BlendConfig:
    """The untimed read's blend: a ratio no timed run uses, so it shares no fused prefix cache
    entry (vLLM's cache salt digests the blend settings) with any of them."""
    ratio = next(r / 1000 for r in range(1001) if r / 1000 not in spec.ratios)
    return BlendConfig(ratio=ratio, policy="hkvd", check_layers=spec.check_layers,
                       correction="none")


def read_into_memory(rag: RagKV, chunks: list[list[int]], question: str,
                     blend: BlendConfig) -> None:
    """One untimed read of ``chunks`` (a one-token blend with ``blend``, from
    :func:`warm_config`) that leaves them in ``rag``'s memory tier."""
    rag.generate(chunks, question, mode="blend", blend=blend, max_new_tokens=1, log_query=False)


def _scores(answer: Answer, target: list[int]) -> list[NextToken] | None:
    """Teacher-forced rows of ``answer``'s prefill, or None where the engine has none."""
    try:
        return answer.score(target)
    except EngineError:
        return None


def _record(case: dict, ctx: str, answer: Answer, full: Answer,
            full_scores: list[NextToken] | None, correction: str = "none") -> dict:
    scores = _scores(answer, full.tokens) if full_scores is not None else None
    tr = answer.trace
    tf = (metrics.teacher_forced(full_scores, scores, full.tokens)
          if full_scores is not None and scores is not None
          else {"tf_agree": None, "tf_kl": None})
    return {
        "case": case["id"], "context": ctx, "mode": tr.mode, "policy": tr.policy,
        "ratio": tr.ratio, "correction": correction, "ttft_s": tr.ttft_s,
        "full_ttft_s": full.trace.ttft_s,
        "speedup": full.trace.ttft_s / tr.ttft_s, "engine_ttft_s": tr.engine_ttft_s,
        "context_tokens": tr.context_tokens, "recomputed_tokens": tr.recomputed_tokens,
        "recomputed_per_layer": list(tr.recomputed_per_layer),
        "guard_tokens": tr.guard_tokens, "hits": tr.hits, "misses": tr.misses,
        "load_s": tr.load_s, "lookup_s": tr.lookup_s, "fuse_s": tr.fuse_s,
        "tiers": tr.tiers,
        "storage_share": (tr.lookup_s + tr.load_s) / tr.ttft_s, "error": tr.error,
        **metrics.first_token(full.first, answer.first), **tf,
        "rouge_l": metrics.rouge_l(full.tokens, answer.tokens),
        "contains": metrics.contains(answer.text, case.get("answer")),
        "answer": answer.text,
    }


def _require_fits(rag: RagKV, case: dict, ids: list[list[int]], max_new_tokens: int) -> None:
    """A case whose prompt the window cannot hold is refused before any work: generate would
    leave chunks out, and every figure would be of a shorter prompt than the case's."""
    tpl, window = rag.template, rag.backend.max_model_len - max_new_tokens
    need = (len(tpl.prefix_ids) + sum(map(len, ids)) + len(tpl.sep_ids) * (len(ids) - 1)
            + len(tpl.suffix_ids(case["question"])))
    if need > window:
        raise ValueError(f"case {case['id']!r}: its prompt takes {need:,} tokens, more than the "
                         f"model's window leaves after the answer budget ({window:,}); drop "
                         f"chunks from it or lower --max-new-tokens")


def run_bench(rag: RagKV, cases: list[dict], spec: BenchSpec,
              progress: Progress | None = None) -> dict:
    """Every variant of ``spec`` against full prefill on each case, on ``rag``'s engine."""
    rags = {ctx: rag.with_config(precompute_context=ctx,
                                 blend=BlendConfig(check_layers=spec.check_layers,
                                                   start_factor=spec.start_factor,
                                                   deviation_on=spec.deviation_on))
            for ctx in spec.contexts}
    cases = cases[: spec.limit] if spec.limit is not None else cases
    corpus_anchor = None  # from every case's chunks, as ingestion would see them; a passage
    if "anchor" in rags:  # the cache recorded for another corpus is not this corpus's
        corpus_anchor = rags["anchor"].choose_anchor(
            [c for case in cases for c in case["chunks"]], record=False)
    tok = rag.tokenizer
    chunk_ids = [[tokenize_chunk(c, tok) for c in case["chunks"]] for case in cases]
    for case, ids in zip(cases, chunk_ids, strict=True):
        empty = next((j for j, c in enumerate(ids) if not c), None)
        if empty is not None:  # (the engine's error named neither the case nor the file)
            raise ValueError(f"case {case['id']!r}: chunk {empty} has no tokens (only "
                             f"characters the tokenizer drops)")
        _require_fits(rag, case, ids, spec.max_new_tokens)
    first = next(iter(rags.values()))
    # warm-up on a prompt of its own: first calls pay one-off costs, and a case's prompt
    # would leave its full prefill in a prefix cache; before the corpus's precompute, so a
    # setting the model cannot run (a check layer it lacks) is refused before that work
    warm = [tokenize_chunk("A warm-up chunk that no case shares.", tok)]
    first.precompute_many(warm)
    for mode in ("full", "reuse", "blend"):
        first.generate(warm, "Warm up?", mode=mode, max_new_tokens=2, log_query=False)
    total = sum(map(len, chunk_ids)) * len(rags)
    done = 0
    for r in rags.values():  # ingestion: not timed
        for ids in chunk_ids:
            r.precompute_many(ids)
            done += len(ids)
            if progress:
                progress("precompute", done, total)
    records = []
    todo = variants(spec)
    warm_blend = warm_config(spec)
    for i, (case, ids) in enumerate(zip(cases, chunk_ids, strict=True)):
        q = case["question"]
        for r in rags.values():  # see the docstring
            read_into_memory(r, ids, q, warm_blend)
        full = first.generate(ids, q, mode="full", keep_kv=True, log_query=False,
                              max_new_tokens=spec.max_new_tokens)
        full_scores = _scores(full, full.tokens)
        records.append(_record(case, "-", full, full, full_scores))
        # the variants' order rotates from case to case, so whatever running right after
        # full prefill does to a run's time falls on every variant alike
        turn = i % len(todo) if todo else 0
        for ctx, r in rags.items():
            for mode, policy, ratio, correction in todo[turn:] + todo[:turn]:
                blend = spec.blend(ratio or 0.0, policy or "hkvd", correction)
                ans = r.generate(ids, q, mode=mode, blend=blend, keep_kv=True,
                                 log_query=False, max_new_tokens=spec.max_new_tokens)
                records.append(_record(case, ctx, ans, full, full_scores, correction))
                if ans.generation is not None:
                    ans.generation.close()
        if full.generation is not None:
            full.generation.close()
        if progress:
            progress("cases", i + 1, len(cases))
    meta = {**run_meta(rag, asdict(spec), len(cases)), "anchor": anchor_meta(rag, corpus_anchor)}
    return {"meta": meta, "summary": summarize(records),
            "cases": records}


#: answer tokens of the long-context probe
LONG_CONTEXT_ANSWER = 8


def long_context(rag: RagKV, target_tokens: int,
                 max_new_tokens: int = LONG_CONTEXT_ANSWER) -> dict:
    """TTFT full vs blend (default config) on one prompt of ``target_tokens`` tokens."""
    from ragkv.chunking import chunk_text
    from ragkv.ingest import pydoc_topics

    q = "Summarize what these passages say about exceptions."
    tpl = rag.template
    room = rag.backend.max_model_len - max_new_tokens
    if target_tokens > room:  # the prompt would be cut to the window, under this figure
        raise ValueError(f"--long-context {target_tokens:,} is more than the model's window "
                         f"leaves after the answer's {max_new_tokens} tokens ({room:,})")
    # the prompt is the template, the chunks with a separator between each two, the question:
    # chunks are taken until it holds ``target_tokens``, the last cut to what is left
    left = target_tokens - len(tpl.prefix_ids) - len(tpl.suffix_ids(q))
    chunks: list[list[int]] = []
    texts = (c for _, text in pydoc_topics()
             for c in chunk_text(text, rag.tokenizer, rag.config.chunk_tokens))
    for c in texts:
        sep = len(tpl.sep_ids) if chunks else 0
        if left - sep <= 0:
            break
        chunks.append(list(c.token_ids[:left - sep]))
        left -= sep + len(chunks[-1])
    rag.precompute_many(chunks)
    full = rag.generate(chunks, q, mode="full", keep_kv=True, log_query=False,
                        max_new_tokens=max_new_tokens)
    blend = rag.generate(chunks, q, mode="blend", keep_kv=True, log_query=False,
                         max_new_tokens=max_new_tokens)
    return {"context_tokens": full.trace.context_tokens, "chunks": len(full.trace.chunks),
            "full_ttft_s": full.trace.ttft_s, "blend_ttft_s": blend.trace.ttft_s,
            "speedup": full.trace.ttft_s / blend.trace.ttft_s,
            **metrics.first_token(full.first, blend.first)}
