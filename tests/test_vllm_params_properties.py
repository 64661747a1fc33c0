"""Property tests of the vLLM fusion-parameter parser: the parameters arrive from any HTTP
client of a served vLLM, so no input may raise anything but ``ParamsError``."""

from __future__ import annotations

import re
from typing import Any

import pytest
from hypothesis import assume, example, given
from hypothesis import strategies as st
from property_cases import fast

from ragkv.config import BlendConfig
from ragkv.engine.policies import REGISTRY, reads_question
from ragkv.engine.vllm.params import (
    FUSED_MODES,
    MAX_ANCHOR,
    FusionParams,
    ParamsError,
    fusion_salt,
    parse,
)

HEX64 = re.compile(r"[0-9a-f]{64}")
VOCAB = 49152  # SmolLM2's vocabulary
# ---- vLLM fusion parameters --------------------------------------------------------------------

keys64 = st.text(alphabet="0123456789abcdef", min_size=64, max_size=64)
NAMES = ["mode", "prefix_end", "chunks", "suffix_start", "context", "blend", "save", "record",
         "describe", "contains", "ratio", "min_ratio", "policy", "check_layers",
         "deviation_on", "head_tokens", "reference_end", "preselect", "preselect_from",
         "preselect_by"]
WORDS = ["blend", "reuse", "prefix", "cold", "auto", "k", "v", "kv", "question", "context",
         *REGISTRY]
json_leaves = st.one_of(st.none(), st.booleans(), st.integers(), st.integers(-3, 40),
                        st.floats(), st.text(max_size=70), keys64, st.sampled_from(WORDS))
json_values = st.recursive(
    json_leaves,
    lambda inner: st.one_of(st.lists(inner, max_size=5),
                            st.dictionaries(st.one_of(st.sampled_from(NAMES), st.text(max_size=6)),
                                            inner, max_size=6)),
    max_leaves=25)
prompt_lengths = st.integers(0, 300)


def _span_list(draw, lo: int, hi: int, max_spans: int) -> list[list]:
    """Ordered, non-overlapping [start, end, key] spans inside [lo, hi)."""
    cuts = sorted(draw(st.sets(st.integers(lo, hi), min_size=2, max_size=2 * max_spans)))
    pairs = [cuts[i:i + 2] for i in range(0, len(cuts) - 1, 2)]
    return [[s, e, draw(keys64)] for s, e in pairs]


@st.composite
def valid_bodies(draw) -> tuple[dict, int]:
    """A well-formed ``{"ragkv": ...}`` and its prompt length (fused, save-only, question)."""
    n = draw(st.integers(4, 300))
    context = draw(st.sampled_from(["prefix", "cold", "anchor"]))
    kind = draw(st.sampled_from(["fused", "fused", "fused", "save", "describe", "contains"]))
    if kind == "describe":
        return {"ragkv": {"describe": True, "context": context}}, n
    if kind == "contains":
        # (an empty "contains" parses, but to_json leaves it out: no round trip; harmless)
        return {"ragkv": {"contains": draw(st.lists(keys64, min_size=1, max_size=4)),
                          "context": context}}, n
    if kind == "save":
        save = _span_list(draw, 0, n, 3)
        body = {"save": save, "context": context}
        if save[0][0] and draw(st.booleans()):
            body["reference_end"] = draw(st.integers(1, save[0][0]))
        return {"ragkv": body}, n
    prefix_end = draw(st.integers(1, n - 3))
    suffix_start = draw(st.integers(prefix_end + 1, n - 1))
    chunks = _span_list(draw, prefix_end, suffix_start, 5)
    body: dict[str, Any] = {"mode": draw(st.sampled_from(FUSED_MODES)), "prefix_end": prefix_end,
                            "chunks": chunks, "suffix_start": suffix_start, "context": context}
    if context == "anchor":
        body["anchor"] = draw(st.lists(st.integers(0, VOCAB - 1), min_size=1, max_size=8))
    blend = {}
    for name, values in (("ratio", st.floats(0, 1)), ("min_ratio", st.floats(0, 1)),
                         ("policy", st.sampled_from(sorted(REGISTRY))),
                         ("check_layers", st.lists(st.integers(1, 40), min_size=1, max_size=3)),
                         ("deviation_on", st.sampled_from(["k", "v", "kv"])),
                         ("head_tokens", st.integers(0, 16))):
        if draw(st.booleans()):
            blend[name] = draw(values)
    if blend or draw(st.booleans()):
        body["blend"] = blend
    if draw(st.booleans()):
        body["record"] = draw(st.booleans())
    return {"ragkv": body}, n


