"""Selection policies: which tokens the blend recomputes, as small strategy objects.

Every policy answers two questions: which positions are computed from layer 0 (``initial``),
and, at each of its check layers, which of the active positions stay active (``select``). The
budget is ``ratio`` times the number of chunk tokens; positions no cache covers (separators,
the question suffix) are always kept and do not count against it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

import torch

from ragkv.config import (
    CONTEXT_PRESELECT_FROM,
    DEFAULT_CHECK_LAYERS,
    FAST_PRESELECT,
    POLICIES,
    BlendConfig,
)
from ragkv.engine.context_score import preselected
from ragkv.engine.kernels import TorchOps


@dataclass
class SelectionContext:
    """What a policy may look at.

    n_tokens: prompt length T. exact_until: positions ``[0, exact_until)`` hold exact KV (a true
    prefix) and are never recomputed. chunk_spans: ``[start, end)`` per chunk. forced: bool
    ``[T]``, positions without cached KV (always computed). scores: span start -> the context
    score ``[span length]`` its entry holds (:mod:`ragkv.engine.context_score`), for the chunks
    that have one. ``select`` receives positions and deviations on the engine's device; what
    the context returns lives on the CPU.
    """

    n_tokens: int
    exact_until: int
    chunk_spans: list[tuple[int, int]]
    forced: torch.Tensor
    ratio: float
    suffix_start: int | None = None
    scores: dict[int, torch.Tensor] = field(default_factory=dict)
    #: ``[T]`` the question's attention to each position, probed over the cached KV before
    #: layer 0 for a question-aware preselection (:func:`ragkv.engine.blend.probe_question`)
    question_weight: torch.Tensor | None = None
    #: the kernel set that runs deviation top-k (the engine's; the reference by default)
    ops: TorchOps = field(default_factory=TorchOps, repr=False)

    def __post_init__(self) -> None:
        if self.suffix_start is None:
            self.suffix_start = self.n_tokens - 1

    @property
    def chunk_tokens(self) -> int:
        return sum(e - s for s, e in self.chunk_spans)

    def budget(self, ratio: float | None = None) -> int:
        return int(round((self.ratio if ratio is None else ratio) * self.chunk_tokens))

    def all_uncached_and_chunks(self) -> torch.Tensor:
        return torch.arange(self.exact_until, self.n_tokens)

    def forced_positions(self) -> torch.Tensor:
        return self.forced.nonzero().flatten()

    def heads(self, per_chunk: int) -> torch.Tensor:
        """The first ``per_chunk`` positions of every chunk (EPIC's per-chunk attention sinks)."""
        idx = [torch.arange(s, min(e, s + per_chunk)) for s, e in self.chunk_spans]
        return torch.cat(idx) if idx else torch.empty(0, dtype=torch.long)


def _keep_top(ctx: SelectionContext, active: torch.Tensor, deviation: torch.Tensor,
              must: torch.Tensor, budget: int) -> torch.Tensor:
    """Bool mask over ``active``: ``must`` positions plus the ``budget`` largest deviations."""
    return ctx.ops.keep_top(deviation, torch.isin(active, must.to(active.device)), budget)


def covering_budget(deviation: torch.Tensor, must: torch.Tensor, coverage: float) -> int:
    """Fewest tokens outside ``must`` (bool ``[n]``) whose deviations ``[n]`` hold
    ``coverage`` of the deviation mass outside ``must``."""
    d = deviation.double().masked_fill(must, 0.0).clamp(min=0.0)
    total = float(d.sum())
    if total <= 0.0:
        return 0
    cum = torch.sort(d, descending=True).values.cumsum(0)
    return int((cum < coverage * total).sum()) + 1


@dataclass
class SelectionPolicy:
    """Base: compute nothing beyond the forced positions (full KV reuse)."""

    name: str = "reuse"
    #: tokens a quality guard added beyond ``ratio``'s budget in this prefill (for the trace;
    #: negative when a per-prompt budget spared some)
    raised: int = 0
    #: whether ``select`` wants deviations weighted by the question's attention to each token;
    #: such a policy's fused KV depends on the question (vLLM's cache salt asks this)
    reads_question = False

    @classmethod
    def from_config(cls, cfg: BlendConfig, n_layers: int) -> SelectionPolicy:
        """The policy fitted to ``cfg`` and a model of ``n_layers`` layers."""
        return cls()

    def probes_question(self, ctx: SelectionContext) -> bool:
        """Whether ``initial`` wants ``ctx.question_weight`` (the blend probes it first)."""
        return False

    @property
    def check_layers(self) -> tuple[int, ...]:
        return ()

    def initial(self, ctx: SelectionContext) -> torch.Tensor:
        return ctx.forced_positions()

    def select(self, layer: int, ctx: SelectionContext, active: torch.Tensor,
               deviation: torch.Tensor) -> torch.Tensor:
        return torch.ones_like(active, dtype=torch.bool)


#: every selection policy class by the name a BlendConfig gives (``ragkv.config.POLICIES``)
REGISTRY: dict[str, type[SelectionPolicy]] = {}


def register(cls: type[SelectionPolicy]) -> type[SelectionPolicy]:
    if cls.name not in POLICIES:  # BlendConfig checks names against that list
        raise ValueError(f"selection policy {cls.name!r} is not listed in ragkv.config.POLICIES")
    REGISTRY[cls.name] = cls
    return cls


@dataclass
class ComputeAll(SelectionPolicy):
    """Everything past the exact prefix is computed (``prefix`` mode; and ratio 1.0)."""

    name: str = "all"

    def initial(self, ctx: SelectionContext) -> torch.Tensor:
        return ctx.all_uncached_and_chunks()


@register
@dataclass
class HKVD(SelectionPolicy):
    """CacheBlend's selection: all tokens up to the check layer, then the tokens whose KV
    deviates most from the cached KV at that layer (paper §4.2; LMCache's default, on V)."""

    name: str = "hkvd"
    layers: tuple[int, ...] = DEFAULT_CHECK_LAYERS
    #: the quality guard: raise the budget until the kept tokens hold this share of the
    #: check layer's deviation mass (None: off), never past ``max_ratio``
    coverage: float | None = None
    max_ratio: float = 0.5
    #: with ``coverage``: the guard may also lower the budget, to this share at least (a
    #: per-prompt budget); None: it only raises
    floor_ratio: float | None = None

    @classmethod
    def from_config(cls, cfg: BlendConfig, n_layers: int) -> SelectionPolicy:
        return cls(layers=cfg.check_layers, coverage=cfg.coverage, max_ratio=cfg.max_ratio,
                   floor_ratio=cfg.floor_ratio, start_factor=cfg.start_factor,
                   preselect=cfg.preselect, preselect_from=cfg.preselect_from,
                   preselect_by=cfg.preselect_by)

    #: with several check layers, the first keeps this multiple of ``ratio``, narrowed
    #: linearly to ``ratio`` at the last (the paper's gradual filtering)
    start_factor: float = 2.0
    #: compute only this multiple of ``ratio`` of the scored chunks' tokens before the first
    #: check layer, the highest context scores (None: every token; ``BlendConfig.preselect``)
    preselect: float | None = None
    #: with ``preselect`` unset: prompts of at least this many tokens preselect
    #: ``FAST_PRESELECT`` times the ratio (None: never; ``BlendConfig.preselect_from``)
    preselect_from: int | None = None
    #: what a preselection ranks by (``BlendConfig.preselect_by``)
    preselect_by: str = "auto"

    @property
    def check_layers(self) -> tuple[int, ...]:
        return self.layers

    def probes_question(self, ctx: SelectionContext) -> bool:
        # a question-aware policy preselects what the question reads, not only what drifts
        by = self.preselect_by
        if by == "auto":
            by = "question" if ctx.n_tokens < CONTEXT_PRESELECT_FROM else "context"
        return (by == "question" and self.reads_question and bool(ctx.scores)
                and self.preselect_factor(ctx) is not None)

    def preselect_factor(self, ctx: SelectionContext) -> float | None:
        """The preselection this prompt gets: ``preselect``, else the default one from
        ``preselect_from`` tokens."""
        if self.preselect is not None:
            return self.preselect
        if self.preselect_from is not None and ctx.n_tokens >= self.preselect_from:
            return FAST_PRESELECT
        return None

    def initial(self, ctx: SelectionContext) -> torch.Tensor:
        factor = self.preselect_factor(ctx)
        if factor is None or not ctx.scores:
            return ctx.all_uncached_and_chunks()
        scored = sum(e - s for s, e in ctx.chunk_spans if s in ctx.scores)
        budget = int(round(min(1.0, factor * ctx.ratio) * scored))
        scores = ctx.scores
        if ctx.question_weight is not None:  # what drifts, times what the question reads
            w = ctx.question_weight.float().cpu()
            scores = {s: sc.float() * w[s:s + sc.numel()] for s, sc in scores.items()}
        picked = preselected(scores, ctx.chunk_spans, budget)
        return torch.unique(torch.cat([ctx.forced_positions(), picked]))

    def final(self, layer: int) -> bool:
        """Whether ``layer`` makes the final selection (where the guard judges it)."""
        return layer not in self.layers[:-1]

    def ratio_at(self, layer: int, ratio: float) -> float:
        """The share of chunk tokens kept at check layer ``layer`` (``ratio`` at the last)."""
        if self.final(layer):
            return ratio
        m, j = len(self.layers), self.layers.index(layer)
        start = min(1.0, self.start_factor * ratio)
        return ratio + (start - ratio) * (m - 1 - j) / max(1, m - 1)

    def guarded(self, ctx: SelectionContext, active: torch.Tensor, deviation: torch.Tensor,
                must: torch.Tensor, budget: int, reserved: int = 0) -> int:
        """``budget``, raised by the guard where the deviation mass asks for more (and, with
        ``floor_ratio``, lowered where it asks for less); ``reserved`` chunk tokens are kept
        besides it (and count against ``max_ratio`` and ``floor_ratio``)."""
        if self.coverage is None:
            return budget
        need = covering_budget(deviation, torch.isin(active, must.to(active.device)),
                               self.coverage)
        cap = max(budget, ctx.budget(self.max_ratio) - reserved)
        floor = budget if self.floor_ratio is None else min(
            budget, max(0, ctx.budget(self.floor_ratio) - reserved))
        kept = min(max(floor, need), cap)
        self.raised = kept - budget
        return kept

    def select(self, layer, ctx, active, deviation):
        must = ctx.forced_positions()
        budget = ctx.budget(self.ratio_at(layer, ctx.ratio))
        if self.final(layer):  # the guard judges the final selection only
            budget = self.guarded(ctx, active, deviation, must, budget)
        return _keep_top(ctx, active, deviation, must, budget)


@register
@dataclass
class GradualFilter(HKVD):
    """The paper's gradual filtering with its four check layers: one check layer given is
    widened to it and the three after it (every deviation policy narrows over the check
    layers it is given)."""

    name: str = "gradual"
    layers: tuple[int, ...] = (1, 2, 3, 4)

    @classmethod
    def from_config(cls, cfg: BlendConfig, n_layers: int) -> SelectionPolicy:
        layers = cfg.check_layers
        c = layers[0]
        return cls(layers=layers if len(layers) > 1 else tuple(range(c, min(c + 4, n_layers))),
                   start_factor=cfg.start_factor, preselect=cfg.preselect,
                   preselect_from=cfg.preselect_from, preselect_by=cfg.preselect_by)


@register
@dataclass
class ChunkHead(SelectionPolicy):
    """EPIC-style: recompute the first ``ceil(ratio * n)`` tokens of every chunk at every layer,
    and nothing is checked, so there is no full-compute layer to pay for."""

    name: str = "chunk_head"

    def initial(self, ctx: SelectionContext) -> torch.Tensor:
        idx = [torch.arange(s, s + math.ceil(ctx.ratio * (e - s))) for s, e in ctx.chunk_spans]
        pos = torch.cat([ctx.forced_positions(), *idx])
        return torch.unique(pos)


@register
@dataclass
class HKVDWithHeads(HKVD):
    """HKVD that always spends part of the budget on every chunk's first tokens."""

    name: str = "hkvd+head"
    head_tokens: int = 4

    @classmethod
    def from_config(cls, cfg: BlendConfig, n_layers: int) -> SelectionPolicy:
        return cls(layers=cfg.check_layers, head_tokens=cfg.head_tokens,
                   coverage=cfg.coverage, max_ratio=cfg.max_ratio, floor_ratio=cfg.floor_ratio,
                   start_factor=cfg.start_factor, preselect=cfg.preselect,
                   preselect_from=cfg.preselect_from, preselect_by=cfg.preselect_by)

    def select(self, layer, ctx, active, deviation):
        heads = ctx.heads(self.head_tokens)
        must = torch.cat([ctx.forced_positions(), heads])
        budget = max(0, ctx.budget(self.ratio_at(layer, ctx.ratio)) - len(heads))
        if self.final(layer):
            budget = self.guarded(ctx, active, deviation, must, budget, len(heads))
        return _keep_top(ctx, active, deviation, must, budget)


@register
@dataclass
class QueryAwareHKVD(HKVD):
    """HKVD whose deviation is weighted by the attention the question suffix pays each token
    at the check layer: a deviating token the question never reads costs nothing."""

    name: str = "qhkvd"
    reads_question = True


def policy_class(name: str) -> type[SelectionPolicy]:
    try:
        return REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown selection policy {name!r}; choose from "
                         f"{', '.join(REGISTRY)}") from None


def reads_question(cfg: BlendConfig) -> bool:
    """Whether the fused KV that ``cfg`` gives depends on the question, not only the chunks."""
    return cfg.ratio != "auto" and cfg.ratio < 1.0 and policy_class(cfg.policy).reads_question


def make_policy(cfg: BlendConfig, n_layers: int) -> SelectionPolicy:
    """The policy a BlendConfig names, fitted to a model of ``n_layers`` layers."""
    cls = policy_class(cfg.policy)
    if cfg.ratio >= 1.0:
        return ComputeAll()
    if cfg.check_layers == DEFAULT_CHECK_LAYERS and 1 < n_layers <= cfg.check_layers[-1]:
        # the default names a layer of a real model; a shallower one checks at its last
        cfg = replace(cfg, check_layers=(n_layers - 1,))
    if cfg.check_layers[-1] >= n_layers:
        raise ValueError(f"check layer {cfg.check_layers[-1]} does not exist (model has "
                         f"{n_layers} layers)")
    return cls.from_config(cfg, n_layers)
