"""The fidelity metrics: KL over the full vocabulary and over the top-k an engine exposes."""

from __future__ import annotations

import math

import pytest
import torch

from ragkv import metrics


def _top(logits: torch.Tensor, k: int) -> dict[int, float]:
    lp = torch.log_softmax(logits.double(), dim=-1)
    vals, idx = lp.topk(k)
    return {int(i): float(v) for i, v in zip(idx, vals, strict=True)}


def test_top_kl_equals_vocab_kl_when_the_top_k_is_the_whole_vocabulary() -> None:
    g = torch.Generator().manual_seed(0)
    p, q = torch.randn(12, generator=g), torch.randn(12, generator=g)
    exact = float(metrics.kl(p.double(), q.double()))
    assert metrics.top_kl(_top(p, 12), _top(q, 12)) == pytest.approx(exact, rel=1e-5)


def test_top_kl_is_positive_when_two_near_tied_tokens_swap() -> None:
    # the first token flips between two near-tied candidates: a divergence, however small,
    # where the plain top-k sum cancels to zero or below
    vocab = 50
    base = torch.full((vocab,), -8.0)
    full, mode = base.clone(), base.clone()
    full[3], full[7] = 2.00, 1.90
    mode[3], mode[7] = 1.90, 2.00
    k = 5
    value = metrics.top_kl(_top(full, k), _top(mode, k))
    exact = float(metrics.kl(full, mode))
    assert value > 0.0
    assert value <= exact * (1 + 1e-6)  # coarse-graining never raises a KL


@pytest.mark.parametrize("seed", range(20))
def test_top_kl_never_exceeds_the_vocabulary_kl_when_tops_cover_each_other(seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    p = torch.randn(40, generator=g) * 3
    q = p + torch.randn(40, generator=g) * 0.3
    full, mode = _top(p, 40), _top(q, 40)
    exact = float(metrics.kl(p.double(), q.double()))
    # with every token present, the rest bucket is empty and the value is exact
    assert metrics.top_kl(full, mode) == pytest.approx(exact, rel=1e-5, abs=1e-6)
    # with the top-8 only, a coarse-graining: never above the exact value
    assert metrics.top_kl(_top(p, 8), _top(q, 40)) <= exact * (1 + 1e-5) + 1e-6


def test_top_kl_of_identical_distributions_is_zero_and_missing_sides_are_nan() -> None:
    top = _top(torch.tensor([1.0, 0.5, -1.0, 0.0]), 3)
    assert metrics.top_kl(top, top) == pytest.approx(0.0, abs=1e-12)
    assert math.isnan(metrics.top_kl({}, top))
    assert math.isnan(metrics.top_kl(top, {}))


def test_first_token_names_its_basis() -> None:
    from ragkv.engine.base import NextToken

    logits = torch.tensor([0.0, 2.0, 1.0])
    a, b = NextToken.from_logits(logits), NextToken.from_logits(torch.tensor([0.0, 1.0, 2.0]))
    row = metrics.first_token(a, b)
    assert row["kl_basis"] == "vocab" and row["first_token_agree"] == 0.0
    assert row["first_token_kl"] > 0


def test_an_answer_contains_what_was_expected_and_a_blank_expectation_is_none():
    assert metrics.contains("The Answer is 42.", " answer IS 42 ") == 1.0
    assert metrics.contains("I have no idea", "42") == 0.0
    for nothing in (None, "", "   "):  # a blank one was "contained" in every answer
        assert metrics.contains("I have no idea", nothing) is None
