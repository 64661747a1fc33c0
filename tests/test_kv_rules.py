"""The rules ``ragkv.engine.kv`` decides: what a chunk's entry holds, how it converts and how a
stored one is checked before use (a wrong one is a ``ValueError`` the chunk store turns into a
miss). Written for the mutants that survived them."""

from __future__ import annotations

import re

import pytest
import torch

from ragkv.engine.kv import ChunkKV, torch_dtype

SHAPE = dict(layers=2, kv_heads=1, head_dim=4, n_tokens=3)


def _kv(dtype=torch.float32, fill: float | None = None) -> ChunkKV:
    shape = (2, 1, 3, 4)
    if fill is not None:
        return ChunkKV(torch.full(shape, fill, dtype=dtype), torch.full(shape, fill, dtype=dtype))
    g = torch.Generator().manual_seed(0)
    return ChunkKV(torch.randn(shape, generator=g).to(dtype),
                   torch.randn(shape, generator=g).to(dtype))


def test_dtypes_are_named_or_refused_with_the_choices():
    assert torch_dtype("bfloat16") is torch.bfloat16
    with pytest.raises(ValueError, match=re.escape(
            "unknown dtype 'int4'; use one of ['bfloat16', 'float16', 'float32']")):
        torch_dtype("int4")


def test_a_malformed_entry_is_refused_with_what_is_wrong():
    k = torch.zeros(2, 1, 3, 4)
    with pytest.raises(ValueError, match=re.escape(
            "k/v must share a 4-d shape, got (2, 1, 3, 4) and (2, 1, 2, 4)")):
        ChunkKV(k, torch.zeros(2, 1, 2, 4))
    with pytest.raises(ValueError, match=re.escape(
            "score must hold one value per token (3), got shape (4,)")):
        ChunkKV(k, k, torch.zeros(4))


def test_conversion_keeps_the_score_and_converts_both_halves():
    score = torch.tensor([0.5, 1.0, 1.5])
    kv = _kv().with_score(score).to("cpu", torch.float16)
    assert kv.k.dtype == kv.v.dtype == torch.float16 and kv.score is score
    stored = _kv().with_score(score.double()).to_tensors("bfloat16")
    assert stored["k"].dtype == stored["v"].dtype == torch.bfloat16
    assert stored["score"].dtype == torch.float32 and stored["score"].shape == (1, 3)


def test_a_stored_entry_is_checked_before_use():
    good = _kv().to_tensors("float16")
    assert ChunkKV.from_tensors(good, **SHAPE).n_tokens == 3
    assert ChunkKV.from_tensors(good, **SHAPE, dtype=torch.float16).n_tokens == 3
    for k, v in ((torch.float32, torch.float32), (torch.float16, torch.float32),
                 (torch.float32, torch.float16), (torch.int64, torch.int64)):
        other = {**good, "k": good["k"].to(k), "v": good["v"].to(v)}
        with pytest.raises(ValueError) as err:
            ChunkKV.from_tensors(other, **SHAPE, dtype=torch.float16)
        assert str(err.value) == f"stored KV has dtype {k}/{v}, expected torch.float16"
    # large finite half-precision values whose half-precision sum would overflow: still valid
    big = _kv(torch.float16, fill=60000.0).to_tensors("float16")
    assert torch.equal(ChunkKV.from_tensors(big, **SHAPE).k, big["k"])
    # ... and fp32 / bf16 ones whose float32 sum overflowed (all read as non-finite)
    for dtype in (torch.float32, torch.bfloat16):
        huge = _kv(dtype, fill=3e38).to_tensors(str(dtype).removeprefix("torch."))
        assert torch.equal(ChunkKV.from_tensors(huge, **SHAPE, dtype=dtype).v, huge["v"])
    for bad in (float("nan"), float("inf")):
        broken = {**good, "v": good["v"].clone()}
        broken["v"][1, 0, 2, 3] = bad
        with pytest.raises(ValueError, match="^stored KV holds non-finite values$"):
            ChunkKV.from_tensors(broken, **SHAPE)
    for score in (torch.ones(1, 2), torch.tensor([[1.0, float("nan"), 1.0]])):
        with pytest.raises(ValueError, match="^stored context score is malformed$"):
            ChunkKV.from_tensors({**good, "score": score}, **SHAPE)
