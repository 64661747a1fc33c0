"""Guards of the exactness checks: a broken guarantee must make them FAIL.

Each guard first runs the checks of ``test_engine_exactness.py`` on the intact engine (they
pass), then injects one bug into the fused path only (never into the model's own forward, which
is the reference) and asserts that the very same checks raise, with the first-token logits
alone off by far more than TOL (so a check that compared logits only would catch it too):

* (a) cached keys re-encoded one position off (the kernel set's ``rope``);
* (b) a mask one key too wide: query at p also sees key p + 1 (``attend_selected``);
* (c) a wrong RoPE scaling scheme: default-RoPE tables on a llama3/YaRN/linear model, for the
  cached keys only (``rope``) or for the whole fused path (``cos_sin``).

The three exact paths checked: ratio 1.0 over a 3-chunk prompt (a cached exact prefix), prefix
mode, and one cold chunk placed first and reused with no recompute (docs/design.md §3.3-3.5).
"""

from __future__ import annotations

import pytest
import test_engine_exactness as exactness
import torch
from engine_cases import (  # noqa: F401 - fixtures are used by name
    MODELS,
    TOL,
    Case,
    _case,
    _engine,
    _ids,
    _one_thread,
    _Tok,
    assemble,
    assert_same_prefill,
    bf16_tolerance,
    blend,
    case,
    engine,
    make_case,
    make_model,
    max_diff,
)

from ragkv.config import BlendConfig
from ragkv.engine.blend import FusedPrefill
from ragkv.engine.hf import HFEngine
from ragkv.engine.kernels.reference import sdpa

# A broken path must move the first-token logits by at least this much: 100 x TOL, over 1000x
# what the intact paths differ by (<= 4.4e-6, see engine_cases.TOL). The injected bugs below move
# them by 0.04 (a one-key mask error seen by the 6 suffix queries only) to 3.6 on these models.
GUARD = 100 * TOL

SCALED = [m for m in MODELS if m in ("llama3-rope", "yarn-rope", "linear-rope")]


def _exact_paths(engine: HFEngine, case: Case) -> dict[str, tuple[FusedPrefill, FusedPrefill]]:
    """(fused, full prefill) for every path that must equal full prefill."""
    p = case.prompt
    g = torch.Generator().manual_seed(7)
    chunk, suffix = _ids(g, 30), _ids(g, 6)
    one_chunk = assemble([], [chunk], suffix)
    return {
        "ratio-1.0": (blend(engine, case, BlendConfig(ratio=1.0)), case.full),
        "prefix": (engine.prefill(p, case.cached[:1], "prefix", BlendConfig(), p.prefix_len),
                   case.full),
        "reuse-first": (engine.prefill(one_chunk, [(0, engine.precompute(chunk))], "reuse",
                                       BlendConfig(), 0),
                        engine.prefill(one_chunk, [], "full", BlendConfig(), 0)),
    }


def _exactness_tests(engine: HFEngine, case: Case) -> None:
    """The exactness tests themselves, called as they run in test_engine_exactness.py."""
    exactness.test_blend_ratio_one_equals_full(engine, case)
    exactness.test_prefix_mode_equals_full(engine, case)
    exactness.test_reuse_of_one_chunk_placed_first_equals_full(engine)
    exactness.test_chunk_precomputed_after_prefix_is_exact(engine, case)


def _assert_guard(engine: HFEngine, case: Case, inject) -> None:
    """Intact: every exact path passes. Broken by ``inject()``: every path fails the same
    check by a clear margin, and so does each exactness test."""
    for got, want in _exact_paths(engine, case).values():
        assert_same_prefill(got, want)
    _exactness_tests(engine, case)
    inject()
    for name, (got, want) in _exact_paths(engine, case).items():
        with pytest.raises(AssertionError):
            assert_same_prefill(got, want)
        assert max_diff(got.logits, want.logits) > GUARD, name
    for test in (exactness.test_blend_ratio_one_equals_full, exactness.test_prefix_mode_equals_full,
                 exactness.test_chunk_precomputed_after_prefix_is_exact):
        with pytest.raises(AssertionError):
            test(engine, case)
    with pytest.raises(AssertionError):
        exactness.test_reuse_of_one_chunk_placed_first_equals_full(engine)


