"""Fused requests that vLLM preempts under KV-cache pressure and resumes (``make test-vllm``).

vLLM frees a preempted request's blocks and, when it resumes it, asks the connector again for
the positions it does not hold; the connector claims them and the fusion must run again into
the new blocks. Resumed requests come to the connector among the running ones, not the new
ones: left out there, they decoded over whatever their new blocks held (another request's
KV), with no error. Each answer under pressure must be the answer the request gets alone.

The engine core runs in this process here, so the test can see which requests vLLM resumed
(otherwise the comparison could pass without any preemption)."""

from __future__ import annotations

import pytest

from ragkv.config import RagkvConfig

pytestmark = pytest.mark.vllm

TEXTS = (
    "The capital of Freedonia is Zumbat. It lies on the river Oxo and has three bridges. " * 3,
    "Zumbat is famous for its blue cheese and for a kite festival held every May. " * 3,
    "The river Oxo floods every spring, and the bridges of Zumbat were rebuilt in 1911. " * 3,
    "Sylvania borders Freedonia to the east; its capital Vostok makes clocks and glass. " * 3,
)
QUESTIONS = ("What is the capital of Freedonia?", "Which river floods every spring?",
             "What does Vostok make?", "When were the bridges rebuilt?")
WINDOW = 512  # positions a request may hold
BLOCK = 32
# Positions the KV cache holds for all requests: three prompts (six blocks each) and two
# blocks more, so three run at once and, a block's worth of answer later, one is preempted.
CACHE = 20 * BLOCK
ANSWER = 128
KV_BYTES_PER_TOKEN = 30 * 3 * 64 * 2 * 4  # SmolLM2: layers x KV heads x head dim x K,V x fp32


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    pytest.importorskip("vllm")
    from ragkv.engine.vllm import scheduler
    from ragkv.engine.vllm.backend import VLLMBackend

    # per resumed request the connector claimed positions for: whether the step fused it
    resumed: dict[str, bool] = {}
    build = scheduler.ConnectorScheduler.build_connector_meta

    def watched(self, scheduler_output):
        claimed = set(self._pending)
        meta = build(self, scheduler_output)
        loaded = {load.req_id for load in meta.loads}
        for rid in scheduler_output.scheduled_cached_reqs.resumed_req_ids or ():
            if rid in claimed:
                resumed[rid] = resumed.get(rid, True) and rid in loaded
        return meta

    with pytest.MonkeyPatch.context() as mp:  # undone when the module's tests are done
        mp.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # the scheduler in this process
        mp.setattr(scheduler.ConnectorScheduler, "build_connector_meta", watched)
        cfg = RagkvConfig(home=tmp_path_factory.mktemp("ragkv-preempt"), kv_dtype="float32",
                          engine="vllm", precompute_context="prefix")
        backend = VLLMBackend.in_process(cfg, max_model_len=WINDOW, block_size=BLOCK,
                                         kv_cache_bytes=CACHE * KV_BYTES_PER_TOKEN)
        yield backend, resumed
        backend.close()


def _run(llm, reqs, max_tokens: int) -> list[list[int]]:
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    prompts, params = [], []
    for r in reqs:
        prompt = TokensPrompt(prompt_token_ids=r.ids)
        if r.cache_salt:
            prompt["cache_salt"] = r.cache_salt
        prompts.append(prompt)
        params.append(SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True,
                                     extra_args={"kv_transfer_params": r.kv_transfer_params}))
    return [list(o.outputs[0].token_ids) for o in llm.generate(prompts, params, use_tqdm=False)]


def test_a_preempted_fused_request_is_fused_again_when_it_resumes(engine) -> None:
    backend, resumed = engine
    llm, builder, tok = backend.transport.llm, backend.builder, backend.tokenizer
    chunks = [tok(t, add_special_tokens=False).input_ids for t in TEXTS]
    done = backend.transport.complete([builder.precompute(c, "prefix") for c in chunks], 1)
    assert all(d.note.get("saved") for d in done)
    reqs = [builder.fused([chunks[i], chunks[(i + 1) % 4]], q, mode="reuse")
            for i, q in enumerate(QUESTIONS)]
    assert all(5 * BLOCK < len(r.ids) <= 6 * BLOCK - 8 for r in reqs)
    llm.reset_prefix_cache()
    resumed.clear()
    together = _run(llm, reqs, ANSWER)
    assert resumed, "no fused request was preempted: the test would prove nothing"
    assert all(resumed.values()), f"resumed but not fused again: {resumed}"
    for req, got in zip(reqs, together, strict=True):
        llm.reset_prefix_cache()
        assert got == _run(llm, [req], ANSWER)[0]
