"""How close a fused prefill's outputs are to full prefill: first-token KL shrinking as the
ratio grows, greedy decoding and teacher-forced scores after the fusion, a bf16 model (tiny
model matrix from ``engine_cases``)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from engine_cases import (  # noqa: F401 - fixtures are used by name
    _BASE,
    TOL,
    VOCAB,
    _one_thread,
    _Tok,
    bf16_tolerance,
    blend,
    case,
    engine,
    make_case,
    make_model,
    max_diff,
)
from transformers import LlamaConfig, LlamaForCausalLM

from ragkv.config import BlendConfig
from ragkv.engine.hf import HFEngine

# ---- statistical fidelity ------------------------------------------------------------------

def _kl(p_logits: torch.Tensor, q_logits: torch.Tensor) -> float:
    lp = F.log_softmax(p_logits.double(), -1)
    lq = F.log_softmax(q_logits.double(), -1)
    return float((lp.exp() * (lp - lq)).sum())


def test_blend_is_closer_to_full_than_reuse():
    """On a 6-layer random model with 60-token chunks, averaged over 3 prompts, first-token KL
    to full prefill shrinks as the recompute ratio grows: 1.0 < 0.3 <= 0.15 <= reuse.

    (Deterministic seeds; across 6 model seeds and two init scales blend@0.3 stayed at
    0.34-0.58x of reuse's KL, so the ordering is not a coin flip.)"""
    torch.manual_seed(99)
    cfg = LlamaConfig(**{**_BASE, "num_hidden_layers": 6, "initializer_range": 0.1})
    eng = HFEngine(LlamaForCausalLM(cfg).eval(), _Tok())
    kl: dict[str, list[float]] = {"1.0": [], "0.3": [], "0.15": [], "reuse": []}
    for seed in range(3):
        c = make_case(eng, seed=seed, lengths=[60, 60, 60])
        for name in ("1.0", "0.3", "0.15"):
            out = blend(eng, c, BlendConfig(ratio=float(name)))
            kl[name].append(_kl(c.full.logits, out.logits))
        kl["reuse"].append(_kl(c.full.logits, blend(eng, c, BlendConfig(), mode="reuse").logits))
    mean = {k: sum(v) / len(v) for k, v in kl.items()}
    assert all(math.isfinite(m) for m in mean.values())
    assert mean["1.0"] < 1e-8
    assert mean["reuse"] > 1e-3
    assert mean["0.3"] <= mean["0.15"] <= mean["reuse"], kl
    assert mean["0.3"] < 0.8 * mean["reuse"], kl


# ---- decode and score ----------------------------------------------------------------------

def test_decode_after_blend_one_matches_full(engine, case):
    b = blend(engine, case, BlendConfig(ratio=1.0))
    first_full = int(case.full.logits.argmax())
    assert int(b.logits.argmax()) == first_full
    want = engine.decode(case.full, first_full, 8)
    got = engine.decode(b, first_full, 8)
    assert got == want
    assert 1 <= len(got) <= 8 and got[0] == first_full


def test_decode_stops_at_eos(engine, case):
    first = int(case.full.logits.argmax())
    greedy = engine.decode(case.full, first, 6)
    assert len(greedy) >= 2
    stop = greedy[1]
    old = engine.eos_token_ids
    try:
        engine.eos_token_ids = {stop}
        stopped = engine.decode(case.full, first, 6)
    finally:
        engine.eos_token_ids = old
    assert stopped == greedy[:greedy.index(stop) + 1]


def test_score_rows(engine, case):
    b = blend(engine, case, BlendConfig(ratio=0.3))
    target = [5, 9, 13, 17]
    rows = engine.score(b, target)
    assert rows.shape == (len(target), VOCAB)
    assert torch.equal(rows[0], b.logits)
    assert engine.score(b, [5]).shape == (1, VOCAB)
    # Teacher forcing over the full cache equals the model run over prompt + target.
    full_rows = engine.score(case.full, target)
    with torch.inference_mode():
        ids = torch.tensor([case.prompt.ids + target[:-1]])
        ref = engine.model(input_ids=ids).logits[0, len(case.prompt) - 1:].float()
    assert max_diff(full_rows, ref) < TOL
    # ... and from the ratio-1.0 fusion too.
    assert max_diff(engine.score(blend(engine, case, BlendConfig(ratio=1.0)), target), ref) < TOL


# ---- bf16 smoke ----------------------------------------------------------------------------

def test_bf16_model_blends():
    eng = HFEngine(make_model("llama").to(torch.bfloat16), _Tok())
    c = make_case(eng)
    assert c.cached[1][1].k.dtype == torch.bfloat16
    one = blend(eng, c, BlendConfig(ratio=1.0))
    assert one.k[0].dtype == torch.bfloat16
    # bf16 rounding only (see bf16_tolerance: ~0.12 here, for logits up to ~3; measured 0.05);
    # test_engine_guards checks a one-position RoPE error exceeds it several times over.
    assert max_diff(one.logits, c.full.logits) < bf16_tolerance(c.full.logits)
    part = blend(eng, c, BlendConfig(ratio=0.15))
    assert torch.isfinite(part.logits).all()
