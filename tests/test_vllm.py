"""ragkv's KV connector inside a real vLLM V1 engine (``make test-vllm``).

One engine (SmolLM2, fp32, eager, prefix caching on) serves every test; prompts stay short
because vLLM's CPU build is slow here. vLLM is imported only inside the fixture, so the fast
suite never imports it.
"""

from __future__ import annotations

import pytest
from vllm_cases import CHUNKS, QUESTION

from ragkv.config import BlendConfig, RagkvConfig

pytestmark = pytest.mark.vllm


@pytest.fixture(scope="module")
def vllm_rag(tmp_path_factory):
    """The facade on an in-process vLLM engine with ragkv's connector."""
    pytest.importorskip("vllm")
    from ragkv.api import RagKV
    from ragkv.engine.vllm.backend import VLLMBackend

    # prefix context: one entry per chunk, as these tests' counts expect; the default anchor
    # context has its own test at the end (the same engine: requests name their context)
    cfg = RagkvConfig(home=tmp_path_factory.mktemp("ragkv-vllm"), kv_dtype="float32",
                      engine="vllm", precompute_context="prefix")
    backend = VLLMBackend.in_process(cfg, max_model_len=1024, kv_cache_bytes=256 * 2**20)
    rag = RagKV(cfg, backend=backend)
    yield rag
    rag.close()


@pytest.fixture(scope="module")
def served(vllm_rag):
    rag = vllm_rag
    chunks = [rag.tokenizer(c, add_special_tokens=False).input_ids for c in CHUNKS]
    yield rag.backend.transport.llm, rag.backend.builder, chunks, rag.config


def run(llm, req, max_tokens: int = 12):
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    prompt = TokensPrompt(prompt_token_ids=req.ids)
    if req.cache_salt:
        prompt["cache_salt"] = req.cache_salt
    extra = {"kv_transfer_params": req.kv_transfer_params} if req.kv_transfer_params else None
    out = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=max_tokens,
                                                extra_args=extra), use_tqdm=False)[0]
    return list(out.outputs[0].token_ids), (out.kv_transfer_params or {}).get("ragkv", {})


def stored(cfg, key: str) -> bool:  # read straight from the shared store
    from ragkv.cache_index import KVStore

    return KVStore.from_config(cfg).contains([key]).get(key, False)


def test_precompute_through_vllm_then_reuse_of_one_chunk_first_equals_full(served):
    llm, builder, chunks, cfg = served
    pre = builder.precompute(chunks[0])
    run(llm, pre, max_tokens=1)
    assert stored(cfg, pre.kv_transfer_params["ragkv"]["save"][0][2])
    full, _ = run(llm, builder.fused(chunks[:1], QUESTION, mode="full"))
    reuse, trace = run(llm, builder.fused(chunks[:1], QUESTION, mode="reuse"))
    assert "error" not in trace
    assert trace["misses"] <= 1 and trace["hits"] >= 1  # the chunk came from the store
    assert reuse == full


def test_blend_at_ratio_one_equals_full(served):
    llm, builder, chunks, _ = served
    full, _ = run(llm, builder.fused(chunks[:2], QUESTION, mode="full"))
    req = builder.fused(chunks[:2], QUESTION, mode="blend", blend=BlendConfig(ratio=1.0))
    blend, trace = run(llm, req)
    assert "error" not in trace and trace["recomputed"] > 0
    assert trace["attention"] == "vllm"  # the fused layers ran on vLLM's own kernel
    assert blend == full


def test_blend_at_015_runs_and_is_traced(served):
    llm, builder, chunks, _ = served
    req = builder.fused([chunks[1], chunks[0]], QUESTION, mode="blend",
                        blend=BlendConfig(ratio=0.15))
    tokens, trace = run(llm, req, max_tokens=1)  # finishes in the step that fuses it
    assert tokens and "error" not in trace
    n_chunk = len(chunks[0]) + len(chunks[1])
    assert 0 < trace["recomputed"] <= 0.5 * n_chunk