def _mutate(draw, body: dict) -> None:
    """One change a careless or hostile client could make to a ragkv body."""
    target = body
    if "blend" in body and isinstance(body["blend"], dict) and draw(st.booleans()):
        target = body["blend"]
    op = draw(st.sampled_from(["set", "set", "drop", "span", "nudge", "bool", "retype"]))
    names = list(target) or ["mode"]
    name = draw(st.sampled_from(sorted(set(names) | set(NAMES))))
    if op == "set":
        target[name] = draw(json_values)
    elif op == "drop":
        target.pop(name, None)
    elif op == "span" and isinstance(body.get("chunks") or body.get("save"), list):
        spans = body.get("chunks") or body.get("save")
        if spans:
            i = draw(st.integers(0, len(spans) - 1))
            if isinstance(spans[i], list) and spans[i]:
                j = draw(st.integers(0, len(spans[i]) - 1))
                spans[i][j] = draw(st.one_of(json_values, st.integers(-2, 310)))
            if draw(st.booleans()):
                spans.insert(draw(st.integers(0, len(spans))), draw(json_values))
    elif op == "nudge" and isinstance(target.get(name), int | float):
        target[name] = target[name] + draw(st.sampled_from([-2, -1, 1, 2, 0.5, 10**30]))
    elif op == "bool":
        target[name] = draw(st.booleans())
    elif op == "retype":  # the same number as another JSON type: 3 -> true, 3.0, 3.5, "3"
        numbers = [k for k, v in target.items() if isinstance(v, int | float | list)]
        if numbers:
            k = draw(st.sampled_from(sorted(numbers)))
            v = target[k]
            if isinstance(v, list) and v:
                i = draw(st.integers(0, len(v) - 1))
                if isinstance(v[i], int | float):
                    v[i] = draw(st.sampled_from([bool(v[i]), float(v[i]), v[i] + 0.5,
                                                 str(v[i])]))
            elif isinstance(v, int | float):
                target[k] = draw(st.sampled_from([bool(v), float(v), v + 0.5, str(v)]))


@st.composite
def mutated_bodies(draw) -> tuple[Any, int]:
    transfer, n = draw(valid_bodies())
    for _ in range(draw(st.integers(1, 3))):
        _mutate(draw, transfer["ragkv"])
    return transfer, draw(st.one_of(st.just(n), st.integers(0, n + 2)))


def _parse_checked(transfer: Any, n: int) -> FusionParams | None:
    """parse() under its contract: None, FusionParams or ParamsError, and a usable result."""
    try:
        p = parse(transfer, n)
    except ParamsError:
        return None
    if p is None:
        assert not isinstance(transfer, dict) or "ragkv" not in transfer
        return None
    assert isinstance(p, FusionParams)
    assert p.context in ("prefix", "cold", "anchor")
    assert all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in p.anchor)
    assert p.anchor or p.context != "anchor" or not p.chunks
    for spans in (p.chunks, p.save):
        prev = 0
        for s in spans:
            assert isinstance(s.key, str) and len(s.key) == 64
            assert 0 <= prev <= s.start < s.end <= n, "inside the prompt, ordered, disjoint"
            prev = s.end
    if p.chunks:
        assert p.mode in FUSED_MODES
        assert 0 < p.prefix_end <= p.chunks[0].start
        assert p.chunks[-1].end <= p.suffix_start < n, "the suffix's last token is computed"
    ids = list(range(n))
    salt = fusion_salt(p, ids)  # never raises on a parsed object
    assert salt.startswith("ragkv-fusion:") and HEX64.fullmatch(salt.split(":", 1)[1])
    assert fusion_salt(p, ids) == salt
    return p


