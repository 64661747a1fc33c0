"""End to end: the blend through the Triton kernels equals the blend through the references
(same selected tokens at every layer, logits and KV within tolerance), and ratio 1.0 through
the kernels still equals full prefill."""

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

from ragkv.config import BlendConfig
from ragkv.engine.hf import HFEngine
from ragkv.engine.kernels import TorchOps, make_ops

pytest.importorskip("triton")

DEV = "cuda" if torch.cuda.is_available() else "cpu"


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


def _both(name: str, cfg: BlendConfig):
    engine, case = _dev_engine(name), _dev_case(name)
    with kernels(engine, TorchOps()):
        ref = blend(engine, case, cfg, record=True)
    with kernels(engine, make_ops("triton", engine.runner.device)):
        got = blend(engine, case, cfg, record=True)
    return engine, case, ref, got


@pytest.mark.parametrize("name", MODELS)
def test_kernel_blend_equals_reference_blend(name):
    _, _, ref, got = _both(name, BlendConfig(ratio=0.15, policy="qhkvd"))
    assert len(got.layer_sets) == len(ref.layer_sets)
    for layer, (a, b) in enumerate(zip(got.layer_sets, ref.layer_sets, strict=True)):
        assert torch.equal(a, b), f"layer {layer}: selections differ"
    assert_same_prefill(got, ref)


@pytest.mark.parametrize("policy", ["hkvd", "gradual", "hkvd+head", "chunk_head"])
def test_kernel_blend_equals_reference_for_every_policy(policy):
    _, _, ref, got = _both("llama3-rope", BlendConfig(ratio=0.3, policy=policy,
                                                      deviation_on="kv"))
    for a, b in zip(got.layer_sets, ref.layer_sets, strict=True):
        assert torch.equal(a, b)
    assert_same_prefill(got, ref)


@pytest.mark.parametrize("name", ["llama", "qwen2"])
def test_kernel_blend_at_ratio_one_equals_full_prefill(name):
    engine, case, _, got = _both(name, BlendConfig(ratio=1.0))
    assert_same_prefill(got, case.full)


def test_kernel_precompute_after_a_prefix_equals_reference():
    engine, case = _dev_engine("mistral"), _dev_case("mistral")
    past = case.cached[0][1]
    with kernels(engine, TorchOps()):
        ref = engine.precompute(case.chunks[0], past)
    with kernels(engine, make_ops("triton", engine.runner.device)):
        got = engine.precompute(case.chunks[0], past)
    assert max_diff(got.k, ref.k) < 1e-5 and max_diff(got.v, ref.v) < 1e-5
