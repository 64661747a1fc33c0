"""ragkv's client of a served vLLM against servers that are not what it expects: an answer of
another shape (another server, a proxy's error page with HTTP 200) or another model's
tokenizer is one clear error, never a KeyError from inside or prompts of the wrong ids.

The server here is a real HTTP server in a thread that answers as it is told; what a real
vLLM with the connector answers is covered by ``make test-vllm``."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from ragkv.config import RagkvConfig
from ragkv.engine.base import EngineError
from ragkv.engine.vllm.backend import VLLMBackend
from ragkv.engine.vllm.params import tokenizer_digest


class Answers:
    """What the server answers: ``models`` for GET /v1/models, ``completion`` for POST."""

    models: Any = None
    completion: Any = None


def _handler(answers: type[Answers]) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def _send(self, body: Any) -> None:
            data = json.dumps(body).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self) -> None:  # noqa: N802 - http.server's name
            self._send(answers.models)

        def do_POST(self) -> None:  # noqa: N802
            self.rfile.read(int(self.headers.get("Content-Length") or 0))
            self._send(answers.completion)

        def log_message(self, *args: Any) -> None:
            pass

    return Handler


@pytest.fixture
def server() -> Iterator[tuple[str, type[Answers]]]:
    answers = type("Told", (Answers,), {})
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _handler(answers))
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}/v1", answers
    httpd.shutdown()
    httpd.server_close()


def _note(model: Path, **changes: Any) -> dict[str, Any]:
    note = {"fingerprint": "vllm:" + "0" * 59, "kv_storage": "float16", "kv_dtype": "float16",
            "model": str(model), "tokenizer": tokenizer_digest(str(model)),
            "max_model_len": 2048}
    return {"choices": [{"token_ids": [5]}], "kv_transfer_params": {"ragkv": {**note,
                                                                              **changes}}}


def test_a_server_with_the_clients_tokenizer_is_opened(server, tmp_path, tiny_model) -> None:
    url, answers = server
    answers.models = {"data": [{"id": str(tmp_path / "elsewhere"), "max_model_len": 2048}]}
    answers.completion = _note(tiny_model)
    backend = VLLMBackend.served(RagkvConfig(home=tmp_path, model=tiny_model), url)
    assert backend.max_model_len == 2048 and backend.keys.fingerprint.startswith("vllm:")


@pytest.mark.parametrize(("models", "completion", "says"), [
    ({"data": "not a list"}, None, "answered its model list in a form ragkv does not read"),
    ({"data": [{"name": "no id"}]}, None, "answered its model list in a form"),
    ({"data": [{"id": "m", "max_model_len": "long"}]}, None, "answered its model list"),
    ("GOOD", {"error": {"message": "overloaded"}}, "answered a completion in a form"),
    ("GOOD", {"choices": "none"}, "answered a completion in a form"),
    ("GOOD", "TOKENIZER", "whose tokenizer is not the one of"),
])
def test_a_server_answering_otherwise_is_one_clear_error(server, tmp_path, tiny_model,
                                                         models: Any, completion: Any,
                                                         says: str) -> None:
    url, answers = server
    answers.models = ({"data": [{"id": "Qwen/Qwen2-7B-Instruct", "max_model_len": 2048}]}
                      if models == "GOOD" else models)
    answers.completion = (_note(tiny_model, tokenizer="f" * 64) if completion == "TOKENIZER"
                          else completion)
    with pytest.raises(EngineError, match=says) as err:
        VLLMBackend.served(RagkvConfig(home=tmp_path, model=tiny_model), url)
    assert "\n" not in str(err.value) and url.removesuffix("/v1") in str(err.value)
