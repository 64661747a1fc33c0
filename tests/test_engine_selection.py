"""Which tokens the selection policies keep: the kept set at the first check layer equals the
oracle's from the model's own forward (``selection_cases``), and qhkvd's question weighting
changes it (tiny model matrix from ``engine_cases``)."""

from __future__ import annotations

import pytest
import torch
from engine_cases import _one_thread, engine  # noqa: F401 - fixtures are used by name
from selection_cases import check_selection, expected_kept

from ragkv.config import BlendConfig

# ---- selection by what it picks ------------------------------------------------------------

SELECTIONS = [BlendConfig(ratio=r, policy="hkvd", deviation_on=d)
              for r, d in ((0.15, "k"), (0.3, "k"), (0.15, "v"), (0.15, "kv"))] + [
    BlendConfig(ratio=r, policy="qhkvd") for r in (0.15, 0.3)] + [
    BlendConfig(ratio=0.3, policy="qhkvd", deviation_on="kv"),
    BlendConfig(ratio=0.15, policy="gradual"), BlendConfig(ratio=0.3, policy="hkvd+head"),
    BlendConfig(ratio=0.15, policy="hkvd", check_layers=(2,))]


def _cfg_id(c: BlendConfig) -> str:
    return f"{c.policy}-{c.deviation_on}@{c.ratio}-L{c.check_layers[0]}"


@pytest.mark.parametrize("cfg", SELECTIONS, ids=_cfg_id)
def test_check_layer_keeps_the_largest_deviations(request, engine, cfg):
    check_selection(engine, request.node.callspec.params["engine"], cfg)


def test_query_weighting_changes_what_is_kept(engine, request):
    """qhkvd and hkvd keep different tokens on every test prompt, so the qhkvd check above
    would catch a policy that dropped the question's weights."""
    name = request.node.callspec.params["engine"]
    for ratio in (0.15, 0.3):
        hkvd, _ = expected_kept(name, BlendConfig(ratio=ratio, policy="hkvd"))
        qhkvd, _ = expected_kept(name, BlendConfig(ratio=ratio, policy="qhkvd"))
        assert not torch.equal(hkvd, qhkvd), ratio

