"""``ragkv bench`` on what users hand it: case files and options that ran to a traceback, ran
on a shorter prompt than the case's, or lost the results after the run; and a table that
tells every variant apart."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from test_cli import run, runner

from ragkv.cli import app


def _one_case(tmp_path: Path, **case) -> Path:
    path = tmp_path / "cases.jsonl"
    path.write_text(json.dumps({"id": "a", "chunks": ["One chunk of text."], "question": "What?",
                                **case}) + "\n")
    return path


def _bench(tmp_path: Path, model: Path | None, cases: Path, *args: str):
    more = ["--model", str(model)] if model is not None else []
    return runner.invoke(app, ["bench", "--cases", str(cases), "--home", str(tmp_path), *more,
                               *args])


@pytest.mark.parametrize(("content", "says"), [
    # tracebacks before: RecursionError, the tokenizer's TypeError
    ("[" * 100_000 + "]" * 100_000 + "\n", "cases.jsonl:1: not JSON (maximum recursion"),
    ('{"id": "a", "chunks": ["x \\ud800 y"], "question": "q"}\n',
     "cases.jsonl:1: chunk 0 is not valid text"),
    # ran, the two cases' records telling nothing apart
    ('{"id": "a", "chunks": ["x"], "question": "q"}\n{"id": "a", "chunks": ["y"], '
     '"question": "q"}\n', "cases.jsonl:2: id 'a' is line 1's too; ids are unique"),
    ('{"id": [1], "chunks": ["x"], "question": "q"}\n', "'id' must be a non-empty string"),
])
def test_bad_case_files_are_one_line(tmp_path: Path, content: str, says: str) -> None:
    cases = tmp_path / "cases.jsonl"
    cases.write_text(content)
    result = _bench(tmp_path, None, cases)
    assert result.exit_code == 2, result.output
    assert says in " ".join(result.output.split())
    assert len(result.output.strip().splitlines()) == 1, result.output


def test_json_lines_may_hold_raw_line_separators() -> None:
    """A raw U+2028 (or U+0085) inside a string is JSON text: the line was refused as "not
    JSON", and later lines were numbered wrong."""
    import tempfile

    from ragkv.bench import load_cases

    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "c.jsonl"
        path.write_text('{"id": "a", "chunks": ["one\u2028two\u0085"], "question": "q"}\n'
                        '{"chunks": ["x"], "question": "q"}\n', encoding="utf-8")
        cases = load_cases(path)
    assert cases[0]["chunks"] == ["one\u2028two\u0085"] and cases[1]["id"] == "case-2"


@pytest.mark.parametrize(("args", "says"), [
    (["--ratios", "0.12,0.12"], "ratios name 0.12 twice"),  # ran every variant twice
    (["--modes", "full,blend,blend"], "modes name 'blend' twice"),
    (["--policies", "hkvd,hkvd"], "policies name 'hkvd' twice"),
    (["--floor-ratio", "0.1"], "floor_ratio sets the budget of the coverage guard"),
    (["--start-factor", "nan", "--check-layers", "1,2"], "start_factor must be a number"),
    (["--out", "x" * 300 + ".json"], "cannot be written (File name too long)"),  # traceback
    # passed the check, then lost a finished run's results
    (["--out", "/proc/version"], "--out /proc/version: cannot be written"),
    (["--long-context", "8190"], "--long-context 8,190 is more than the model's window"),
])
def test_bench_options_are_refused_before_the_run(tmp_path: Path, tiny_model: Path,
                                                  args: list[str], says: str) -> None:
    result = _bench(tmp_path, tiny_model, _one_case(tmp_path), *args)
    assert result.exit_code == 2 and says in " ".join(result.output.split()), result.output
    assert "precompute" not in result.output


def test_a_case_over_the_window_is_refused_not_cut(tmp_path: Path, tiny_model: Path) -> None:
    """A case longer than the window was measured on the chunks that fitted, saying nothing."""
    cases = _one_case(tmp_path, chunks=["A long passage about many things. " * 700] * 2)
    result = _bench(tmp_path, tiny_model, cases, "--modes", "full,blend", "--ratios", "0.5")
    said = " ".join(result.output.split())
    assert result.exit_code == 2 and "case 'a': its prompt takes" in said, result.output
    assert "more than the model's window leaves after the answer budget (8,160)" in said


def test_a_chunk_of_no_tokens_names_its_case(tmp_path: Path, tiny_model: Path) -> None:
    result = _bench(tmp_path, tiny_model, _one_case(tmp_path, chunks=["Text.", "\u0004"]))
    said = " ".join(result.output.split())
    assert result.exit_code == 2 and "case 'a': chunk 1 has no tokens" in said, result.output


def test_the_table_names_the_correction_and_the_contains_rate(tmp_path: Path,
                                                              tiny_model: Path) -> None:
    """Two corrections printed two rows alike ("anchor blend qhkvd 0.12"); the answer-contains
    rate was in the JSON only."""
    cases = _one_case(tmp_path, answer="chunk")
    said = run("bench", "--cases", str(cases), "--home", str(tmp_path), "--model",
               str(tiny_model), "--modes", "full,blend", "--ratios", "0.5", "--corrections",
               "none,local_mean", "--max-new-tokens", "2")
    rows = [line.split() for line in said.splitlines() if line.split()[:2] == ["anchor", "blend"]]
    assert sorted(r[4] for r in rows) == ["local_mean", "none"], said
    assert "contains" in said
