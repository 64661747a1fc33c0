"""Ask a vLLM OpenAI-compatible server that runs ragkv's KV connector.

Start the server (prefix caching stays on). vLLM's CPU build ships no ``vllm`` CLI that
runs (its ``vllm`` command looks up a distribution named ``vllm``), so use the module; with
a GPU build, ``vllm serve MODEL_DIR`` takes the same options::

    python -m vllm.entrypoints.openai.api_server --model MODEL_DIR --dtype float32 \\
        --enforce-eager --max-model-len 4096 --port 8000 --kv-transfer-config \\
        "$(python -m ragkv.engine.vllm.engine --kv-dtype float32)"

then run ``python examples/vllm_client.py MODEL_DIR http://localhost:8000``. The client
tokenizes with ragkv (token ids are the truth), stores each chunk's KV through the server
(a precompute request), then sends the question's prompt as token ids with the connector
parameters and the cache salt, and prints the answer and the connector's trace (hits,
misses, recomputed tokens). Its ``kv_dtype`` and ``precompute_context`` must be the
server's: they are part of every chunk's cache key.
"""

from __future__ import annotations

import json
import sys
import urllib.request
from typing import Any

from transformers import AutoTokenizer

from ragkv.config import BlendConfig, RagkvConfig
from ragkv.engine.vllm.client import RequestBuilder, VLLMRequest
from ragkv.engine.vllm.params import vllm_fingerprint
from ragkv.prompt import PromptTemplate

CHUNKS = ["The capital of Freedonia is Zumbat. It lies on the river Oxo.",
          "Zumbat is famous for its blue cheese and a kite festival every May."]
QUESTION = "What is Zumbat famous for?"


def complete(url: str, model: str, req: VLLMRequest, max_tokens: int) -> dict[str, Any]:
    """One greedy completion; returns the server's JSON (``kv_transfer_params`` included)."""
    body: dict[str, Any] = {"model": model, "prompt": req.ids, "max_tokens": max_tokens,
                            "temperature": 0, "kv_transfer_params": req.kv_transfer_params}
    if req.cache_salt:
        body["cache_salt"] = req.cache_salt
    http = urllib.request.Request(f"{url}/v1/completions", json.dumps(body).encode(),
                                  {"Content-Type": "application/json"})
    with urllib.request.urlopen(http, timeout=600) as resp:
        return json.load(resp)


def builder_for(model_dir: str, cfg: RagkvConfig, dtype: str = "float32"):
    tok = AutoTokenizer.from_pretrained(model_dir)
    template = PromptTemplate.from_tokenizer(tok, cfg.system_prompt)
    return tok, RequestBuilder(template, vllm_fingerprint(model_dir, dtype), cfg)


def ask(url: str, model_dir: str, chunks: list[str], question: str, cfg: RagkvConfig, *,
        blend: BlendConfig | None = None, max_tokens: int = 32) -> tuple[str, dict]:
    """Store the chunks' KV through the server, then ask; returns (answer, ragkv trace)."""
    tok, builder = builder_for(model_dir, cfg)
    ids = [tok(c, add_special_tokens=False).input_ids for c in chunks]
    for chunk in ids:  # the server prefills each chunk once and its connector stores the KV
        complete(url, model_dir, builder.precompute(chunk), max_tokens=1)
    req = builder.fused(ids, question, mode="blend", blend=blend or BlendConfig(ratio=0.15))
    out = complete(url, model_dir, req, max_tokens)
    return out["choices"][0]["text"], (out.get("kv_transfer_params") or {}).get("ragkv", {})


def main(model_dir: str, url: str = "http://localhost:8000") -> None:
    text, trace = ask(url, model_dir, CHUNKS, QUESTION, RagkvConfig(kv_dtype="float32"))
    print(text.strip())
    print(trace)


if __name__ == "__main__":
    main(*sys.argv[1:])
