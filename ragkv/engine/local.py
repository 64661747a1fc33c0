"""The transformers engine behind the contract: model, chunk store and fusion in this process.

Chunk KV is loaded from (or computed into) ragkv's store here; a fused prefill runs through
:class:`~ragkv.engine.hf.HFEngine`; decoding continues from the fused KV. TTFT runs from the
request to the first token and includes index lookup, blob loading, computing chunks that
missed, and fusion (docs/design.md §3.7).
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

from ragkv.cache_index import KVStore
from ragkv.config import RagkvConfig
from ragkv.engine.base import GenerationRequest, NextToken, request_trace, to_precompute
from ragkv.engine.blend import FusedPrefill
from ragkv.engine.chunk_store import ChunkStore, KVShape
from ragkv.engine.context_score import context_score, scoring_part
from ragkv.engine.hf import HFEngine
from ragkv.engine.kv import ChunkKV
from ragkv.engine.plan import chunks_to_load, exact_end
from ragkv.engine.precompute import compute_spans
from ragkv.keys import KeySpace, position_context
from ragkv.prompt import PromptTemplate
from ragkv.trace import QueryTrace


@dataclass
class HFGeneration:
    """A prefill done in this process; decoding continues from its fused KV."""

    engine: HFEngine
    trace: QueryTrace
    fused: FusedPrefill | None
    first_token: int
    first: NextToken
    max_new_tokens: int
    _tokens: list[int] = field(default_factory=list)

    def rest(self) -> Iterator[int]:
        fused = self.fused
        if fused is None:
            raise RuntimeError("this generation was closed")
        it = self.engine.decode_iter(fused, self.first_token, self.max_new_tokens)
        next(it)  # the first token, already known
        yield from it

    def score(self, target: Sequence[int]) -> list[NextToken]:
        if self.fused is None:
            raise RuntimeError("this generation was closed; ask with keep=True to score it")
        rows = self.engine.score(self.fused, list(target))
        return [NextToken.from_logits(r) for r in rows]

    def close(self) -> None:
        self.fused = None


class HFBackend:
    """Transformers in process: meets :class:`ragkv.engine.base.Backend`."""

    def __init__(self, engine: HFEngine, cfg: RagkvConfig, store: KVStore) -> None:
        self.engine, self.store = engine, store
        self.tokenizer = engine.tokenizer
        self.template = PromptTemplate.from_tokenizer(engine.tokenizer, cfg.system_prompt)
        self.keys = KeySpace(engine.fingerprint, cfg.kv_storage, self.template.prefix_ids,
                             cfg.precompute_context,
                             self.template.anchor_ids(cfg.resolved_anchor_text))
        r = engine.runner
        self.chunks = ChunkStore(store, engine.fingerprint,
                                 KVShape(r.n_layers, r.kv_heads, r.head_dim), cfg.kv_dtype,
                                 cfg.int8_codec)
        mc = engine.model.config
        # a prompt past the fusion's window (a sliding window, LongRoPE's original length)
        # cannot be fused exactly: that window is where prompts are cut
        self.max_model_len = min(int(getattr(mc, "max_position_embeddings", 0) or 2**31 - 1),
                                 r.window[0] if r.window else 2**31 - 1)
        self.eos_token_ids = engine.eos_token_ids
        name = Path(getattr(mc, "_name_or_path", "") or "model").name or "model"
        self.description = f"transformers in process ({name}, {r.device}, {r.dtype})"
        self._pasts: dict[str, ChunkKV] = {}  # exact spans chunks are prefilled after

    @classmethod
    def load(cls, cfg: RagkvConfig, store: KVStore) -> HFBackend:
        from ragkv.model_fetch import resolve_model

        path = resolve_model(cfg.model, cfg.home)
        return cls(HFEngine.load(path, cfg.device, cfg.dtype, cfg.kernels), cfg, store)

    def use_anchor(self, text: str) -> None:
        self.keys = replace(self.keys, anchor_ids=self.template.anchor_ids(text))
        self._pasts.pop("anchor", None)

    # ---- chunk KV ------------------------------------------------------------------------
    def stored(self, keys: Sequence[str]) -> dict[str, bool]:
        return self.chunks.stored(list(keys))

    def prefix_kv(self) -> ChunkKV:
        """KV of the template prefix: a true prefix, so its cached KV is exact."""
        past = self.past("prefix")
        assert past is not None
        return past

    def past(self, context: str) -> ChunkKV | None:
        """What a chunk is prefilled after in ``context`` (``keys.before``): nothing, the
        template prefix, or the prefix and the anchor passage; a true prompt prefix, so it is
        stored under its exact key and read back exact."""
        if context == "cold":
            return None
        if context not in self._pasts:
            ids = list(self.keys.before(context))
            kv, _ = self.chunks.get_or_compute(self.keys.exact(ids), len(ids),
                                               lambda: self.engine.precompute(ids), ids=ids)
            r = self.engine.runner
            self._pasts[context] = kv.to(r.device, r.dtype)
        return self._pasts[context]

    def chunk_kv(self, ids: Sequence[int], key: str, context: str,
                 indexed: bool = True) -> tuple[ChunkKV, str | None]:
        """The chunk's KV and the tier that served it (None: computed now, stored back);
        ``context``: the entry's own (``keys.position_context``). A memory-tier hit is the
        tier's own tensors, not a copy: the fusion only reads them (copying them cost a
        2k-token blend about 13 ms in fp32)."""
        return self.chunks.get_or_compute(
            key, len(ids), lambda: self.engine.precompute(list(ids), self.past(context)),
            indexed=indexed, shared=True, reference=self.keys.twin(ids, context), ids=ids,
            compute_reference=lambda: self.engine.precompute(list(ids), self.past("prefix")))

    def precompute(self, chunks: Sequence[Sequence[int]], context: str) -> list[bool]:
        """Missing chunks are prefilled several per forward pass (``engine/precompute.py``);
        prefix-context entries first, so anchor entries are stored with their context score."""
        # the index alone: KV this process still holds in memory after its document was
        # removed has no row, and a precompute must leave one every process finds; a row
        # whose blob was deleted behind the cache's back is computed again
        plan, computed = to_precompute(
            self.keys, chunks, context,
            lambda keys: self.chunks.stored(keys, memory=False, blobs=True))
        # the scored layers of prefix entries computed now, for anchor entries computed now
        scored = {tuple(ids) for ctx, todo in plan if ctx == "anchor" for ids in todo.values()}
        twins: dict[tuple[int, ...], ChunkKV] = {}
        failed: set[tuple[int, ...]] = set()
        for ctx, todo in plan:
            if todo:
                kvs = compute_spans(self.engine.runner, list(todo.values()), self.past(ctx))
                for (key, ids), kv in zip(todo.items(), kvs, strict=True):
                    twin = twins.get(tuple(ids)) if ctx == "anchor" else None
                    if twin is not None:  # spares reading back the entry just stored
                        kv = kv.with_score(context_score(twin, kv))
                    if not self.chunks.save(key, kv, self.keys.twin(ids, ctx), ids=ids):
                        failed.add(tuple(ids))
                    if ctx == "prefix" and tuple(ids) in scored:
                        twins[tuple(ids)] = scoring_part(kv)
        # a chunk whose entry was not stored was not precomputed (its next query computes it)
        return [now and tuple(ids) not in failed
                for now, ids in zip(computed, chunks, strict=True)]

    # ---- generation ----------------------------------------------------------------------
    def generate(self, req: GenerationRequest) -> HFGeneration:
        prompt, mode = req.prompt, req.mode
        blend = self.engine.controller.resolve(req.blend)
        trace = request_trace(replace(req, blend=blend), self.description)
        cached: list[tuple[int, ChunkKV]] = []
        exact = 0
        wanted = chunks_to_load(mode, req.context, len(req.keys))
        if mode != "full":
            t = time.perf_counter()
            present = self.stored(req.keys)
            trace.lookup_s = time.perf_counter() - t
            cached.append((0, self.prefix_kv()))
            got: dict[str, tuple[ChunkKV, str | None]] = {}  # a chunk retrieved twice: once
            with self.chunks.store.batched_hits() as hits:  # in one index transaction
                for i in wanted:
                    ct, (s, e) = trace.chunks[i], prompt.chunk_spans[i]
                    t = time.perf_counter()
                    if ct.key not in got:
                        got[ct.key] = self.chunk_kv(prompt.ids[s:e], ct.key,
                                                    position_context(req.context, i),
                                                    present.get(ct.key, False))
                    kv, ct.tier = got[ct.key]
                    dt = time.perf_counter() - t
                    ct.hit = ct.tier is not None
                    if ct.hit:
                        trace.load_s += dt
                    else:
                        trace.precompute_s += dt
                    cached.append((s, kv))
            trace.load_s += hits.seconds
            exact = exact_end(prompt.prefix_len, prompt.chunk_spans, req.context, wanted)
        t = time.perf_counter()
        fused = self.engine.prefill(prompt, cached, mode, blend, exact, record=req.record)
        first = int(fused.logits.argmax())
        trace.fuse_s = time.perf_counter() - t
        trace.ttft_s = time.perf_counter() - req.started
        trace.recomputed_per_layer = fused.recomputed_per_layer
        trace.guard_tokens = fused.guard_tokens
        final = set(fused.final_positions.tolist())
        for ct, (s, e) in zip(trace.chunks, prompt.chunk_spans, strict=True):
            ct.recomputed = sum(1 for p in range(s, e) if p in final)
        if req.record:
            trace.layer_sets = [ls.tolist() for ls in fused.layer_sets]
        return HFGeneration(self.engine, trace, fused, first,
                            NextToken.from_logits(fused.logits, req.top_logprobs),
                            req.max_new_tokens)

    def close(self) -> None:
        self._pasts.clear()
        self.engine.workspaces.clear()
