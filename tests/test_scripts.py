"""The benchmark and example scripts name what ragkv has: a name moved between modules broke
``benchmarks/scaling.py`` and ``benchmarks/vllm_workload.py`` at their first line, and no test
ran them (they need minutes, or vLLM). The README's table maker reads every engine's results."""

from __future__ import annotations

import ast
import importlib
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = sorted(p for folder in ("benchmarks", "examples") for p in (ROOT / folder).rglob("*.py"))


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_name_a_script_imports_from_ragkv_exists(script: Path) -> None:
    missing = []
    for node in ast.walk(ast.parse(script.read_text())):
        if not (isinstance(node, ast.ImportFrom) and (node.module or "").startswith("ragkv")):
            continue
        module = importlib.import_module(node.module)
        for alias in node.names:
            if not hasattr(module, alias.name):
                try:
                    importlib.import_module(f"{node.module}.{alias.name}")
                except ImportError:
                    missing.append(f"{node.module}.{alias.name}")
    assert not missing, missing


def test_the_summary_table_shows_a_dash_where_an_engine_has_no_figure(tmp_path, capsys):
    """vLLM's bench results have no teacher-forced figures (None): the table said so with a
    TypeError."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import summarize
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    row = {"context": "anchor", "mode": "blend", "policy": "qhkvd", "ratio": 0.12,
           "correction": "local_mean", "recomputed_share": 0.118, "speedup_median": 3.36,
           "first_token_agree": 1.0, "first_token_kl_median": 0.0106, "tf_agree": None,
           "tf_kl_median": None, "rouge_l": 0.625, "contains": None}
    results = tmp_path / "vllm.json"
    results.write_text(json.dumps({"summary": [row]}))
    summarize.main([str(results)])
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last == ("| anchor | blend | qhkvd | 0.12 | local_mean | 11.8% | x3.36 | 1.000 "
                    "| 0.0106 | - | - | 0.625 | - |")


@pytest.mark.parametrize(("args", "said"), [
    (["ingest_bench.py", "--chunks", "-3"], "argument --chunks: must be at least 1, got -3"),
    (["loading_bench.py", "--reps", "0"], "argument --reps: must be at least 1, got 0"),
    (["storage_bench.py", "--repeats", "x"], "argument --repeats: 'x' is not a whole number"),
    (["frontier.py", "r.json", "--out", "TMP"], "argument --out: TMP is a folder: name a file"),
    (["correction_lab.py", "--out", "TMP/f/x.jsonl"], "argument --out: cannot write TMP/f/x"),
])
def test_benchmark_misuse_is_one_line_before_any_work(tmp_path: Path, args: list[str],
                                                      said: str) -> None:
    """A count below one ran and wrote ratios measured over 0 tokens, or failed with a
    traceback after the run; an --out that cannot be written failed after the run."""
    import subprocess

    (tmp_path / "f").write_text("a file where a folder should be")
    args = [a.replace("TMP", str(tmp_path)) for a in args]
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / args[0]), *args[1:]],
                          capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert done.returncode == 2, done.stderr[-2000:]
    assert said.replace("TMP", str(tmp_path)) in done.stderr.splitlines()[-1], done.stderr
    assert "Traceback" not in done.stderr and not list(tmp_path.glob("*.json"))