def test_mixed_hit_and_miss_computes_and_stores_the_miss(served):
    llm, builder, chunks, cfg = served
    run(llm, builder.precompute(chunks[0]), max_tokens=1)
    key_new = builder.keys.chunk(chunks[2])
    assert not stored(cfg, key_new)
    req = builder.fused([chunks[0], chunks[2]], QUESTION, mode="blend",
                        blend=BlendConfig(ratio=1.0))
    tokens, trace = run(llm, req)
    full, _ = run(llm, builder.fused([chunks[0], chunks[2]], QUESTION, mode="full"))
    assert trace["misses"] == 1 and trace["hits"] >= 1
    assert stored(cfg, key_new)
    assert tokens == full
    _, again = run(llm, builder.fused([chunks[2], chunks[0]], QUESTION, mode="reuse"))
    assert again["misses"] == 0


@pytest.mark.parametrize("damage", ["not-a-key", "span", "salt", "mode"])
def test_malformed_params_fall_back_to_full_prefill_with_an_error(served, damage):
    llm, builder, chunks, _ = served
    full, _ = run(llm, builder.fused(chunks[:2], QUESTION, mode="full"))
    req = builder.fused(chunks[:2], QUESTION, mode="reuse")
    body = req.kv_transfer_params["ragkv"]
    if damage == "not-a-key":
        body["chunks"][0][2] = "not-a-key"
    elif damage == "span":
        body["chunks"][1][1] = len(req.ids) + 5
    elif damage == "salt":
        req.cache_salt = None
    else:
        body["mode"] = "telepathy"
    tokens, trace = run(llm, req)
    assert trace["fallback"] == "full prefill" and trace["error"]
    assert tokens == full


def test_a_key_that_names_other_tokens_is_recomputed_not_trusted(served):
    llm, builder, chunks, _ = served
    full, _ = run(llm, builder.fused(chunks[:2], QUESTION, mode="full"))
    req = builder.fused(chunks[:2], QUESTION, mode="reuse")
    body = req.kv_transfer_params["ragkv"]
    body["chunks"][1][2] = builder.keys.chunk(chunks[2])  # a real key, of another chunk
    from ragkv.engine.vllm.params import fusion_salt, parse

    req.cache_salt = fusion_salt(parse(req.kv_transfer_params, len(req.ids)), req.ids)
    tokens, trace = run(llm, req)
    assert "does not name" in trace["error"] and trace["fallback"] == "recompute"
    assert tokens == full


# ---- the facade on in-process vLLM: the same calls as on transformers ---------------------

def test_facade_ingests_through_vllm_and_answers_every_mode_with_a_trace(vllm_rag):
    rag = vllm_rag
    res = rag.ingest_text("freedonia", "\n\n".join(CHUNKS))
    assert res.n_chunks >= 1
    assert rag.precompute(rag.index.chunks()[0].token_ids) is False  # stored by the ingest
    chunks = rag.retrieve(QUESTION, k=2)
    full = rag.generate(chunks, QUESTION, mode="full", max_new_tokens=8)
    for mode in ("prefix", "reuse", "blend"):
        ans = rag.generate(chunks, QUESTION, mode=mode, max_new_tokens=8,
                           blend=BlendConfig(ratio=1.0) if mode == "blend" else None)
        t = ans.trace
        assert t.error is None and t.ttft_s > 0 and t.engine.startswith("vLLM in process")
        assert t.context_tokens == len(full.prompt) and len(t.chunks) == len(chunks)
        if mode in ("reuse", "blend"):
            assert t.hits == len(chunks) and t.misses == 0, t
            assert all(c.tier is not None for c in t.chunks)
        if mode != "reuse":
            assert ans.tokens == full.tokens, mode  # prefix and blend 1.0 are exact
            # and so are the first token's log-probabilities (fp32: float reassociation only)
            assert ans.first.top.keys() == full.first.top.keys(), mode
            assert max(abs(ans.first.top[t] - lp) for t, lp in full.first.top.items()) < 1e-3
    assert full.trace.recomputed_tokens == full.trace.context_tokens
    # fuse_s is the engine computing the prompt in every mode, as on the transformers engine
    for t in (full.trace, ans.trace):
        assert 0 < t.fuse_s and t.lookup_s + t.load_s + t.precompute_s + t.fuse_s <= t.ttft_s
    pieces = list(rag.stream(chunks, QUESTION, max_new_tokens=8))
    assert "".join(pieces).strip() == rag.generate(chunks, QUESTION, max_new_tokens=8).text


