"""A program that runs ragkv on vLLM in process exits when it is done (``make test-vllm``).

vLLM keeps its engine core in a child process; a command or script that left it open waited
on it at interpreter exit for good. Each test runs a program of its own, which must exit 0
within the timeout.
"""

from __future__ import annotations

import pytest
from vllm_cases import CHUNKS, QUESTION

pytestmark = pytest.mark.vllm


def _exits_in_time(*args: str) -> str:
    """Run ``python ARGS`` with ragkv on vLLM in process as a program of its own, which must
    exit 0 within the timeout; its stdout."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "VLLM_CPU_NUM_OF_RESERVED_CPU": "0"}
    proc = subprocess.run([sys.executable, *args], env=env, capture_output=True, text=True,
                          timeout=480)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    return proc.stdout


def _model() -> str:
    from ragkv.config import default_home
    from ragkv.model_fetch import ensure_default_model

    return str(ensure_default_model(default_home()))


def test_a_cli_command_on_vllm_in_process_exits_when_it_is_done(tmp_path):
    """`ragkv bench --engine vllm` wrote its results and then never exited: the interpreter
    waited at exit on vLLM's engine core, a child process the command left open."""
    import json

    cases = tmp_path / "cases.jsonl"
    cases.write_text(json.dumps({"id": "a", "chunks": list(CHUNKS[:2]),
                                 "question": QUESTION}) + "\n")
    out = tmp_path / "out.json"
    _exits_in_time("-m", "ragkv.cli", "bench", "--cases", str(cases), "--modes", "full,blend",
                   "--ratios", "0.12", "--max-new-tokens", "2", "--engine", "vllm",
                   "--home", str(tmp_path / "home"), "--out", str(out), "--model", _model())
    assert {s["mode"] for s in json.loads(out.read_text())["summary"]} == {"full", "blend"}


def test_a_program_that_never_closes_the_facade_still_exits(tmp_path):
    """A script (or the LangChain and LlamaIndex examples) that opens ragkv on vLLM in
    process and ends without ``close()`` exits all the same."""
    script = ("import sys\n"
              "from ragkv.api import RagKV\n"
              "from ragkv.config import RagkvConfig\n"
              "rag = RagKV(RagkvConfig(home=sys.argv[1], model=sys.argv[2], engine='vllm'))\n"
              "ans = rag.generate(['Zumbat is the capital.'], 'Capital?', mode='full',\n"
              "                   max_new_tokens=2)\n"
              "print('answered in mode', ans.trace.mode)\n")
    out = _exits_in_time("-c", script, str(tmp_path / "home"), _model())
    assert "answered in mode full" in out
