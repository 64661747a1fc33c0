"""The connector's scheduler side under vLLM's call orders, driven directly (``make
test-vllm``): what it keeps per request must leave with the request."""

from __future__ import annotations

from types import SimpleNamespace as NS

import pytest

from ragkv.config import BlendConfig, RagkvConfig
from ragkv.keys import KeySpace
from ragkv.prompt import PromptTemplate

pytestmark = pytest.mark.vllm


@pytest.fixture
def connector(tmp_path, tokenizer):
    pytest.importorskip("vllm")
    from ragkv.engine.vllm.client import RequestBuilder
    from ragkv.engine.vllm.scheduler import ConnectorScheduler

    template = PromptTemplate.from_tokenizer(tokenizer, RagkvConfig().system_prompt)
    keys = KeySpace("vllm:" + "0" * 59, "float32", template.prefix_ids, "prefix")
    chunks = [tokenizer(t, add_special_tokens=False).input_ids for t in
              ("The capital of Freedonia is Zumbat.", "Zumbat is famous for blue cheese.")]
    sched = ConnectorScheduler(RagkvConfig(home=tmp_path), keys.fingerprint, "m", 512)
    return sched, RequestBuilder(template, keys), chunks


def _fused_step(sched, builder, chunks, i: int):
    """A fused request scheduled in a step: (request, its worker's trace, an empty step)."""
    from ragkv.engine.vllm.meta import RagkvWorkerMeta

    vreq = builder.fused(chunks, f"question {i}?", mode="blend", blend=BlendConfig(ratio=0.15))
    rid = f"req-{i}"
    req = NS(request_id=rid, prompt_token_ids=vreq.ids, cache_salt=vreq.cache_salt,
             kv_transfer_params=vreq.kv_transfer_params)
    n, _ = sched.get_num_new_matched_tokens(req, 0)
    sched.update_state_after_alloc(req, None, n)
    none = NS(req_ids=[], new_block_ids=[], num_computed_tokens=[], resumed_req_ids=set())
    new = NS(req_id=rid, prompt_token_ids=vreq.ids, block_ids=([0, 1, 2, 3],),
             num_computed_tokens=0)
    meta = sched.build_connector_meta(NS(scheduled_new_reqs=[new], scheduled_cached_reqs=none,
                                         num_scheduled_tokens={rid: len(vreq.ids)}))
    assert [load.req_id for load in meta.loads] == [rid]
    trace = {"hits": 2, "misses": 0, "fuse_s": 0.1, "recomputed_per_layer": [10] * 30}
    empty = NS(scheduled_new_reqs=[], scheduled_cached_reqs=none, num_scheduled_tokens={})
    return req, NS(kv_connector_worker_meta=RagkvWorkerMeta({rid: trace})), empty


def test_a_one_step_request_gets_its_workers_trace_and_leaves_nothing(connector):
    sched, builder, chunks = connector
    for i in range(20):  # vLLM's synchronous order: the output is read, then the request ends
        req, worker, _ = _fused_step(sched, builder, chunks, i)
        _, params = sched.request_finished(req, [0, 1, 2, 3])
        sched.update_connector_output(worker)
        assert params["ragkv"]["hits"] == 2  # merged into the note before it is sent
    assert sched._notes == {}


def test_a_trace_arriving_after_its_request_finished_is_not_kept(connector):
    """Async scheduling: a request aborted while its step runs ends before the next step is
    scheduled, and only then is the step's output (the worker's trace) read."""
    sched, builder, chunks = connector
    for i in range(50):
        req, worker, empty = _fused_step(sched, builder, chunks, i)
        sched.request_finished(req, [0, 1, 2, 3])
        sched.build_connector_meta(empty)
        sched.update_connector_output(worker)
    assert sched._notes == {}
    assert len(sched._finished) == 0


def test_a_save_carrying_a_salt_is_refused(connector):
    """A save with a fused request's salt was served that request's blocks by vLLM's prefix
    cache and stored their fused KV under the chunk's exact key, for every later reader."""
    sched, builder, chunks = connector
    fused = builder.fused(chunks, "question?", mode="reuse")
    save = builder.precompute(chunks[0])
    for salt in (fused.cache_salt, "any-tenant"):
        req = NS(request_id=f"save-{salt}", prompt_token_ids=save.ids, cache_salt=salt,
                 kv_transfer_params=save.kv_transfer_params)
        assert sched.get_num_new_matched_tokens(req, 0) == (0, False)
        assert req.request_id not in sched._saves
        assert "carries no cache_salt" in sched._notes[req.request_id]["error"]
    req = NS(request_id="save-plain", prompt_token_ids=save.ids, cache_salt=None,
             kv_transfer_params=save.kv_transfer_params)
    sched.get_num_new_matched_tokens(req, 0)
    assert "save-plain" in sched._saves
