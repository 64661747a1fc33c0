"""The README's server recipe, for real: vLLM's OpenAI-compatible server with ragkv's
connector, asked by ``examples/vllm_client.py``, answers as the offline engine does.

Slow (two engine starts on the CPU): marked ``vllm``, run by ``make test-vllm``.
"""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from ragkv.config import BlendConfig, RagkvConfig, default_home

pytestmark = pytest.mark.vllm

ROOT = Path(__file__).resolve().parents[1]
MAX_TOKENS = 16


def load_example():
    spec = importlib.util.spec_from_file_location("vllm_client", ROOT / "examples/vllm_client.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)  # type: ignore[union-attr]
    return mod


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(url: str, proc: subprocess.Popen, log: Path, timeout: float = 420) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"server exited ({proc.returncode}):\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=5) as r:
                if r.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(2)
    pytest.fail(f"server not healthy after {timeout:.0f} s:\n{log.read_text()[-3000:]}")


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)  # its own session: the engine process goes too
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)


def test_served_recipe_fuses_chunks_and_answers_as_the_offline_engine(tmp_path):
    pytest.importorskip("vllm")
    from ragkv.model_fetch import ensure_default_model

    model = str(ensure_default_model(default_home()))
    client = load_example()
    cfg = RagkvConfig(home=tmp_path / "home", kv_dtype="float32")
    kv_config = subprocess.run(
        [sys.executable, "-m", "ragkv.engine.vllm.engine", "--kv-dtype", "float32",
         "--home", str(cfg.home)], check=True, capture_output=True, text=True).stdout.strip()
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = tmp_path / "server.log"
    # The recipe of the README, word for word but the port, model length and cache size.
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model,
           "--dtype", "float32", "--enforce-eager", "--max-model-len", "1024",
           "--kv-cache-memory-bytes", str(256 * 2**20), "--host", "127.0.0.1",
           "--port", str(port), "--kv-transfer-config", kv_config]
    with log.open("w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
    try:
        wait_healthy(url, proc, log)
        blend = BlendConfig(ratio=0.15)
        text, trace = client.ask(url, model, client.CHUNKS, client.QUESTION, cfg, blend=blend,
                                 max_tokens=MAX_TOKENS)
    finally:
        stop(proc)
    assert proc.poll() is not None
    assert "error" not in trace, trace
    # the chunks come from the store; the template prefix, stored by no precompute, may miss
    assert trace["hits"] >= len(client.CHUNKS) and trace["misses"] <= 1, trace
    assert trace["recomputed"] > 0

    # The same request through the offline engine, on the KV the server stored.
    from ragkv.engine.vllm.engine import VLLMEngine

    eng = VLLMEngine(cfg, Path(model), max_model_len=1024, kv_cache_bytes=256 * 2**20)
    tok, builder = client.builder_for(model, cfg)
    ids = [tok(c, add_special_tokens=False).input_ids for c in client.CHUNKS]
    out = eng.complete(builder.fused(ids, client.QUESTION, mode="blend", blend=blend),
                       max_tokens=MAX_TOKENS)
    offline = (out.kv_transfer_params or {}).get("ragkv", {})
    assert offline["hits"] == len(client.CHUNKS) + 1 and offline["misses"] == 0
    assert out.outputs[0].text == text, json.dumps({"served": text, "offline": out.outputs[0].text})