def test_auto_ratio_follows_the_connectors_timings_and_a_set_ratio_wins(vllm_rag):
    """``ratio="auto"`` on vLLM: the client's loading controller reads the placement and
    compute times the connector reports, and the request carries the ratio it chose."""
    from ragkv.engine.loading import LoadingController

    rag = vllm_rag
    chunks = [rag.tokenizer(c, add_special_tokens=False).input_ids for c in CHUNKS]
    backend = rag.backend
    saved, backend.controller = backend.controller, LoadingController(smoothing=1.0)
    try:
        first = rag.generate(chunks, QUESTION, max_new_tokens=4,
                             blend=BlendConfig(ratio="auto", min_ratio=0.2))
        assert first.trace.error is None and first.trace.ratio == 0.2  # nothing measured yet
        c = backend.controller
        assert c.load_s_per_token is not None and c.compute_s_per_token > 0
        c.load_s_per_token = 10 * c.compute_s_per_token  # loading slow: recompute is free
        auto = rag.generate(chunks, QUESTION, max_new_tokens=8, blend=BlendConfig(ratio="auto"))
        assert auto.trace.ratio == 1.0 and auto.trace.error is None
        full = rag.generate(chunks, QUESTION, mode="full", max_new_tokens=8)
        assert auto.tokens == full.tokens  # ratio 1.0 is full prefill
        fixed = rag.generate(chunks, QUESTION, max_new_tokens=4, blend=BlendConfig(ratio=0.15))
        assert fixed.trace.ratio == 0.15
    finally:
        backend.controller = saved


def test_full_prefill_scores_its_own_greedy_answer(vllm_rag):
    """Teacher forcing on vLLM (prompt log-probabilities): the greedy answer is each row's
    top token, so the bench's teacher-forced agreement of full with itself is 1."""
    rag = vllm_rag
    chunks = [rag.tokenizer(c, add_special_tokens=False).input_ids for c in CHUNKS[:2]]
    full = rag.generate(chunks, QUESTION, mode="full", max_new_tokens=6, keep_kv=True)
    rows = full.score(full.tokens)
    assert len(rows) == len(full.tokens)
    assert [r.argmax for r in rows] == full.tokens
    assert rows[0].argmax == full.first.argmax


def test_a_fused_mode_without_chunks_answers_as_on_every_engine(vllm_rag):
    """Nothing to fuse: the prompt is prefilled (it was refused as parameters naming neither
    chunks nor a save, an error in the trace that the transformers engine never gives)."""
    full = vllm_rag.generate([], QUESTION, mode="full", max_new_tokens=6)
    for mode in ("blend", "reuse"):
        ans = vllm_rag.generate([], QUESTION, mode=mode, max_new_tokens=6)
        assert ans.trace.error is None and ans.tokens == full.tokens, mode


