"""End to end: the blend through the Triton kernels equals the blend through the references
(same selected tokens at every layer, logits and KV within tolerance), and ratio 1.0 through
the kernels still equals full prefill. Every test counts the kernel launches it relies on: the
kernel set sends attention over a long contiguous tail (every layer at ratio 1.0, the layers
before the check, a chunk precomputed after a prefix) to the torch reference, so there the
attention kernel is forced (``all_attention_through_the_kernel``) to be tested at all."""

from __future__ import annotations

import contextlib
import copy
import functools

import pytest
import torch
from engine_cases import (
    MODELS,
    _engine,
    _Tok,
    assert_same_prefill,
    blend,
    make_case,
    max_diff,
)
from kernel_spy import LaunchSpy, counts, spy_launches

from ragkv.config import BlendConfig
from ragkv.engine.hf import HFEngine
from ragkv.engine.kernels import TorchOps, make_ops

pytest.importorskip("triton")
from ragkv.engine.kernels import attention  # noqa: E402 - needs triton
from ragkv.engine.kernels.triton_ops import TritonOps  # noqa: E402 - needs triton

DEV = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture
def launches(monkeypatch) -> dict[str, LaunchSpy]:
    return spy_launches(monkeypatch)


@pytest.fixture
def all_attention_through_the_kernel(monkeypatch) -> None:
    """TritonOps without its fallback: every selected-query attention runs the kernel."""
    monkeypatch.setattr(TritonOps, "attend_selected",
                        lambda self, q, k, v, q_pos, scale:
                        attention.selected_attention(q, k, v, q_pos, scale))


@functools.cache
def _dev_engine(name: str) -> HFEngine:
    """The shared tiny model, copied to the device the kernels run on."""
    return HFEngine(copy.deepcopy(_engine(name).model).to(DEV), _Tok(), kernels="torch")


@functools.cache
def _dev_case(name: str):
    return make_case(_dev_engine(name))


@contextlib.contextmanager
def kernels(engine: HFEngine, ops: TorchOps):
    saved = engine.runner.ops
    engine.runner.ops = ops
    try:
        yield engine
    finally:
        engine.runner.ops = saved


def _both(name: str, cfg: BlendConfig, launches: dict[str, LaunchSpy]):
    engine, case = _dev_engine(name), _dev_case(name)
    with kernels(engine, TorchOps()):
        ref = blend(engine, case, cfg, record=True)
    assert sum(counts(launches).values()) == 0  # the reference launches no kernel
    with kernels(engine, make_ops("triton", engine.runner.device)):
        got = blend(engine, case, cfg, record=True)
    return engine, case, ref, got


@pytest.mark.parametrize("name", MODELS)
def test_kernel_blend_equals_reference_blend(launches, name):
    cfg = BlendConfig(ratio=0.15, policy="qhkvd")
    engine, _, ref, got = _both(name, cfg, launches)
    # RoPE of the cached keys, deviation + top-k at the check layer, and attention of the
    # selected queries from the check layer on (before it, every non-prefix position is
    # computed: a long contiguous tail, which the kernel set hands to the reference).
    c = counts(launches)
    assert c["rope"] >= 1 and c["deviation"] == 1 and c["keep_top"] == 1
    assert c["attention"] >= engine.runner.n_layers - cfg.check_layers[0]
    assert len(got.layer_sets) == len(ref.layer_sets)
    for layer, (a, b) in enumerate(zip(got.layer_sets, ref.layer_sets, strict=True)):
        assert torch.equal(a, b), f"layer {layer}: selections differ"
    assert_same_prefill(got, ref)


@pytest.mark.parametrize("policy", ["hkvd", "gradual", "hkvd+head", "chunk_head"])
def test_kernel_blend_equals_reference_for_every_policy(launches, policy):
    cfg = BlendConfig(ratio=0.3, policy=policy, deviation_on="kv", check_layers=(1,))
    engine, _, ref, got = _both("llama3-rope", cfg, launches)
    L = engine.runner.n_layers
    # K and V deviation and one top-k per check layer (gradual: layers 1-3; chunk_head: none,
    # its selected set is sparse from layer 0 on).
    n_checks = {"hkvd": 1, "gradual": 3, "hkvd+head": 1, "chunk_head": 0}[policy]
    first_sparse = 0 if policy == "chunk_head" else cfg.check_layers[0]
    c = counts(launches)
    assert c["rope"] >= 1 and c["deviation"] == 2 * n_checks and c["keep_top"] == n_checks
    assert c["attention"] >= L - first_sparse
    for a, b in zip(got.layer_sets, ref.layer_sets, strict=True):
        assert torch.equal(a, b)
    assert_same_prefill(got, ref)


@pytest.mark.parametrize("name", ["llama", "qwen2"])
def test_kernel_blend_at_ratio_one_equals_full_prefill(launches, all_attention_through_the_kernel,
                                                       name):
    """Ratio 1.0 computes every non-prefix position at every layer: a long contiguous tail,
    which only the forced kernel attends over (otherwise only the RoPE kernel would run)."""
    engine, case, _, got = _both(name, BlendConfig(ratio=1.0), launches)
    c = counts(launches)
    assert c["rope"] >= 1 and c["attention"] == engine.runner.n_layers
    assert_same_prefill(got, case.full)


def test_kernel_precompute_after_a_prefix_equals_reference(launches,
                                                           all_attention_through_the_kernel):
    """A chunk prefilled after a prefix attends as a contiguous tail: the forced kernel."""
    engine, case = _dev_engine("mistral"), _dev_case("mistral")
    past = case.cached[0][1]
    with kernels(engine, TorchOps()):
        ref = engine.precompute(case.chunks[0], past)
    with kernels(engine, make_ops("triton", engine.runner.device)):
        got = engine.precompute(case.chunks[0], past)
    # every layer but the last, whose output nothing reads (its K/V is all precompute keeps)
    assert launches["attention"].calls == engine.runner.n_layers - 1
    assert max_diff(got.k, ref.k) < 1e-5 and max_diff(got.v, ref.v) < 1e-5
