"""The bench times every run from the same cache tier: a cache filled by an earlier process
(blob storage only) must not make the first run after full prefill pay the read alone. Its
settings reach every run, and its long prompt holds the tokens asked for."""

from __future__ import annotations

import pytest
from api_cases import (  # noqa: F401 - fixtures are used by name
    _one_thread,
    engine,
    make_config,
)

from ragkv.api import RagKV
from ragkv.bench import BenchSpec, run_bench, variants, warm_config


def _cases() -> list[dict]:
    return [{"id": f"c{i}", "chunks": [f"Passage {i}.{j} on topic {j}. " * 10 for j in range(3)],
             "question": f"What is topic {i}?"} for i in range(2)]


def test_every_run_reads_the_memory_tier(tmp_path, engine):
    home = tmp_path / "home"
    spec = BenchSpec(modes=["full", "reuse", "blend"], ratios=[0.0, 0.2], contexts=["prefix"],
                     max_new_tokens=2)
    first = RagKV(make_config(home), engine=engine)  # ingests to storage; no memory tier
    run_bench(first, _cases(), spec)
    first.index.close()
    rag = RagKV(make_config(home, memory_budget_bytes=64 << 20), engine=engine)
    try:
        out = run_bench(rag, _cases(), spec)
    finally:
        rag.index.close()
    timed = [r for r in out["cases"] if r["mode"] != "full"]
    assert len(timed) == len(_cases()) * len(variants(spec))
    assert all(r["tiers"] == ["memory"] and r["hits"] == 3 for r in timed)
    # each record splits its TTFT: the fusion's own time beside the lookup and the loading
    assert all(0 < r["fuse_s"] < r["ttft_s"] for r in timed)
    # the variants' order rotates: a different one runs right after each case's full prefill
    after_full = [out["cases"][i + 1] for i, r in enumerate(out["cases"]) if r["mode"] == "full"]
    assert len({(r["mode"], r["ratio"]) for r in after_full}) == len(_cases())


def test_the_warm_read_shares_no_blend_setting_with_a_timed_run():
    for ratios in ([0.05, 0.12], [0.0, 0.001, 0.002], [0.0], [r / 1000 for r in range(1000)]):
        assert warm_config(BenchSpec(ratios=ratios)).ratio not in ratios


def test_the_start_factor_reaches_the_blend_of_every_run(tmp_path, engine):
    """``--start-factor`` with check layers 1 and 2: layer 1 computes that multiple of the
    ratio's tokens, layer 2 on the ratio's (as the recorded per-layer counts show)."""
    layer1 = {}
    for factor in (2.0, 4.0):
        spec = BenchSpec(modes=["full", "blend"], ratios=[0.1], contexts=["prefix"],
                         check_layers=(1, 2), start_factor=factor, max_new_tokens=1)
        rag = RagKV(make_config(tmp_path / f"home{factor:g}"), engine=engine)
        try:
            out = run_bench(rag, _cases()[:1], spec)
        finally:
            rag.index.close()
        assert out["meta"]["spec"]["start_factor"] == factor
        (blend,) = [r for r in out["cases"] if r["mode"] == "blend"]
        counts = blend["recomputed_per_layer"]
        assert counts[0] > counts[1] > counts[2]
        layer1[factor] = counts[1] - counts[2]  # beyond the ratio's tokens
    assert layer1[4.0] == pytest.approx(3 * layer1[2.0], abs=2)


@pytest.mark.parametrize("tokens", [1280, 2000])
def test_the_long_prompt_holds_the_tokens_asked_for(tmp_path, engine, tokens):
    """``--long-context N`` times a prompt of N tokens (it stopped up to a chunk short: 795
    tokens for 1,280), the last chunk cut to what is left."""
    from ragkv.bench import long_context

    rag = RagKV(make_config(tmp_path / "home"), engine=engine)
    try:
        out = long_context(rag, tokens, max_new_tokens=1)
    finally:
        rag.index.close()
    assert out["context_tokens"] == tokens and out["chunks"] > 1
