"""The engine contract: what every front end asks of an engine, and nothing more.

Three engines meet it: transformers in process (:mod:`ragkv.engine.local`), vLLM in process
and a vLLM server reached by URL (:mod:`ragkv.engine.vllm.backend`). The facade
(:class:`ragkv.api.RagKV`) and every front end above it (CLI, LangChain, LlamaIndex, UI, bench)
talk to this contract only; none asks which engine it has. A new engine is one new module
that meets it and one line in :mod:`ragkv.engine.registry`.

The division of work: the app process assembles token ids and keys (retrieval stays there);
the engine stores chunk KV (precompute), and answers a :class:`GenerationRequest` with a
:class:`Generation`, whose trace is complete when the first token is known.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from ragkv.config import BlendConfig
from ragkv.keys import KeySpace, stored_contexts
from ragkv.prompt import AssembledPrompt, PromptTemplate
from ragkv.trace import ChunkTrace, QueryTrace


class EngineError(RuntimeError):
    """The engine could not answer (a server that is down or died mid-request): one line
    that says what to do, never the cache's fault (a cache problem is a miss)."""


@dataclass
class NextToken:
    """The distribution of one next token, as far as the engine exposes it.

    logits: ``[vocab]`` over the whole vocabulary (in-process engines), else None.
    top: the top-k log-probabilities by token id (every engine).
    """

    top: dict[int, float]
    logits: torch.Tensor | None = None

    @classmethod
    def from_logits(cls, logits: torch.Tensor, k: int = 20) -> NextToken:
        lp = torch.log_softmax(logits.float(), dim=-1)
        vals, idx = lp.topk(min(k, lp.shape[-1]))
        return cls({int(i): float(v) for i, v in zip(idx, vals, strict=True)}, logits)

    @property
    def argmax(self) -> int:
        if self.logits is not None:
            return int(self.logits.argmax())
        return max(self.top, key=self.top.__getitem__)


@dataclass(frozen=True)
class GenerationRequest:
    """One answer to compute: the assembled prompt and how to prefill it.

    keys: the cache key of each chunk, in prompt order (derived from the ids by the facade).
    context: how the chunks' KV was precomputed (``cold``, ``prefix`` or ``anchor``), part of
        each key; with ``anchor`` the first chunk's key names its prefix-context entry.
    record: put the positions computed at each layer into the trace (for inspection).
    keep: keep what :meth:`Generation.score` needs until the generation is closed.
    started: ``time.perf_counter()`` at the request; TTFT runs from here to the first token.
    """

    prompt: AssembledPrompt
    keys: tuple[str, ...]
    mode: str
    blend: BlendConfig
    context: str
    max_new_tokens: int
    started: float
    documents: tuple[str | None, ...] = ()
    record: bool = False
    keep: bool = False
    top_logprobs: int = 20


def request_trace(req: GenerationRequest, engine: str) -> QueryTrace:
    """The trace an engine fills for ``req``: mode, blend settings, one row per chunk."""
    blend = req.mode == "blend"
    trace = QueryTrace(req.mode, req.blend.ratio if blend else None,
                       req.blend.policy if blend else None, len(req.prompt), engine=engine)
    docs = req.documents or (None,) * len(req.keys)
    trace.chunks = [ChunkTrace(k, e - s, None, s, d) for k, (s, e), d
                    in zip(req.keys, req.prompt.chunk_spans, docs, strict=True)]
    return trace


def to_compute(chunks: Sequence[Sequence[int]], keys: Sequence[str],
               present: dict[str, bool]) -> tuple[dict[str, Sequence[int]], list[bool]]:
    """Which chunks a precompute must compute (by key, each once) and, per chunk given,
    whether it is computed now (False: stored already, or a repeat in the same call)."""
    todo: dict[str, Sequence[int]] = {}
    computed = []
    for ids, key in zip(chunks, keys, strict=True):
        computed.append(not present.get(key) and key not in todo)
        if not present.get(key):
            todo.setdefault(key, ids)
    return todo, computed


def to_precompute(keys: KeySpace, chunks: Sequence[Sequence[int]], context: str,
                  stored: Callable[[list[str]], dict[str, bool]]
                  ) -> tuple[list[tuple[str, dict[str, Sequence[int]]]], list[bool]]:
    """What a precompute in ``context`` must compute: per entry context it stores
    (:func:`ragkv.keys.stored_contexts`), the chunks by key; and per chunk given whether any
    of its entries is computed now. ``stored``: which keys the cache holds."""
    per_ctx = [(ctx, [keys.chunk(ids, ctx) for ids in chunks])
               for ctx in stored_contexts(context)]
    present = stored([k for _, ks in per_ctx for k in ks])
    plan, computed = [], [False] * len(chunks)
    for ctx, ks in per_ctx:
        todo, now = to_compute(chunks, ks, present)
        plan.append((ctx, todo))
        computed = [a or b for a, b in zip(computed, now, strict=True)]
    return plan, computed


class Generation(Protocol):
    """An answer whose prefill is done: the first token and the trace are known."""

    trace: QueryTrace
    first_token: int
    first: NextToken

    def rest(self) -> Iterator[int]:
        """Greedy tokens after the first, up to the request's limit, stopping after EOS."""
        ...

    def score(self, target: Sequence[int]) -> list[NextToken]:
        """Teacher forcing on the same prefill: row i predicts ``target[i]`` given the prompt
        and ``target[:i]``. Needs ``keep=True`` on engines that free the prefill early."""
        ...

    def close(self) -> None:
        """Release what the generation holds (KV kept for scoring, a stream)."""
        ...


class Backend(Protocol):
    """An engine as the front ends see it."""

    #: one line for people: which engine, which model, where
    description: str
    tokenizer: Any
    template: PromptTemplate
    #: how this engine names chunk KV (its weights' identity and storage dtype)
    keys: KeySpace
    #: most positions a prompt plus its answer may take
    max_model_len: int
    eos_token_ids: set[int]

    def stored(self, keys: Sequence[str]) -> dict[str, bool]:
        """Which keys the engine's cache holds now (a later load may still miss)."""
        ...

    def precompute(self, chunks: Sequence[Sequence[int]], context: str) -> list[bool]:
        """Store every chunk's KV, precomputed in ``context``; True where it was computed and
        stored now (False: already stored, or its KV could not be stored)."""
        ...

    def generate(self, request: GenerationRequest) -> Generation:
        """Prefill (the TTFT is measured here) and hand back the rest to iterate."""
        ...

    def use_anchor(self, text: str) -> None:
        """Precompute and read ``anchor``-context chunks after ``text`` from now on (the
        cache's recorded corpus anchor); their keys change with it."""
        ...

    def close(self) -> None: ...


@dataclass
class Completed:
    """A :class:`Generation` whose tokens are all known already (engines that answer a whole
    request at once); ``score`` is supplied by the engine."""

    trace: QueryTrace
    first_token: int
    first: NextToken
    tokens: list[int] = field(default_factory=list)  # every token after the first
    scorer: Any = None  # callable(target) -> list[NextToken]

    def rest(self) -> Iterator[int]:
        yield from self.tokens

    def score(self, target: Sequence[int]) -> list[NextToken]:
        if self.scorer is None:
            raise EngineError("this generation was not kept for scoring (keep=True)")
        return self.scorer(target)

    def close(self) -> None:
        self.scorer = None