UNHASHABLE_POLICY = {"ragkv": {"mode": "blend", "prefix_end": 2, "chunks": [[2, 5, "a" * 64]],
                               "suffix_start": 5, "blend": {"policy": ["qhkvd"]}}}


@fast()
@given(body=json_values, n=prompt_lengths)
@example(body=UNHASHABLE_POLICY["ragkv"], n=8)
@example(body={"mode": "blend", "prefix_end": 2, "chunks": [[2, 5, "a" * 64]],
               "suffix_start": 5, "blend": {"policy": {}}}, n=8)
def test_parse_arbitrary_json(body: Any, n: int) -> None:
    _parse_checked({"ragkv": body}, n)


@fast()
@given(transfer=json_values, n=prompt_lengths)
def test_parse_arbitrary_transfer(transfer: Any, n: int) -> None:
    _parse_checked(transfer, n)


@fast()
@given(case=mutated_bodies())
def test_parse_mutated_bodies(case: tuple[Any, int]) -> None:
    _parse_checked(*case)


def test_parse_refuses_an_unhashable_policy() -> None:
    """Found by test_parse_arbitrary_json: ``blend.policy`` a list or an object made parse
    raise TypeError (unhashable) out of the registry lookup, past the scheduler's ``except
    ParamsError``; any HTTP client of a served vLLM could send it."""
    for policy in (["qhkvd"], {"a": 1}):
        body = {**UNHASHABLE_POLICY["ragkv"], "blend": {"policy": policy}}
        with pytest.raises(ParamsError):
            parse({"ragkv": body}, 8)


@fast()
@given(case=st.one_of(valid_bodies(), mutated_bodies()))
@example(case=({"ragkv": {"mode": "blend", "prefix_end": 2, "chunks": [[2, 5, "a" * 64]],
                          "suffix_start": 5, "blend": {"check_layers": [1.5]}}}, 8))
@example(case=({"ragkv": {"mode": "blend", "prefix_end": 2, "chunks": [[2, 5, "a" * 64]],
                          "suffix_start": 5, "blend": {"head_tokens": "x"}}}, 8))
def test_parse_gives_blend_settings_the_worker_can_use(case: tuple[Any, int]) -> None:
    """Every number the worker computes with is a real int (not a bool, float or string)."""
    p = _parse_checked(*case)
    if p is None or not p.chunks:
        return
    def is_int(x: object) -> bool:
        return isinstance(x, int) and not isinstance(x, bool)

    b = p.blend
    assert is_int(p.prefix_end) and is_int(p.suffix_start)
    assert isinstance(b.ratio, int | float) and not isinstance(b.ratio, bool)
    assert 0.0 <= b.ratio <= 1.0 and 0.0 <= b.min_ratio <= 1.0
    assert b.check_layers and all(is_int(x) and x >= 1 for x in b.check_layers)
    assert is_int(b.head_tokens) and b.head_tokens >= 0
    assert b.policy in REGISTRY and b.deviation_on in ("k", "v", "kv")


@fast()
@given(case=valid_bodies())
def test_valid_bodies_parse_and_round_trip(case: tuple[dict, int]) -> None:
    transfer, n = case
    p = _parse_checked(transfer, n)
    assert p is not None, transfer
    body = transfer["ragkv"]
    if "chunks" in body:
        assert [[s.start, s.end, s.key] for s in p.chunks] == body["chunks"]
        assert (p.prefix_end, p.suffix_start) == (body["prefix_end"], body["suffix_start"])
        assert list(p.anchor) == body.get("anchor", [])
        raw = body.get("blend", {})
        assert p.blend == BlendConfig(**{**raw, "check_layers": tuple(raw.get(
            "check_layers", BlendConfig.check_layers))})
    assert parse(p.to_json(), n) == p