def test_anchor_context_through_vllm_matches_what_the_worker_computes(vllm_rag):
    """Anchor precompute on vLLM: ingestion stores both entries through vLLM's own prefill,
    the first chunk reads the exact prefix entry, and a miss the connector computes after the
    anchor holds the KV vLLM's prefill of the same tokens stored."""
    from ragkv.cache_index import KVStore
    from ragkv.keys import KV_LAYOUT

    rag = vllm_rag.with_config(precompute_context="anchor")
    keys, cfg = rag.backend.keys, rag.config
    chunks = [rag.tokenizer(c + " (anchored)", add_special_tokens=False).input_ids
              for c in CHUNKS]
    assert rag.precompute_many(chunks[:2]) == [True, True]
    assert rag.precompute_many(chunks[:2]) == [False, False]
    assert all(stored(cfg, keys.chunk(c, ctx)) for c in chunks[:2] for ctx in ("prefix",
                                                                               "anchor"))
    full = rag.generate(chunks, QUESTION, mode="full", max_new_tokens=8)
    one = rag.generate(chunks, QUESTION, mode="blend", blend=BlendConfig(ratio=1.0),
                       max_new_tokens=8)
    assert one.trace.error is None and one.tokens == full.tokens
    assert one.trace.hits == 2 and one.trace.misses == 1  # chunk 3 computed by the worker
    assert [c.key for c in one.trace.chunks] == [keys.at(c, i, "anchor")
                                                 for i, c in enumerate(chunks)]
    blend = rag.generate(chunks, QUESTION, mode="blend", max_new_tokens=8)
    assert blend.trace.error is None and blend.trace.hits == 3
    assert blend.trace.chunks[0].recomputed == 0  # its prefix entry is exact there

    def tensors(key):
        found = KVStore.from_config(cfg).fetch(key, model_fp=keys.fingerprint, layout=KV_LAYOUT)
        assert found is not None
        return found.tensors

    key = keys.chunk(chunks[2], "anchor")
    by_worker = tensors(key)
    KVStore.from_config(cfg).delete(key)
    assert rag.precompute_many(chunks[2:]) == [True]  # now through vLLM's prefill
    by_vllm = tensors(key)
    for name, t in by_worker.items():
        assert (t.float() - by_vllm[name].float()).abs().max() < 2e-3, name

    # a corpus anchor recorded for the cache: new anchor keys, a miss the worker computes
    # after the new passage (its ids travel with the request), then hits
    corpus = [" ".join(CHUNKS) * 4, " ".join(reversed(CHUNKS)) * 3]
    picked = rag.choose_anchor(corpus)
    assert picked is not None and rag.index.setting("anchor_text") == picked
    keys = rag.backend.keys
    assert keys.anchor_ids == rag.template.anchor_ids(picked)
    assert rag.backend.builder.keys is keys
    again = rag.generate(chunks, QUESTION, mode="blend", blend=BlendConfig(ratio=1.0),
                         max_new_tokens=8)
    assert again.trace.error is None and again.tokens == full.tokens
    assert again.trace.hits == 1 and again.trace.misses == 2  # the first chunk's entry stays
    assert all(stored(cfg, keys.chunk(c, "anchor")) for c in chunks[1:])
    hit = rag.generate(chunks, QUESTION, mode="blend", max_new_tokens=8)
    assert hit.trace.error is None and hit.trace.hits == 3


def test_anchor_entries_stored_through_vllm_carry_their_context_score(vllm_rag):
    """vLLM's prefill stores each anchor entry with its score against the prefix entry, and a
    preselecting blend then computes only its share of those chunks before the check layer."""
    import torch

    from ragkv.cache_index import KVStore
    from ragkv.engine.context_score import context_score
    from ragkv.engine.kv import ChunkKV
    from ragkv.keys import KV_LAYOUT

    rag = vllm_rag.with_config(precompute_context="anchor")
    keys, cfg = rag.backend.keys, rag.config
    chunks = [rag.tokenizer(c + " (scored)", add_special_tokens=False).input_ids
              for c in CHUNKS]
    assert rag.precompute_many(chunks) == [True] * 3

    def entry(ids, ctx):
        found = KVStore.from_config(cfg).fetch(keys.chunk(ids, ctx), model_fp=keys.fingerprint,
                                               layout=KV_LAYOUT)
        assert found is not None
        t = found.tensors
        return ChunkKV(t["k"], t["v"]), t.get("score")

    for ids in chunks:
        prefix, none = entry(ids, "prefix")
        anchor, score = entry(ids, "anchor")
        assert none is None and score is not None
        torch.testing.assert_close(score.reshape(-1), context_score(prefix, anchor))
    plain = rag.generate(chunks, QUESTION, mode="blend", blend=BlendConfig(ratio=0.1),
                         max_new_tokens=1)
    pre = rag.generate(chunks, QUESTION, mode="blend",
                       blend=BlendConfig(ratio=0.1, preselect=3.0), max_new_tokens=1)
    assert plain.trace.error is None and pre.trace.error is None
    a, b = plain.trace.recomputed_per_layer, pre.trace.recomputed_per_layer
    scored = len(chunks[1]) + len(chunks[2])  # the first chunk is exact there
    assert a[0] - b[0] == scored - round(0.3 * scored) and a[2] == b[2]
    # from ``preselect_from`` prompt tokens on, the default preselects (FAST_PRESELECT)
    n = plain.trace.context_tokens
    fast, long = (rag.generate(chunks, QUESTION, mode="blend", max_new_tokens=1,
                               blend=BlendConfig(ratio=0.1, **kw))
                  for kw in ({"preselect": 4.0}, {"preselect_from": n}))
    assert long.trace.error is None
    assert long.trace.recomputed_per_layer == fast.trace.recomputed_per_layer
    assert long.trace.recomputed_per_layer[0] < a[0]


