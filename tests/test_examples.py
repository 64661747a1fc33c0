"""The scripts in ``examples/`` run as a user runs them, on the real SmolLM2, and print what
their docstrings promise: both modes' answers with their cache figures, and the integrations'
events and streamed answer. Each gets a home of its own (the model folder linked in, so
nothing is converted again) through ``RAGKV_HOME``, as a user would move it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def run_example(name: str, home: Path, smol_path: Path) -> str:
    home.mkdir()
    (home / "models").symlink_to(smol_path.parent, target_is_directory=True)
    env = {**os.environ, "RAGKV_HOME": str(home)}
    done = subprocess.run([sys.executable, str(EXAMPLES / name)], env=env, text=True,
                          capture_output=True, timeout=900)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    return done.stdout


def test_quickstart(tmp_path: Path, smol_path: Path) -> None:
    out = run_example("quickstart.py", tmp_path / "home", smol_path)
    lines = {ln.split("]")[0] + "]": ln for ln in out.splitlines() if ln.startswith("[")}
    assert "hits 0/3" in lines["[full]"], out  # full prefill reads no cache
    assert "hits 3/3" in lines["[blend]"], out  # ingestion stored every retrieved chunk
    recomputed, total = lines["[blend]"].split("recomputed ")[1].split(" ")[0].split("/")
    assert 0 < int(recomputed) < int(total) / 4, out


@pytest.mark.parametrize(("name", "event"), [("langchain_runnable.py", "[event] TTFT"),
                                            ("llamaindex_query_engine.py", "[event] TTFT")])
def test_integration_examples(tmp_path: Path, smol_path: Path, name: str, event: str) -> None:
    pytest.importorskip("langchain_core" if "langchain" in name else "llama_index.core")
    out = run_example(name, tmp_path / "home", smol_path)
    assert out.startswith("engine: transformers in process"), out[:300]
    assert "[full] TTFT" in out and "[blend] TTFT" in out and event in out, out
    streamed = out.split("[blend, streaming]", 1)[1]
    assert len(streamed.strip()) > 20, out  # the streamed answer arrived


@pytest.mark.parametrize("name", ["langchain_runnable.py", "llamaindex_query_engine.py"])
@pytest.mark.parametrize(("engine", "code", "said"), [
    ("http://127.0.0.1:9/v1", 1, "error: the vLLM server at http://127.0.0.1:9/v1 did not answer"),
    ("vlm", 2, "error: engine must be 'hf', 'vllm' or the http(s):// URL"),
])
def test_integration_examples_fail_in_one_line(tmp_path: Path, name: str, engine: str, code: int,
                                               said: str) -> None:
    """A server that is down, or a mistyped --engine, is the example's one line: exit 1 for
    the engine, argparse's exit 2 for the user's typo; never a traceback."""
    pytest.importorskip("langchain_core" if "langchain" in name else "llama_index.core")
    done = subprocess.run([sys.executable, str(EXAMPLES / name), "--engine", engine,
                           "--home", str(tmp_path / "home")], text=True, capture_output=True,
                          timeout=300)
    assert done.returncode == code, done.stderr[-3000:]
    assert said in done.stderr and "Traceback" not in done.stderr, done.stderr[-3000:]
    assert done.stdout == ""
