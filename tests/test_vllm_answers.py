"""The rest of an answer on the vLLM engine (``make test-vllm``): after the first token, a
second request over the same prompt continues it; it must not fuse the prompt again where
vLLM's prefix cache holds the fused KV up to the question, nor count the chunks' reads twice
where it must fuse again.

The engine core runs in this process, so the test sees each step the connector plans."""

from __future__ import annotations

import pytest
from vllm_cases import CHUNKS, QUESTION

from ragkv.config import BlendConfig, RagkvConfig

pytestmark = pytest.mark.vllm

BLOCK = 32  # the smallest block vLLM's CPU build takes (its default is 128)
LONG_QUESTION = QUESTION + " Answer in one sentence, naming the river and the festival too."


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    pytest.importorskip("vllm")
    from ragkv.api import RagKV
    from ragkv.engine.vllm import scheduler
    from ragkv.engine.vllm.backend import VLLMBackend

    fused: list[str] = []  # request ids, one per step the connector planned a fusion for
    build = scheduler.ConnectorScheduler.build_connector_meta

    def watched(self, scheduler_output):
        meta = build(self, scheduler_output)
        fused.extend(load.req_id for load in meta.loads)
        return meta

    with pytest.MonkeyPatch.context() as mp:  # undone when the module's tests are done
        mp.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # the scheduler in this process
        mp.setattr(scheduler.ConnectorScheduler, "build_connector_meta", watched)
        cfg = RagkvConfig(home=tmp_path_factory.mktemp("ragkv-answers"), kv_dtype="float32",
                          engine="vllm", precompute_context="prefix")
        rag = RagKV(cfg, backend=VLLMBackend.in_process(cfg, max_model_len=1024,
                                                        block_size=BLOCK,
                                                        kv_cache_bytes=128 * 2**20))
        ids = [rag.tokenizer(c, add_special_tokens=False).input_ids for c in CHUNKS]
        rag.precompute_many(ids)
        yield rag, ids, fused
        rag.close()


@pytest.mark.parametrize("mode", ["reuse", "blend"])
def test_the_rest_is_not_fused_again_where_the_prefix_cache_reaches_the_question(engine, mode):
    rag, ids, fused = engine
    blend = BlendConfig(ratio=0.5) if mode == "blend" else None
    prompt = rag.template.assemble(ids, LONG_QUESTION)
    assert len(prompt) // BLOCK * BLOCK >= prompt.suffix_start  # full blocks reach it
    fused.clear()
    ans = rag.generate(ids, LONG_QUESTION, mode=mode, blend=blend, max_new_tokens=8,
                       log_query=False)
    assert len(fused) == 1, fused  # the answer's first request only
    assert ans.trace.hits == len(ids)
    # the whole answer from one fused request: the same tokens
    one = rag.backend.builder.prompt(prompt, [c.key for c in ans.trace.chunks], mode,
                                     rag.backend.controller.resolve(blend or BlendConfig()),
                                     rag.config.precompute_context)
    assert rag.backend.transport.complete([one], 8)[0].tokens == ans.tokens


def test_a_prompt_fused_again_counts_each_chunk_read_once(engine):
    """A prompt whose last full block ends before its question: the rest fuses it again."""
    rag, ids, fused = engine
    ids = ids[:2]
    prompt = rag.template.assemble(ids, QUESTION)
    assert len(prompt) // BLOCK * BLOCK < prompt.suffix_start
    keys = [rag.key_for(c) for c in ids]
    before = [rag.index.get_entry(k).hits for k in keys]
    fused.clear()
    for n in (1, 8, 8):
        rag.generate(ids, QUESTION, mode="reuse", max_new_tokens=n, log_query=False)
    assert len(fused) == 5  # once per answer, and again for each answer's rest
    assert [rag.index.get_entry(k).hits for k in keys] == [b + 3 for b in before]


def test_a_fused_prompt_the_prefix_cache_serves_is_traced_with_what_vllm_computed(engine):
    """Asked again, the fused prompt's blocks up to its question are vLLM's prefix cache's:
    the connector fuses nothing, and the trace said every position was recomputed."""
    rag, ids, fused = engine
    blend = BlendConfig(ratio=0.25)
    first = rag.generate(ids, LONG_QUESTION, mode="blend", blend=blend, max_new_tokens=1,
                         log_query=False)
    fused.clear()
    again = rag.generate(ids, LONG_QUESTION, mode="blend", blend=blend, max_new_tokens=1,
                         log_query=False)
    assert fused == [] and again.tokens == first.tokens
    T = again.trace.context_tokens
    assert 0 < again.trace.recomputed_tokens <= T - len(again.prompt) // BLOCK * BLOCK