@fast()
@given(case=valid_bodies(), other=st.lists(st.integers(0, VOCAB - 1), min_size=1, max_size=8))
def test_fusion_salt_names_the_fusion_not_the_tokens(case: tuple[dict, int],
                                                     other: list[int]) -> None:
    """The salt ignores the context tokens (vLLM hashes those itself) and covers the question
    exactly when the blend policy reads it."""
    transfer, n = case
    p = parse(transfer, n)
    assume(p is not None and p.fused)
    ids = list(range(n))
    salt = fusion_salt(p, ids)
    before = [t + 1 for t in ids[:p.suffix_start]] + ids[p.suffix_start:]
    assert fusion_salt(p, before) == salt
    after = ids[:p.suffix_start] + [(t + 7) % VOCAB for t in ids[p.suffix_start:]]
    reads = p.mode == "blend" and reads_question(p.blend)
    assert (fusion_salt(p, after) != salt) == reads
    assert fusion_salt(p, ids[:p.suffix_start] + other) == salt or reads


def test_an_anchor_context_fusion_carries_the_anchor_ids() -> None:
    body = {"mode": "blend", "prefix_end": 2, "chunks": [[2, 5, "a" * 64]], "suffix_start": 6,
            "context": "anchor"}
    with pytest.raises(ParamsError, match="needs the anchor passage's token ids"):
        parse({"ragkv": body}, 8)
    for bad in ([1, -2], [1, True], "12", [1.5], [0] * (MAX_ANCHOR + 1)):
        with pytest.raises(ParamsError, match="'anchor' must be a list of at most"):
            parse({"ragkv": {**body, "anchor": bad}}, 8)
    p = parse({"ragkv": {**body, "anchor": [7, 8, 9]}}, 8)
    assert p is not None and p.anchor == (7, 8, 9) and p.context == "anchor"
    assert parse(p.to_json(), 8) == p
    # the keys name the anchor; the salt need not (same keys, same fusion)
    assert fusion_salt(p, list(range(8))) == fusion_salt(
        parse({"ragkv": {**body, "anchor": [7]}}, 8), list(range(8)))


def test_a_fused_request_saves_nothing() -> None:
    """Saved, the fused KV would replace a prefill's under the exact key a later query trusts
    (any HTTP client could send both; ragkv's own never does)."""
    body = {"mode": "reuse", "prefix_end": 2, "chunks": [[2, 5, "a" * 64]], "suffix_start": 6,
            "save": [[2, 5, "b" * 64]]}
    with pytest.raises(ParamsError, match="names 'chunks' to fuse or spans to 'save', not both"):
        parse({"ragkv": body}, 8)


def test_a_save_names_the_entry_its_spans_are_scored_against() -> None:
    body = {"save": [[3, 6, "a" * 64]], "context": "anchor"}
    for bad in (-1, 4, True, "2", 1.5):
        with pytest.raises(ParamsError, match="'reference_end' must be an integer"):
            parse({"ragkv": {**body, "reference_end": bad}}, 8)
    p = parse({"ragkv": {**body, "reference_end": 2}}, 8)
    assert p is not None and p.reference_end == 2 and parse(p.to_json(), 8) == p
    assert parse({"ragkv": body}, 8).reference_end == 0


def test_the_salt_names_the_preselection() -> None:
    body = {"mode": "blend", "prefix_end": 2, "chunks": [[2, 5, "a" * 64]], "suffix_start": 6}
    salts = {fusion_salt(parse({"ragkv": {**body, "blend": blend}}, 8), list(range(8)))
             for blend in ({}, {"preselect": 3.0}, {"preselect": 4.0}, {"preselect_from": 9},
                           {"preselect_from": None}, {"preselect_by": "question"},
                           {"preselect_by": "context"})}
    assert len(salts) == 7
    for bad in (0.5, "3", True):
        with pytest.raises(ParamsError, match="preselect must be a number >= 1"):
            parse({"ragkv": {**body, "blend": {"preselect": bad}}}, 8)
    for bad in (0, 2.5, "9", True):
        with pytest.raises(ParamsError, match="preselect_from must be a whole number"):
            parse({"ragkv": {**body, "blend": {"preselect_from": bad}}}, 8)
    for bad in ("answer", 1, None):
        with pytest.raises(ParamsError, match="preselect_by must be one of"):
            parse({"ragkv": {**body, "blend": {"preselect_by": bad}}}, 8)
