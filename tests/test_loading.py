"""The loading controller: cached KV placed layer by layer behind the compute must give the
same prefill as placing everything first, and ``ratio="auto"`` must follow the measurements."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from api_cases import (  # noqa: F401 - fixtures are used by name
    QUESTION,
    _one_thread,
    engine,
    make_config,
    rag,
    seed,
    three_chunks,
)
from engine_cases import MODELS, _case, _engine, _Tok, make_case, make_model

from ragkv.api import RagKV
from ragkv.config import POLICIES, BlendConfig
from ragkv.engine.blend import fuse
from ragkv.engine.hf import HFEngine
from ragkv.engine.kv import ChunkKV
from ragkv.engine.loading import LayerFeed, LoadingController, Workspace, WorkspacePool
from ragkv.engine.policies import SelectionContext, make_policy


def _blend_inputs(name: str, policy: str):
    """Runner, prompt ids, cached spans, context and policy of a model's case at ratio 0.3."""
    eng, case = _engine(name), _case(name)
    p = case.prompt
    forced = torch.ones(len(p), dtype=torch.bool)
    for s, kv in case.cached:
        forced[s:s + kv.n_tokens] = False
    ctx = SelectionContext(len(p), p.prefix_len, p.chunk_spans, forced, 0.3, p.suffix_start)
    pol = make_policy(BlendConfig(ratio=0.3, policy=policy), eng.runner.n_layers)
    return eng.runner, torch.tensor(p.ids), case.cached, ctx, pol


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("policy", POLICIES)
def test_pipelined_placement_equals_placing_first(name, policy):
    """Bit for bit: the background feed changes when KV is placed, never what is placed."""
    runner, ids, cached, ctx, pol = _blend_inputs(name, policy)
    with torch.inference_mode():
        outs = [fuse(runner, ids, cached, ctx, pol, record=True, pipelined=flag)
                for flag in (True, False)]
    a, b = outs
    assert torch.equal(a.logits, b.logits)
    for x, y in zip(a.k + a.v, b.k + b.v, strict=True):
        assert torch.equal(x, y)
    assert all(torch.equal(x, y) for x, y in zip(a.layer_sets, b.layer_sets, strict=True))
    L = runner.n_layers
    assert len(a.place_s) == len(a.layer_s) == L and min(a.place_s) >= 0 < min(a.layer_s)


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("pipelined", [True, False])
def test_reused_workspace_holding_stale_values_changes_nothing(name, pipelined):
    """A workspace's buffers keep the last prefill's values (NaN here); none may leak."""
    r, ids, cached, ctx, policy = _blend_inputs(name, "hkvd")
    ws = Workspace()
    for buf in ("k_pre", "v", "k"):
        ws.take(buf, (r.n_layers * r.kv_heads * (len(ids) + 7) * r.head_dim,), r.dtype,
                r.device).fill_(float("nan"))
    with torch.inference_mode():
        want = fuse(r, ids, cached, ctx, policy, pipelined=pipelined)
        for _ in range(2):  # the second run starts from the first one's values
            got = fuse(r, ids, cached, ctx, policy, pipelined=pipelined, workspace=ws)
            assert torch.equal(got.logits, want.logits)
            for x, y in zip(got.k + got.v, want.k + want.v, strict=True):
                assert torch.equal(x, y)


def test_feed_places_every_layer_and_zeroes_gaps():
    runner = _engine("llama").runner
    L, H, D = runner.n_layers, runner.kv_heads, runner.head_dim
    kv = ChunkKV(torch.randn(L, H, 5, D), torch.randn(L, H, 5, D))
    T = 12
    cos, sin = runner.cos_sin(torch.arange(T))
    with torch.inference_mode():
        feed = LayerFeed(runner, [(3, kv)], T, cos, sin, pipelined=True)
        for layer in range(L):
            feed.wait(layer)
        feed.close()
    assert torch.equal(feed.k_pre[:, :, 3:8], kv.k) and torch.equal(feed.v_buf[:, :, 3:8], kv.v)
    gaps = torch.cat([torch.arange(0, 3), torch.arange(8, T)])
    assert not feed.k_pre[:, :, gaps].any() and not feed.v_buf[:, :, gaps].any()
    assert torch.allclose(feed.k_buf, runner.rotate(feed.k_pre, cos, sin), atol=1e-6)


