"""The rules ``ragkv.engine.context_score`` decides, by hand: each scored layer weighs alike
whatever its scale, the chunk's mean score is 1, short chunks and one key/value head are
scored, a non-finite score is none, and the preselection and the kept scoring layers are
exactly what their docstrings say. Written for the mutants that survived them."""

from __future__ import annotations

import pytest
import torch

from ragkv.engine.context_score import SCORE_LAYERS, context_score, preselected, scoring_part
from ragkv.engine.kv import ChunkKV


def _pair(layers: int = 3, heads: int = 2, n: int = 4, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    shape = (layers, heads, n, 4)
    ref = ChunkKV(torch.randn(shape, generator=g), torch.randn(shape, generator=g))
    return ref, ChunkKV(ref.k.clone(), ref.v.clone())


def test_each_scored_layer_weighs_alike_whatever_its_scale():
    ref, moved = _pair(n=2)
    moved.k[1, 0, :, 0] += torch.tensor([1.0, 3.0]).sqrt()  # layer 1: distances 1 and 3
    moved.k[2, 0, :, 0] += torch.tensor([30.0, 10.0]).sqrt()  # layer 2: 30 and 10
    # per layer over its own mean: [0.5, 1.5] and [1.5, 0.5], averaged
    torch.testing.assert_close(context_score(ref, moved), torch.tensor([1.0, 1.0]))


def test_small_movements_are_scored_on_the_same_scale():
    ref, moved = _pair(n=3)
    moved.k[1:, 1, :, 2] += torch.tensor([1e-3, 2e-3, 3e-3])
    score = context_score(ref, moved)
    assert float(score.mean()) == pytest.approx(1.0)
    # float32 keys hold the moves to about 1e-5 of themselves
    torch.testing.assert_close(score, torch.tensor([1.0, 4.0, 9.0]) / (14 / 3), rtol=1e-3,
                               atol=1e-4)


def test_one_token_and_one_kv_head_are_scored_and_no_token_is_not():
    ref, moved = _pair(n=1)
    moved.k[1:] += 1.0
    torch.testing.assert_close(context_score(ref, moved), torch.tensor([1.0]))
    ref, moved = _pair(heads=1, n=3)
    moved.k[1:, 0, 0] += 2.0
    moved.k[1:, 0, 2] += 1.0
    torch.testing.assert_close(context_score(ref, moved), torch.tensor([0.8, 0.0, 0.2]) * 3)
    empty = ChunkKV(torch.zeros(3, 2, 0, 4), torch.zeros(3, 2, 0, 4))
    assert context_score(empty, empty) is None


def test_a_non_finite_score_is_no_score():
    ref, moved = _pair()
    moved.k[2, 0, 1, 0] = float("inf")
    assert context_score(ref, moved) is None


def test_the_scoring_part_keeps_exactly_the_scored_layers():
    ref, moved = _pair(layers=5)
    moved.k[1:] += torch.randn(moved.k[1:].shape, generator=torch.Generator().manual_seed(1))
    part = scoring_part(ref)
    assert part.k.shape[0] == part.v.shape[0] == max(SCORE_LAYERS) + 1
    assert part.k.untyped_storage().nbytes() == part.k.numel() * part.k.element_size()
    torch.testing.assert_close(context_score(part, moved), context_score(ref, moved))


def test_the_preselection_takes_the_budget_exactly():
    scores = {2: torch.tensor([0.1, 0.9, 0.5]), 7: torch.tensor([0.7, 0.2])}
    spans = [(2, 5), (5, 7), (7, 9)]  # the middle chunk has no score: taken whole
    assert sorted(preselected(scores, spans, 1).tolist()) == [3, 5, 6]
    assert sorted(preselected(scores, spans, 0).tolist()) == [5, 6]
    assert sorted(preselected(scores, spans, 2).tolist()) == [3, 5, 6, 7]
    none = preselected({}, [], 3)
    assert none.dtype == torch.long and none.numel() == 0
