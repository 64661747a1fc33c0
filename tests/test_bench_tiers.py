"""The bench times every run from the same cache tier: a cache filled by an earlier process
(blob storage only) must not make the first run after full prefill pay the read alone."""

from __future__ import annotations

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