@pytest.mark.parametrize("pipelined", [False, True])
def test_placement_times_are_measured_per_layer(pipelined):
    """What the loading controller learns from (``ratio="auto"``): each layer's share of the
    placement, within the time the placement really took."""
    runner = _engine("llama").runner
    L, H, D = runner.n_layers, runner.kv_heads, runner.head_dim
    kv = ChunkKV(torch.randn(L, H, 64, D), torch.randn(L, H, 64, D))
    cos, sin = runner.cos_sin(torch.arange(70))
    with torch.inference_mode():
        t = time.perf_counter()
        feed = LayerFeed(runner, [(3, kv)], 70, cos, sin, pipelined=pipelined)
        for layer in range(L):
            feed.wait(layer)
        place_s = feed.close()
        elapsed = time.perf_counter() - t
    assert len(place_s) == L and all(s > 0 for s in place_s)
    assert sum(place_s) <= elapsed


def test_a_failing_placement_is_raised_on_the_waiting_thread():
    runner = _engine("llama").runner
    L, D = runner.n_layers, runner.head_dim
    wrong = ChunkKV(torch.randn(L, runner.kv_heads + 1, 4, D), torch.randn(L, runner.kv_heads
                                                                            + 1, 4, D))
    cos, sin = runner.cos_sin(torch.arange(10))
    with torch.inference_mode():
        feed = LayerFeed(runner, [(2, wrong)], 10, cos, sin, pipelined=True)
        with pytest.raises(RuntimeError, match=r"^placing cached KV failed$"):
            feed.wait(0)


def test_controller_hides_recompute_under_loading():
    c = LoadingController(smoothing=1.0)
    assert c.choose_ratio(0.15) == 0.15  # nothing measured yet
    # Placing a layer takes 1 ms per 100 tokens, computing 100 tokens of a layer 10 ms.
    c.observe(chunk_tokens=100, place_s=[1e-3] * 4, layer_s=[0.01] * 4, computed=[100] * 4)
    assert c.choose_ratio(0.05) == pytest.approx(0.1)
    assert c.choose_ratio(0.15) == 0.15  # the quality floor wins
    c.observe(chunk_tokens=100, place_s=[0.5] * 4, layer_s=[0.01] * 4, computed=[100] * 4)
    assert c.choose_ratio(0.15) == 1.0  # loading is slow: recomputing everything is free


def test_controller_averages_its_measurements():
    """Per chunk token: the mean layer's placement, and the median layer's compute over the
    layers that computed something; each a running average (weight ``smoothing`` on the new)."""
    c = LoadingController(smoothing=0.5)
    c.observe(chunk_tokens=0, place_s=[1.0], layer_s=[1.0], computed=[1])  # nothing to learn
    c.observe(chunk_tokens=10, place_s=[], layer_s=[], computed=[])
    assert c.load_s_per_token is None and c.compute_s_per_token is None
    # compute rates 1/2, 2/2, 9/2 per token and a layer that computed nothing (left out);
    # then 4, 2, 1, 3: the median is the upper middle one
    c.observe(chunk_tokens=1, place_s=[1.0, 3.0, 5.0, 7.0], layer_s=[1.0, 2.0, 9.0, 4.0],
              computed=[2, 2, 2, 0])
    assert c.load_s_per_token == 4.0 and c.compute_s_per_token == 1.0
    c.observe(chunk_tokens=2, place_s=[4.0], layer_s=[4.0, 2.0, 1.0, 9.0], computed=[1, 1, 1, 3])
    assert c.load_s_per_token == 3.0 and c.compute_s_per_token == 2.0
    with pytest.raises(ValueError):  # a time for every layer, or the measurement is wrong
        c.observe(chunk_tokens=2, place_s=[4.0], layer_s=[3.0], computed=[1, 1])
    assert LoadingController(load_s_per_token=1.0).choose_ratio(0.2) == 0.2


def test_a_workspace_buffer_is_reused_only_for_its_dtype_and_a_size_it_holds():
    ws = Workspace()
    a = ws.take("k", (2, 4), torch.float32, torch.device("cpu"))
    b = ws.take("k", (4,), torch.float32, torch.device("cpu"))
    assert b.data_ptr() == a.data_ptr()  # smaller: the same memory
    c = ws.take("k", (4,), torch.bfloat16, torch.device("cpu"))
    assert c.dtype == torch.bfloat16 and c.shape == (4,)
    d = ws.take("k", (3, 4), torch.bfloat16, torch.device("cpu"))
    assert d.dtype == torch.bfloat16 and d.shape == (3, 4) and d.data_ptr() != c.data_ptr()


def test_auto_ratio_in_a_query_and_a_set_ratio_wins(rag):
    chunks = three_chunks(rag)
    eng = rag.backend.engine
    saved, eng.controller = eng.controller, LoadingController(smoothing=1.0)
    first = rag.generate(chunks, QUESTION, blend=BlendConfig(ratio="auto", min_ratio=0.2))
    assert first.trace.ratio == 0.2  # no measurement before the first blend
    assert eng.controller.load_s_per_token is not None
    eng.controller.load_s_per_token = 10 * eng.controller.compute_s_per_token
    auto = rag.generate(chunks, QUESTION, blend=BlendConfig(ratio="auto"))
    assert auto.trace.ratio == 1.0
    full = rag.generate(chunks, QUESTION, mode="full")
    assert auto.tokens == full.tokens  # ratio 1.0 is full prefill
    fixed = rag.generate(chunks, QUESTION, blend=BlendConfig(ratio=0.15))
    assert fixed.trace.ratio == 0.15
    eng.controller = saved


