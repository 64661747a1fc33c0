"""Starting vLLM with ragkv's connector: the connector config, an in-process ``LLM``, and the
server command line (what ``ragkv serve`` runs).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from ragkv.config import RagkvConfig
from ragkv.engine.runner import fusion_window

MISSING = ("the vLLM engine needs vLLM: install ragkv's `vllm` extra "
           "(pip install 'ragkv[vllm]'; `make test-vllm` does it) or use --engine hf")

#: RagkvConfig fields the connector needs (where the cache lives and what keys mean).
_CONNECTOR_FIELDS = ("home", "index_url", "blob_url", "blob_options", "precompute_context",
                     "kv_dtype", "int8_key_scales", "int8_value_scales", "memory_budget_bytes",
                     "disk_budget_bytes", "remote_blob_url", "remote_blob_options",
                     "remote_budget_bytes", "eviction_policy")


def connector_config(cfg: RagkvConfig) -> dict[str, Any]:
    """vLLM's ``kv_transfer_config`` for ragkv's connector (JSON, for ``--kv-transfer-config``)."""
    extra = {f: getattr(cfg, f) for f in _CONNECTOR_FIELDS}
    extra["home"] = str(cfg.home)
    return {"kv_connector": "RagkvConnector",
            "kv_connector_module_path": "ragkv.engine.vllm.connector",
            "kv_role": "kv_both", "kv_load_failure_policy": "recompute",
            "kv_connector_extra_config": {"ragkv": extra}}


def model_window(path: Path) -> int:
    """The positions the model was trained for (``max_position_embeddings``), or the
    fusion's window where shorter (:func:`ragkv.engine.runner.fusion_window`)."""
    cfg = json.loads((Path(path) / "config.json").read_text())
    trained = int(cfg.get("max_position_embeddings") or 4096)
    window = fusion_window(SimpleNamespace(**cfg))
    return min(trained, window[0]) if window else trained


def kv_bytes_per_position(path: Path, dtype: str) -> int:
    """Bytes of paged KV one prompt position takes in vLLM for the model at ``path`` computed
    in ``dtype`` (``auto``: the config's own dtype)."""
    cfg = json.loads((Path(path) / "config.json").read_text())
    heads = int(cfg.get("num_attention_heads") or 1)
    kv_heads = int(cfg.get("num_key_value_heads") or heads)
    head_dim = int(cfg.get("head_dim") or int(cfg.get("hidden_size") or 0) // heads)
    if dtype == "auto":
        dtype = str(cfg.get("dtype") or cfg.get("torch_dtype") or "bfloat16")
    width = 4 if dtype == "float32" else 2
    return int(cfg.get("num_hidden_layers") or 0) * kv_heads * head_dim * 2 * width


def load_llm(cfg: RagkvConfig, model_path: Path, *, dtype: str = "float32",
             max_model_len: int | None = None, kv_cache_bytes: int = 1 << 30,
             enforce_eager: bool = True, connector: bool = True, **llm_kwargs: Any):
    """A vLLM ``LLM`` (prefix caching on) with ragkv's connector, or plain (the baseline users
    run today). The window is the model's own unless ``max_model_len`` says otherwise."""
    try:
        from vllm import LLM
    except ImportError as exc:
        raise RuntimeError(MISSING) from exc
    cfg.home.mkdir(parents=True, exist_ok=True)
    return LLM(model=str(model_path), dtype=dtype, enforce_eager=enforce_eager,
               max_model_len=max_model_len or model_window(model_path),
               enable_prefix_caching=True, seed=0, kv_cache_memory_bytes=kv_cache_bytes,
               kv_transfer_config=connector_config(cfg) if connector else None, **llm_kwargs)


def serve_command(cfg: RagkvConfig, model_path: Path, *, host: str = "127.0.0.1",
                  port: int = 8000, dtype: str = "float32", max_model_len: int | None = None,
                  kv_cache_bytes: int = 1 << 30, extra: Sequence[str] = (),
                  connector: bool = True) -> list[str]:
    """The command that serves ``model_path`` with vLLM's OpenAI-compatible server and
    ragkv's connector over ``cfg``'s cache. The CPU build of vLLM ships no working ``vllm``
    command, so the server module runs; a GPU build's ``vllm serve`` takes the same options.
    Per-request metrics give clients vLLM's own TTFT beside theirs."""
    return [sys.executable, "-m", "vllm.entrypoints.openai.api_server",
            "--model", str(model_path), "--dtype", dtype, "--enforce-eager",
            "--max-model-len", str(max_model_len or model_window(model_path)),
            "--kv-cache-memory-bytes", str(kv_cache_bytes),
            "--host", host, "--port", str(port),
            "--enable-per-request-metrics", "--enable-prompt-tokens-details",
            *(["--kv-transfer-config", json.dumps(connector_config(cfg))] if connector else []),
            *extra]


def main(argv: Sequence[str] | None = None) -> None:
    """Print the ``--kv-transfer-config`` JSON for vLLM's OpenAI server."""
    import argparse

    ap = argparse.ArgumentParser(prog="python -m ragkv.engine.vllm.engine",
                                 description=main.__doc__)
    ap.add_argument("--kv-dtype", default="float32", help="stored KV dtype")
    ap.add_argument("--precompute-context", default="anchor",
                    choices=("prefix", "cold", "anchor"))
    ap.add_argument("--home", type=Path, help="ragkv home holding the KV store")
    a = ap.parse_args(argv)
    cfg = RagkvConfig(kv_dtype=a.kv_dtype, precompute_context=a.precompute_context)
    if a.home:
        cfg = replace(cfg, home=a.home)
    print(json.dumps(connector_config(cfg)))


if __name__ == "__main__":
    main()
