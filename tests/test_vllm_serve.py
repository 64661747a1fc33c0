"""The served deployment, for real: `ragkv serve` starts vLLM's OpenAI server with ragkv's
connector over a cache given by URL; the app process ingests through it, answers through it
from LangChain and LlamaIndex, a second server on the same cache hits what the first stored,
and a server killed mid-request leaves a clear error and a consistent cache.

Slow (several engine starts on the CPU): marked ``vllm``, run by ``make test-vllm``. Under
``make test-services`` the same two-server test runs on PostgreSQL + Redis (env URLs).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from ragkv.config import RagkvConfig, default_home

pytestmark = pytest.mark.vllm

DOCS = {
    "freedonia.md": "The capital of Freedonia is Zumbat. It lies on the river Oxo and has "
                    "three bridges.\n\nZumbat is famous for its blue cheese and for a kite "
                    "festival held every May.",
    "oxo.txt": "The river Oxo floods every spring, and the bridges of Zumbat were rebuilt in "
               "1911 after the great flood.",
}
QUESTION = "What is Zumbat famous for?"
MAX_TOKENS = 12


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`ragkv serve` in its own process group, on a free port."""

    def __init__(self, home: Path, log: Path, index_url: str | None = None,
                 blob_url: str | None = None, plain: bool = False) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/v1"
        from ragkv.model_fetch import ensure_default_model

        model = str(ensure_default_model(default_home()))
        cmd = [sys.executable, "-m", "ragkv.cli", "serve", "--home", str(home), "--model", model,
               "--port", str(self.port), "--max-model-len", "1024", "--kv-cache-mb", "256"]
        if plain:  # vLLM's own server, no connector
            cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model,
                   "--dtype", "float32", "--enforce-eager", "--max-model-len", "1024",
                   "--kv-cache-memory-bytes", str(256 * 2**20), "--host", "127.0.0.1",
                   "--port", str(self.port)]
        if index_url:
            cmd += ["--index-url", index_url]
        if blob_url:
            cmd += ["--blob-url", blob_url]
        self.log = log
        with log.open("w") as out:
            self.proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT,
                                         start_new_session=True)

    def wait(self, timeout: float = 420) -> Server:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                pytest.fail(f"server exited ({self.proc.returncode}):\n"
                            f"{self.log.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(self.url.removesuffix("/v1") + "/health",
                                            timeout=5) as r:
                    if r.status == 200:
                        return self
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            time.sleep(2)
        pytest.fail(f"server not healthy after {timeout:.0f} s:\n{self.log.read_text()[-3000:]}")

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, sig)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=30)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """One cache (a SQLite file and a blob folder, or PostgreSQL + Redis from the
    environment under `make test-services`) and a documents folder."""
    pytest.importorskip("vllm")
    root = tmp_path_factory.mktemp("served")
    docs = root / "docs"
    docs.mkdir()
    for name, text in DOCS.items():
        (docs / name).write_text(text)
    return root, docs, os.environ.get("RAGKV_TEST_INDEX_URL"), os.environ.get(
        "RAGKV_TEST_BLOB_URL")


@pytest.fixture(scope="module")
def server_a(cache):
    root, _, index_url, blob_url = cache
    srv = Server(root / "home", root / "a.log", index_url, blob_url).wait()
    yield srv
    srv.stop()


def app_config(root: Path, url: str, index_url: str | None, blob_url: str | None):
    return RagkvConfig(home=root / "home", engine=url, index_url=index_url, blob_url=blob_url)


def test_ingest_and_answer_through_the_server_from_langchain_and_llamaindex(cache, server_a):
    from typer.testing import CliRunner

    from ragkv.api import RagKV
    from ragkv.cli import app
    from ragkv.connectors.langchain import RagkvRunnable
    from ragkv.connectors.llamaindex import RagkvQueryEngine

    root, docs, index_url, blob_url = cache
    args = ["ingest", str(docs), "--home", str(root / "home"), "--engine", server_a.url]
    if index_url:
        args += ["--index-url", index_url, "--blob-url", blob_url]
    out = CliRunner().invoke(app, args, catch_exceptions=False)
    assert out.exit_code == 0, out.output
    assert "2 documents" in out.output and "computed now: 0" not in out.output

    rag = RagKV(app_config(root, server_a.url, index_url, blob_url))
    assert rag.backend.description.startswith("vLLM server")
    lc = RagkvRunnable(rag=rag, k=2, max_new_tokens=MAX_TOKENS).invoke({"question": QUESTION})
    trace = lc["trace"]
    assert trace["hits"] == 2 and trace["misses"] == 0 and trace["error"] is None, trace
    assert trace["engine_ttft_s"] is not None and 0 < trace["engine_ttft_s"] <= trace["ttft_s"]
    # full prefill on a server: the prompt's compute time is the server's own figure
    full = rag.generate(rag.retrieve(QUESTION, k=2), QUESTION, mode="full",
                        max_new_tokens=1).trace
    assert full.engine_ttft_s and 0 < full.fuse_s == full.engine_ttft_s <= full.ttft_s, full
    li = RagkvQueryEngine(rag=rag, similarity_top_k=2, max_new_tokens=MAX_TOKENS).query(QUESTION)
    assert li.metadata["ragkv_tokens"] == lc["tokens"]

    # The same prompt on an in-process vLLM over the same cache: token for token equal.
    from ragkv.engine.vllm.backend import VLLMBackend
    from ragkv.model_fetch import ensure_default_model

    # the server's model folder: KV computed by vLLM is keyed by the folder's weight bytes
    cfg = RagkvConfig(home=root / "home", model=ensure_default_model(default_home()),
                      kv_dtype="float32", engine="vllm", index_url=index_url,
                      blob_url=blob_url)
    local = RagKV(cfg, backend=VLLMBackend.in_process(cfg, max_model_len=1024,
                                                      kv_cache_bytes=256 * 2**20))
    try:
        chunks = rag.retrieve(QUESTION, 2)
        here = local.generate(chunks, QUESTION, max_new_tokens=MAX_TOKENS)
        assert here.trace.hits == 2  # what the server stored, read in this process
        assert here.tokens == lc["tokens"]
    finally:
        local.close()