def test_bad_ratios_are_rejected():
    with pytest.raises(ValueError, match="'auto'"):
        BlendConfig(ratio="most")
    with pytest.raises(ValueError, match="min_ratio"):
        BlendConfig(ratio="auto", min_ratio=1.5)


def test_engine_without_pipelining(tmp_path, engine):
    rag = RagKV(make_config(tmp_path), engine=engine)
    rag.ingest_text("doc", "The assert statement checks a condition. " * 20)
    chunks = three_chunks(rag)
    engine.pipelined = True  # forced: on the CPU the default places everything first
    a = rag.generate(chunks, QUESTION, keep_kv=True)
    engine.pipelined = False
    try:
        b = rag.generate(chunks, QUESTION, keep_kv=True)
    finally:
        engine.pipelined = None
    assert a.tokens == b.tokens and torch.equal(a.first.logits, b.first.logits)


@torch.inference_mode()
def test_pooled_workspace_is_lent_again_only_once_nothing_references_its_result():
    """The transformers engine reuses fused buffers across prefills (fresh ones are faulted in
    page by page), but a result still referenced, even one layer's view of it, keeps its
    buffers: a later prefill must neither overwrite it nor differ from fresh buffers."""
    eng = HFEngine(make_model("llama"), _Tok())
    cfg = BlendConfig(ratio=0.3, policy="hkvd")
    a, b = make_case(eng, seed=21), make_case(eng, seed=22, lengths=[30, 25, 33])

    def run(case):
        return eng.prefill(case.prompt, case.cached, "blend", cfg, case.prompt.prefix_len)

    def ptr(t: torch.Tensor) -> int:
        return t.untyped_storage().data_ptr()

    eng.workspaces = WorkspacePool(size=0)  # fresh buffers every time: the reference
    want_a, want_b = run(a), run(b)
    eng.workspaces = WorkspacePool(size=2)
    first = run(a)
    kept = [t.clone() for t in first.k + first.v]
    second = run(b)  # the first result is alive: its workspace is busy
    assert ptr(second.k[0]) != ptr(first.k[0])
    assert all(torch.equal(x, y) for x, y in zip(first.k + first.v, kept, strict=True))
    third = run(a)  # both pooled workspaces busy: fresh buffers, pool not grown
    assert ptr(third.k[0]) not in (ptr(first.k[0]), ptr(second.k[0]))
    for got, want in ((first, want_a), (second, want_b), (third, want_a)):
        assert torch.equal(got.logits, want.logits)
        assert all(torch.equal(x, y) for x, y in zip(got.k + got.v, want.k + want.v,
                                                     strict=True))
    one_layer, old = first.k[3], ptr(first.k[0])
    del first, third
    fourth = run(b)  # a single layer's view still holds the first workspace
    assert ptr(fourth.k[0]) != old and torch.equal(one_layer, kept[3])
    del one_layer, fourth
    fifth = run(b)  # nothing references it any more: lent again, same answer
    assert ptr(fifth.k[0]) == old
    assert torch.equal(fifth.logits, want_b.logits)
    assert all(torch.equal(x, y) for x, y in zip(fifth.k + fifth.v, want_b.k + want_b.v,
                                                 strict=True))


def test_pooled_workspaces_under_concurrent_prefills_give_each_its_own_buffers():
    """Several threads prefilling on one engine at once each get the reference result (two
    sharing a workspace would overwrite each other's KV)."""
    eng = HFEngine(make_model("llama"), _Tok())
    cfg = BlendConfig(ratio=0.3, policy="hkvd")
    with torch.inference_mode():
        cases = [make_case(eng, seed=30 + i) for i in range(3)]
    eng.workspaces = WorkspacePool(size=0)

    def run(case):
        with torch.inference_mode():
            return eng.prefill(case.prompt, case.cached, "blend", cfg, case.prompt.prefix_len)

    want = [run(c) for c in cases]
    eng.workspaces = WorkspacePool(size=2)
    with ThreadPoolExecutor(3) as pool:
        got = list(pool.map(run, cases * 4))
    for i, g in enumerate(got):
        w = want[i % 3]
        assert torch.equal(g.logits, w.logits)
        assert all(torch.equal(x, y) for x, y in zip(g.k + g.v, w.k + w.v, strict=True))