def test_a_precompute_batch_that_vllm_splits_over_steps_stores_every_chunk(vllm_rag):
    # vLLM prefills at most max_num_batched_tokens per step: a batch of precompute requests
    # larger than that has some prompts split over two steps, whose spans complete only in
    # the second (they were lost: the save was planned in the first step only)
    from ragkv.chunking import chunk_text
    from ragkv.engine.vllm.backend import PRECOMPUTE_BATCH
    from ragkv.ingest import pydoc_topics

    rag = vllm_rag
    sched = rag.backend.transport.llm.llm_engine.vllm_config.scheduler_config
    budget = sched.max_num_batched_tokens
    chunks: list[list[int]] = []
    for _, text in pydoc_topics():
        chunks += [c.token_ids for c in chunk_text(text, rag.tokenizer, 800)
                   if len(c.token_ids) >= 600]
        if sum(map(len, chunks)) > budget + 1000:
            break
    assert len(chunks) <= PRECOMPUTE_BATCH, budget  # one batch of requests, split by vLLM
    assert rag.precompute_many(chunks) == [True] * len(chunks)
    missing = [i for i, c in enumerate(chunks) if not stored(rag.config, rag.key_for(c))]
    assert missing == []


def test_the_kv_vllm_stores_leaves_with_its_document(vllm_rag):
    """Entries vLLM's prefill saves and misses the worker computes carry their ids' digest,
    so removing the document removes them."""
    from sqlalchemy import select

    from ragkv.cache_index.models import KVEntry, ids_sha256

    rag = vllm_rag.with_config(precompute_context="anchor")
    rag.ingest_text("removed-soon", "\n\n".join(c + " (to be removed)" for c in CHUNKS))
    mine = [c.token_ids for c in rag.index.chunks() if c.document_name == "removed-soon"]
    keys = rag.backend.keys
    extra = rag.tokenizer(CHUNKS[0] + " (a miss)", add_special_tokens=False).input_ids
    ans = rag.generate([mine[0], extra], QUESTION, mode="blend", max_new_tokens=1)
    assert ans.trace.error is None and ans.trace.misses == 1  # computed by the worker
    (start, end), key = ans.prompt.chunk_spans[1], ans.trace.chunks[1].key
    assert rag.index.get_entry(key).ids_sha256 == ids_sha256(ans.prompt.ids[start:end])
    with rag.index.transaction() as s:
        held = list(s.scalars(select(KVEntry.key).where(
            KVEntry.ids_sha256.in_([ids_sha256(ids) for ids in mine]))))
    assert set(held) == {keys.chunk(ids, ctx) for ids in mine for ctx in ("prefix", "anchor")}
    assert rag.remove_document("removed-soon")
    assert not any(rag.index.has_entries(held).values())


def test_closing_the_facade_stops_the_engine_processes(vllm_rag):
    # last in the module: it closes the shared engine. Left to interpreter exit, the engine
    # core outlived its parent and the exit waited on it for good.
    import multiprocessing
    import time

    rag = vllm_rag
    assert multiprocessing.active_children()  # vLLM runs its engine core in a child
    rag.close()
    assert rag.backend.transport.llm is None
    deadline = time.monotonic() + 30  # a killed child is reaped a moment later
    while multiprocessing.active_children() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert multiprocessing.active_children() == []
    rag.close()  # twice is harmless (the fixture closes again)