def test_a_client_follows_a_server_whose_kv_settings_changed(cache, server_a):
    """A server restarted with other settings (here: another KV storage) names KV by other
    keys; a client that kept the old ones had every fused request refused (full prefill, an
    error in the trace) and every precompute dropped until the client was restarted."""
    from dataclasses import replace

    from ragkv.api import RagKV
    from ragkv.engine.vllm.client import RequestBuilder

    root, _, index_url, blob_url = cache
    rag = RagKV(app_config(root, server_a.url, index_url, blob_url))
    backend = rag.backend
    real = backend.keys
    stale = replace(real, kv_storage="float16" if real.kv_storage != "float16" else "float32")

    def go_stale() -> None:  # the client's state after the server restarted
        backend.keys, backend.builder = stale, RequestBuilder(backend.template, stale)

    chunks = [rag.tokenizer(text + " (settings)", add_special_tokens=False).input_ids
              for text in DOCS.values()]
    try:
        go_stale()
        assert rag.precompute_many(chunks) == [True, True]  # stored after one refusal
        assert backend.keys == real
        go_stale()
        ans = rag.generate(chunks, QUESTION, mode="reuse", max_new_tokens=2)
        assert ans.trace.error is None and ans.trace.hits == 2, ans.trace
        assert [c.key for c in ans.trace.chunks] == [real.at(ids, i)
                                                     for i, ids in enumerate(chunks)]
        assert backend.keys == real
    finally:
        rag.close()


def test_a_client_whose_server_lost_the_connector_says_so(cache, server_a):
    """The server on a client's URL restarted as plain vLLM: every fused answer was a silent
    full prefill (the trace said blend, no error), and precompute returned as if all was
    stored. A fused request always gets the connector's note; none means it is gone."""
    from ragkv.api import RagKV
    from ragkv.engine.base import EngineError
    from ragkv.engine.vllm.transport import HTTP

    root, _, index_url, blob_url = cache
    rag = RagKV(app_config(root, server_a.url, index_url, blob_url))
    plain = Server(root / "plain", root / "plain.log", plain=True)
    try:
        plain.wait()
        rag.backend.transport = HTTP(plain.url)  # what the client sees after the restart
        chunks = [rag.tokenizer(text + " (plain)", add_special_tokens=False).input_ids
                  for text in DOCS.values()]
        for call in (lambda: rag.generate(chunks, QUESTION, mode="blend", max_new_tokens=2),
                     lambda: rag.precompute_many(chunks)):
            with pytest.raises(EngineError, match=f"the server at {plain.url} no longer runs "
                                                  f"ragkv's connector"):
                call()
    finally:
        plain.stop()
        rag.close()


def test_a_second_server_hits_what_the_first_stored_and_survives_a_kill(cache, server_a):
    from ragkv.api import RagKV
    from ragkv.cache_index import KVStore, verify
    from ragkv.engine.base import EngineError

    root, _, index_url, blob_url = cache
    rag_a = RagKV(app_config(root, server_a.url, index_url, blob_url))
    new = [rag_a.tokenizer("A chunk only server A ever saw, about the lighthouse of Oxo.",
                           add_special_tokens=False).input_ids]
    assert rag_a.precompute_many(new) == [True]

    srv_b = Server(root / "home", root / "b.log", index_url, blob_url).wait()
    try:
        rag_b = RagKV(app_config(root, srv_b.url, index_url, blob_url))
        assert rag_b.precompute_many(new) == [False]  # stored by A, seen by B
        ans = rag_b.generate(new, "What is this chunk about?", max_new_tokens=4)
        assert ans.trace.hits == 1 and ans.trace.misses == 0, ans.trace

        # Killed mid-request: the client gets one clear error, not a hang or a traceback.
        stream = rag_b.stream(new, "Tell me everything about the lighthouse.",
                              max_new_tokens=400)
        threading.Timer(1.0, srv_b.stop, kwargs={"sig": signal.SIGKILL}).start()
        with pytest.raises(EngineError, match="server at"):
            for _ in stream:
                pass
    finally:
        srv_b.stop(signal.SIGKILL)

    report = verify(KVStore.from_config(RagkvConfig(home=root / "home", index_url=index_url,
                                                    blob_url=blob_url, memory_budget_bytes=0)),
                    repair=False, orphan_grace_s=0)
    assert report.bad == [], report.bad

    srv_b = Server(root / "home", root / "b2.log", index_url, blob_url).wait()
    try:
        again = RagKV(app_config(root, srv_b.url, index_url, blob_url))
        ans = again.generate(new, "What is this chunk about?", max_new_tokens=4)
        assert ans.trace.hits == 1 and ans.trace.error is None
    finally:
        srv_b.stop()


def test_serve_prints_the_vllm_command(tmp_path):
    from typer.testing import CliRunner

    from ragkv.cli import app
    from ragkv.model_fetch import ensure_default_model

    model = ensure_default_model(default_home())
    out = CliRunner().invoke(app, ["serve", "--print", "--home", str(tmp_path), "--port", "9001",
                                   "--model", str(model)])
    assert out.exit_code == 0, out.output
    assert "vllm.entrypoints.openai.api_server" in out.output
    assert "--kv-transfer-config" in out.output and "RagkvConnector" in out.output
