"""The loading module's rules, one test each, written for the mutants of ``loading.py`` that
the engine tests let through: the fused buffers' dtype, when placement runs on a thread, the
compute clock, the controller's layers, and the workspace pool's size and clearing."""

from __future__ import annotations

import time

import pytest
import torch
from engine_cases import _Tok, make_model

from ragkv.engine import loading
from ragkv.engine.hf import HFEngine
from ragkv.engine.kv import ChunkKV
from ragkv.engine.loading import LayerClock, LayerFeed, LoadingController, Workspace, WorkspacePool

CPU = torch.device("cpu")


def _runner(dtype: torch.dtype = torch.float32):
    return HFEngine(make_model("llama").to(dtype), _Tok()).runner


def _feed(runner, pipelined, workspace=None, T: int = 12) -> LayerFeed:
    L, H, D = runner.n_layers, runner.kv_heads, runner.head_dim
    kv = ChunkKV(torch.randn(L, H, 5, D), torch.randn(L, H, 5, D))
    cos, sin = runner.cos_sin(torch.arange(T))
    with torch.inference_mode():
        feed = LayerFeed(runner, [(3, kv)], T, cos, sin, pipelined=pipelined,
                         workspace=workspace)
        for layer in range(L):
            feed.wait(layer)
        feed.close()
    return feed


@pytest.mark.parametrize("workspace", [None, Workspace()], ids=["fresh", "workspace"])
def test_fused_buffers_take_the_model_dtype(workspace):
    """A bf16 model's fused KV is bf16 whether its buffers are fresh or a workspace's (float32
    ones would be converted on every read, or refused by the attention)."""
    runner = _runner(torch.bfloat16)
    feed = _feed(runner, pipelined=False, workspace=workspace)
    assert {feed.k_pre.dtype, feed.k_buf.dtype, feed.v_buf.dtype} == {torch.bfloat16}
    assert feed.k_pre.device == feed.v_buf.device == runner.device


def test_placement_runs_on_a_thread_only_when_it_pays():
    """Auto (None) pipelines only spans that must cross devices: on one device everything is
    placed up front, as with ``False``; ``True`` starts the loader thread."""
    runner = _runner()
    assert _feed(runner, pipelined=None)._thread is None
    assert _feed(runner, pipelined=False)._thread is None
    assert _feed(runner, pipelined=True)._thread is not None


def test_no_loader_thread_while_triton_is_interpreted():
    """Triton's interpreter patches its language module while a kernel runs, so two threads
    must never interpret at once: placement stays on the caller's thread."""
    pytest.importorskip("triton")
    from ragkv.engine.kernels import interpreting
    from ragkv.engine.kernels.triton_ops import TritonOps

    if not interpreting():
        pytest.skip("Triton runs compiled here (a GPU): the loader thread is allowed")
    runner = _runner()
    runner.ops = TritonOps()
    assert _feed(runner, pipelined=True)._thread is None


def test_the_clock_reads_each_lap_on_its_own():
    clock = LayerClock(CPU)
    t0 = time.perf_counter()
    for pause in (0.02, 0.0, 0.04):
        time.sleep(pause)
        clock.lap()
    laps = clock.seconds()
    total = time.perf_counter() - t0
    assert len(laps) == 3 and all(s >= 0 for s in laps)
    assert laps[0] >= 0.02 and laps[2] >= 0.04
    assert sum(laps) <= total  # differences of successive laps, not times since the start


def test_a_layer_that_computed_one_token_counts():
    c = LoadingController(smoothing=1.0)
    c.observe(chunk_tokens=10, place_s=[1.0], layer_s=[0.5], computed=[1])
    assert c.compute_s_per_token == 0.5


def test_the_pool_keeps_two_workspaces_by_default():
    pool = WorkspacePool()
    with pool.lease(CPU) as a, pool.lease(CPU) as b, pool.lease(CPU) as c:
        assert a is not None and b is not None and a is not b
        assert c is None  # both busy: fresh buffers, the pool does not grow


def test_clearing_the_pool_keeps_only_what_is_lent():
    pool = WorkspacePool(size=2)
    with pool.lease(CPU) as idle:
        pass
    with pool.lease(CPU) as busy:
        assert busy is idle  # nothing referenced it: lent again
        with pool.lease(CPU) as other:
            assert other is not None and other is not busy
        pool.clear()
        assert pool._pool == [busy]
    pool.clear()
    assert pool._pool == []


def test_pooling_is_on_with_this_torch():
    """The pool needs storage use counts; without them it lends nothing (see ``_lone_refs``)."""
    assert loading._lone_refs() is not None
    with WorkspacePool().lease(CPU) as ws:
        assert ws is not None