# ---- (a) one-position RoPE shift of the cached keys ----------------------------------------

def test_guard_rope_shift_of_cached_keys(monkeypatch, engine, case):
    runner = engine.runner
    rope = runner.ops.rope

    def shifted(x, cos, sin, positions=None, out=None):
        pos = torch.arange(x.shape[-2]) if positions is None else positions
        c, s = runner.cos_sin(pos.to(runner.device) + 1)  # every cached key lands at p + 1
        return rope(x, c, s, None, out)

    _assert_guard(engine, case, lambda: monkeypatch.setattr(runner.ops, "rope", shifted))


# ---- (b) mask one key too wide -------------------------------------------------------------

def _attend_one_too_many(q, k, v, q_pos, scale):
    """Selected-query attention where query i also sees key q_pos[i] + 1."""
    seen = torch.arange(k.shape[1], device=k.device)[None, :] <= q_pos[:, None] + 1
    return sdpa(q, k, v, seen, scale).transpose(0, 1)


def test_guard_mask_one_key_too_wide(monkeypatch, engine, case):
    ops = engine.runner.ops
    _assert_guard(engine, case,
                  lambda: monkeypatch.setattr(ops, "attend_selected", _attend_one_too_many))


def test_guard_mask_also_fails_the_attention_unit_checks(monkeypatch):
    """The unit tests of attend (every code path vs a float64 reference) fail too."""
    engine = _engine("llama")
    exactness.test_attend_matches_naive_reference(engine, "sparse")
    monkeypatch.setattr(engine.runner.ops, "attend_selected", _attend_one_too_many)
    for kind in ("tail", "sparse", "sparse-with-last"):
        with pytest.raises(AssertionError):
            exactness.test_attend_matches_naive_reference(engine, kind)


# ---- (c) wrong RoPE scaling scheme ---------------------------------------------------------

def _default_rope_tables(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin of positions 0..n-1 from a default-RoPE model of the same head_dim and theta."""
    return _engine("llama").runner.cos_sin(torch.arange(n))


@pytest.mark.parametrize("name", SCALED)
@pytest.mark.parametrize("where", ["cached-keys", "whole-fused-path"])
def test_guard_default_rope_on_a_scaled_model(monkeypatch, name, where):
    engine, case = _engine(name), _case(name)
    runner = engine.runner
    cos_sin, rope = runner.cos_sin, runner.ops.rope
    # The scheme really differs over the prompt's positions: the guard tests something.
    T = len(case.prompt)
    assert max_diff(_default_rope_tables(T)[0], cos_sin(torch.arange(T))[0]) > 0.1

    def default_rope(x, cos, sin, positions=None, out=None):
        c, s = _default_rope_tables(cos.shape[0])
        return rope(x, c, s, positions, out)

    def default_cos_sin(positions):
        c, s = _default_rope_tables(int(positions.max()) + 1)
        return c[positions], s[positions]

    def inject():
        if where == "cached-keys":
            monkeypatch.setattr(runner.ops, "rope", default_rope)
        else:
            monkeypatch.setattr(runner, "cos_sin", default_cos_sin)

    _assert_guard(engine, case, inject)


# ---- bf16 ----------------------------------------------------------------------------------

def test_guard_bf16_tolerance_still_catches_a_rope_shift(monkeypatch):
    """The bf16 smoke test's tolerance (rounding only) is far below a one-position error."""
    eng = HFEngine(make_model("llama").to(torch.bfloat16), _Tok())
    c = make_case(eng)
    tol = bf16_tolerance(c.full.logits)
    assert max_diff(blend(eng, c, BlendConfig(ratio=1.0)).logits, c.full.logits) < tol
    runner, rope = eng.runner, eng.runner.ops.rope

    def shifted(x, cos, sin, positions=None, out=None):
        pos = torch.arange(x.shape[-2]) if positions is None else positions
        c_, s_ = runner.cos_sin(pos + 1)
        return rope(x, c_, s_, None, out)

    monkeypatch.setattr(runner.ops, "rope", shifted)
    assert max_diff(blend(eng, c, BlendConfig(ratio=1.0)).logits, c.full.logits) > 3 * tol
