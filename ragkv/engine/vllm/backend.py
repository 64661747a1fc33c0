"""vLLM behind the engine contract: in this process, or a server reached by URL.

Chunk KV never crosses into this process: the connector inside vLLM loads, fuses and stores
it. This side builds the requests (token ids, chunk spans and keys, the cache salt), times
them, and turns the connector's note into the same :class:`~ragkv.trace.QueryTrace` the
transformers engine fills. The two deployments differ only in the transport
(:mod:`ragkv.engine.vllm.transport`).

TTFT is the wall time from the request to a one-token answer, measured here (the client, for
a server); vLLM's own figure (scheduling to first token) goes beside it as
``engine_ttft_s``. The rest of the answer is a second request on the same prompt and salt:
where vLLM's prefix cache holds the fused prompt's blocks up to its question, the connector
claims nothing and vLLM prefills only question tokens over them, as the fusion did; where its
last full block ends before the question (a short question in the CPU build's 128-position
blocks), the connector fuses the prompt again. That request is marked so: its chunks' reads
are not counted as uses a second time.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from ragkv.config import RagkvConfig, masked_url
from ragkv.engine.base import (
    EngineError,
    GenerationRequest,
    NextToken,
    request_trace,
    to_precompute,
)
from ragkv.engine.loading import LoadingController
from ragkv.engine.vllm.client import RequestBuilder, VLLMRequest
from ragkv.engine.vllm.transport import HTTP, Completion, InProcess
from ragkv.keys import KeySpace
from ragkv.prompt import PromptTemplate
from ragkv.trace import QueryTrace

log = logging.getLogger("ragkv.vllm")

#: chunks sent to vLLM at once when precomputing (it prefills them in one batch)
PRECOMPUTE_BATCH = 16


@dataclass
class VLLMGeneration:
    """The first token is known; the rest comes from the transport on demand."""

    backend: VLLMBackend
    req: VLLMRequest
    trace: QueryTrace
    first_token: int
    first: NextToken
    max_new_tokens: int
    prompt_ids: list[int]

    def rest(self) -> Iterator[int]:
        if self.max_new_tokens <= 1 or self.first_token in self.backend.eos_token_ids:
            return
        tokens = self.backend.transport.stream(RequestBuilder.again(self.req),
                                               self.max_new_tokens)
        # The answer request prefills the same prompt on the same salt: its first token is
        # the one already known (same KV, same greedy step), so it is not yielded twice.
        for i, tok in enumerate(tokens):
            if i:
                yield tok

    def score(self, target: Sequence[int]) -> list[NextToken]:
        if self.trace.mode not in ("full", "prefix"):
            raise EngineError("teacher-forced scores of a fused prefill are not available "
                              "from vLLM (its prompt log-probabilities bypass the connector)")
        # prompt log-probabilities row j is the distribution of token j given those before it
        rows = self.backend.transport.prompt_logprobs(self.prompt_ids + list(target), 20)
        n = len(self.prompt_ids)
        return [NextToken(r or {}) for r in rows[n:n + len(target)]]

    def close(self) -> None:
        pass


class VLLMBackend:
    """vLLM with ragkv's connector: meets :class:`ragkv.engine.base.Backend`."""

    def __init__(self, transport: InProcess | HTTP, tokenizer: Any, keys: KeySpace,
                 template: PromptTemplate, max_model_len: int, description: str) -> None:
        self.transport, self.tokenizer, self.keys = transport, tokenizer, keys
        self.template, self.max_model_len, self.description = template, max_model_len, description
        self.builder = RequestBuilder(template, keys)
        eos = getattr(tokenizer, "eos_token_id", None)
        self.eos_token_ids = set() if eos is None else {int(eos)}
        self._probe = list(template.prefix_ids[:1]) or [0]
        #: answers ``ratio="auto"`` from the placement and compute times the connector reports
        self.controller = LoadingController()

    # ---- opening -------------------------------------------------------------------------
    @classmethod
    def in_process(cls, cfg: RagkvConfig, **llm_kwargs: Any) -> VLLMBackend:
        """A vLLM ``LLM`` with the connector in this process (``engine="vllm"``)."""
        from transformers import AutoTokenizer

        from ragkv.engine.vllm.engine import load_llm
        from ragkv.engine.vllm.params import vllm_fingerprint
        from ragkv.model_fetch import resolve_model

        path = resolve_model(cfg.model, cfg.home)
        dtype = llm_kwargs.pop("dtype", "float32")
        llm = load_llm(cfg, path, dtype=dtype, **llm_kwargs)
        tok = AutoTokenizer.from_pretrained(path)
        template = PromptTemplate.from_tokenizer(tok, cfg.system_prompt)
        keys = KeySpace(vllm_fingerprint(str(path), dtype), cfg.kv_storage,
                        template.prefix_ids, cfg.precompute_context,
                        template.anchor_ids(cfg.resolved_anchor_text))
        max_len = int(llm.llm_engine.model_config.max_model_len)
        return cls(InProcess(llm, str(path)), tok, keys, template, max_len,
                   f"vLLM in process ({path.name}, {dtype})")

    @classmethod
    def served(cls, cfg: RagkvConfig, url: str) -> VLLMBackend:
        """A vLLM server started with the connector (``engine="http://host:port/v1"``); its
        connector says which key space and cache it uses."""
        from transformers import AutoTokenizer

        from ragkv.engine.vllm.params import tokenizer_digest
        from ragkv.model_fetch import resolve_model

        http = HTTP(url)
        served = Path(http.model)
        path = served if (served / "config.json").is_file() else resolve_model(cfg.model,
                                                                              cfg.home)
        tok = AutoTokenizer.from_pretrained(path)
        template = PromptTemplate.from_tokenizer(tok, cfg.system_prompt)
        probe = list(template.prefix_ids[:1]) or [0]
        note = http.complete([RequestBuilder.describe(probe)], 1)[0].note
        if "fingerprint" not in note:
            raise EngineError(f"the server at {http.url} does not run ragkv's connector "
                              f"(start it with `ragkv serve`); it answered {note or 'nothing'}")
        _check_cache(cfg, note, http.url)
        served_tokenizer, own = note.get("tokenizer"), tokenizer_digest(str(path))
        if served_tokenizer and own and served_tokenizer != own:  # other ids for every prompt
            raise EngineError(f"the server at {http.url} runs {http.model}, whose tokenizer is "
                              f"not the one of {path} that this client would tokenize with; "
                              f"give --model (RagkvConfig.model) the server's model folder")
        keys = KeySpace(note["fingerprint"], note["kv_storage"], template.prefix_ids,
                        cfg.precompute_context, template.anchor_ids(cfg.resolved_anchor_text))
        max_len = int(http.max_model_len or note.get("max_model_len") or 2**31 - 1)
        return cls(http, tok, keys, template, max_len,
                   f"vLLM server at {http.url} ({served.name})")

    def _server_changed(self) -> bool:
        """After a refused or unnoted request: ask the connector again who it is (EngineError
        when the server no longer runs it). A server restarted with other settings (KV
        storage, weights) names other keys; a client that kept the old key space had every
        fused request refused and every precompute dropped until it was restarted. Whether
        the key space changed (then it is the server's now)."""
        note = self.transport.complete([RequestBuilder.describe(self._probe)], 1)[0].note
        if "fingerprint" not in note:  # restarted without it: every answer a silent full prefill
            where = getattr(self.transport, "url", "vLLM in process")
            raise EngineError(f"the server at {where} no longer runs ragkv's connector "
                              f"(restart it with `ragkv serve`); it answered {note or 'nothing'}")
        if (note["fingerprint"], note["kv_storage"]) == (self.keys.fingerprint,
                                                         self.keys.kv_storage):
            return False
        log.warning("the vLLM connector now names KV by other settings (%s, %s KV; were %s, "
                    "%s): keys follow", note["fingerprint"][:16], note["kv_storage"],
                    self.keys.fingerprint[:16], self.keys.kv_storage)
        self.keys = replace(self.keys, fingerprint=note["fingerprint"],
                            kv_storage=note["kv_storage"])
        self.builder = RequestBuilder(self.template, self.keys)
        return True

    def use_anchor(self, text: str) -> None:
        self.keys = replace(self.keys, anchor_ids=self.template.anchor_ids(text))
        self.builder = RequestBuilder(self.template, self.keys)

    # ---- chunk KV ------------------------------------------------------------------------
    def stored(self, keys: Sequence[str]) -> dict[str, bool]:
        if not keys:
            return {}
        note = self.transport.complete([self.builder.contains(keys, self._probe)], 1)[0].note
        held = set(note.get("contains") or [])
        return {k: k in held for k in keys}

    def precompute(self, chunks: Sequence[Sequence[int]], context: str) -> list[bool]:
        done, refused = self._precompute(chunks, context)
        if refused and self._server_changed():
            done, _ = self._precompute(chunks, context)
        return done

    def _precompute(self, chunks: Sequence[Sequence[int]], context: str
                    ) -> tuple[list[bool], bool]:
        """Whether each chunk was computed now, and whether the server refused any save."""
        plan, computed = to_precompute(self.keys, chunks, context, self.stored)
        # one context at a time: prefix-context entries are stored before the anchor entries
        # that are scored against them
        failed: set[tuple[int, ...]] = set()
        for ctx, todo in plan:
            items = list(todo.items())
            for start in range(0, len(items), PRECOMPUTE_BATCH):
                batch = items[start:start + PRECOMPUTE_BATCH]
                done = self.transport.complete([self.builder.precompute(ids, ctx)
                                                for _, ids in batch], 1)
                for (key, ids), comp in zip(batch, done, strict=True):
                    if comp.note.get("save_error") or not comp.note.get("saved"):
                        log.warning("chunk %s not stored by the server: %s", key[:12],
                                    comp.note.get("save_error") or comp.note)
                        failed.add(tuple(ids))
        # a chunk whose entry was not stored was not precomputed (its next query computes it)
        return [now and tuple(ids) not in failed
                for now, ids in zip(computed, chunks, strict=True)], bool(failed)

    # ---- generation ----------------------------------------------------------------------
    def generate(self, req: GenerationRequest) -> VLLMGeneration:
        import time

        prompt, mode = req.prompt, req.mode
        # resolved here, so the request (and its cache salt) names the ratio fused with
        req = replace(req, blend=self.controller.resolve(req.blend))
        vreq = self.builder.prompt(prompt, req.keys, mode, req.blend, req.context, req.record)
        first = self.transport.complete([vreq], 1, req.top_logprobs)[0]
        # a connector notes every fused request: none at all is a server without it
        if (mode in ("reuse", "blend") and (first.note.get("error") or not first.note)
                and self._server_changed()):
            keys = tuple(self.keys.at(prompt.ids[s:e], i, req.context)
                         for i, (s, e) in enumerate(prompt.chunk_spans))
            req = replace(req, keys=keys)  # what the connector names the chunks by now
            vreq = self.builder.prompt(prompt, keys, mode, req.blend, req.context, req.record)
            first = self.transport.complete([vreq], 1, req.top_logprobs)[0]
        ttft = time.perf_counter() - req.started
        if not first.tokens:
            raise EngineError("vLLM returned no token for the prompt")
        trace = self._trace(req, first, ttft)
        note = first.note
        if mode == "blend" and not trace.error and note.get("place_s"):
            self.controller.observe(chunk_tokens=int(note.get("chunk_tokens") or 0),
                                    place_s=note["place_s"], layer_s=note["layer_s"],
                                    computed=trace.recomputed_per_layer)
        return VLLMGeneration(self, vreq, trace, first.tokens[0], NextToken(first.first_top),
                              req.max_new_tokens, list(prompt.ids))

    def _trace(self, req: GenerationRequest, done: Completion, ttft: float) -> QueryTrace:
        prompt, mode, note = req.prompt, req.mode, done.note
        fused = mode in ("reuse", "blend")
        trace = request_trace(req, self.description)
        trace.ttft_s = ttft
        trace.engine_ttft_s = done.engine_ttft_s
        if note.get("error"):
            trace.error = f"{note['error']} ({note.get('fallback', 'recomputed')})"
        per_chunk = note.get("chunks") or []
        if fused and len(per_chunk) == len(trace.chunks):
            for ct, (hit, tier, recomputed) in zip(trace.chunks, per_chunk, strict=True):
                ct.hit, ct.tier, ct.recomputed = bool(hit), tier, int(recomputed)
        for name in ("lookup_s", "load_s", "precompute_s", "fuse_s"):
            setattr(trace, name, float(note.get(name) or 0.0))
        if not fused or trace.error:
            # vLLM prefilled the prompt itself: its own figure where it gives one (a server
            # does), else all of TTFT that the cache steps did not take
            trace.fuse_s = float(done.engine_ttft_s or max(
                ttft - trace.lookup_s - trace.load_s - trace.precompute_s, 0.0))
        T = len(prompt)
        if fused and note.get("recomputed_per_layer") and not trace.error:
            trace.recomputed_per_layer = [int(n) for n in note["recomputed_per_layer"]]
            trace.guard_tokens = int(note.get("guard_tokens") or 0)
        elif fused and trace.error:
            trace.recomputed_per_layer = [T]  # vLLM prefilled everything instead
        else:  # vLLM prefilled all but what its own prefix cache held (a fused prompt asked
            # again: the KV its fusion left there, so no chunk was read)
            trace.recomputed_per_layer = [T - done.cached_tokens]
        if note.get("layer_sets"):
            trace.layer_sets = note["layer_sets"]
        return trace

    def close(self) -> None:
        self.transport.close()


def _check_cache(cfg: RagkvConfig, note: dict[str, Any], url: str) -> None:
    """Warn when the server's cache is not the one this process indexes documents in: the
    dashboard's cache figures would then describe another cache."""
    mine = masked_url(cfg.resolved_index_url)
    theirs = note.get("index")
    if theirs and theirs != mine:
        log.warning("the server at %s keeps its cache index at %s, this process at %s: pass "
                    "the same --home / --index-url to both", url, theirs, mine)

