"""Guard of the kept-set check: a wrong selection (lowest or random deviations, deviations on
rotated keys, qhkvd without the question's weights) must make ``check_selection`` FAIL
(``selection_cases``)."""

from __future__ import annotations

import pytest
import torch
from engine_cases import _engine, _one_thread  # noqa: F401 - fixtures are used by name
from selection_cases import check_selection

from ragkv.config import BlendConfig
from ragkv.engine.hf import HFEngine
from ragkv.engine.policies import QueryAwareHKVD


def _broken_selections(engine: HFEngine):
    """Ways to pick the wrong tokens: (name, attribute of the kernel set, replacement)."""
    ops = engine.runner.ops
    runner = engine.runner
    keep_top, deviation = ops.keep_top, ops.deviation

    def lowest(d, must, budget):
        return keep_top(-d, must, budget)

    def random(d, must, budget):
        return keep_top(torch.rand(d.shape, generator=torch.Generator().manual_seed(0)), must,
                        budget)

    def on_rotated_keys(k_new, k_buf, index, out=None):
        # Fresh keys rotated to their positions, compared with the pre-RoPE cached ones (the
        # deviation taken after the in-place rotation instead of before).
        cos, sin = runner.cos_sin(index)
        return deviation(runner.rotate(k_new, cos, sin), k_buf, index, out)

    return [("lowest", "keep_top", lowest), ("random", "keep_top", random),
            ("rotated-keys", "deviation", on_rotated_keys)]


@pytest.mark.parametrize(("policy", "bug"), [
    (policy, bug) for policy in ("hkvd", "qhkvd")
    for bug in ("lowest", "random", "rotated-keys")] + [("qhkvd", "unweighted")])
def test_guard_selection_check_fails_on_a_wrong_selection(monkeypatch, policy, bug):
    """Keeping the lowest deviations, random tokens, deviations measured on rotated keys, or
    (qhkvd) ignoring the question's attention: the check above must fail on each."""
    name = "llama3-rope"
    engine = _engine(name)
    cfg = BlendConfig(ratio=0.15, policy=policy)
    check_selection(engine, name, cfg)  # intact: passes
    if bug == "unweighted":  # qhkvd reduced to hkvd
        monkeypatch.setattr(QueryAwareHKVD, "reads_question", False)
    else:
        _, attr, fn = next(b for b in _broken_selections(engine) if b[0] == bug)
        monkeypatch.setattr(engine.runner.ops, attr, fn)
    with pytest.raises(AssertionError, match="kept set differs"):
        check_selection(engine, name, cfg)
