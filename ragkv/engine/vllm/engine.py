"""``VLLMEngine``: ragkv's ingest/ask/bench paths served by a real vLLM engine.

The chunk KV never crosses this process: the connector inside vLLM loads, fuses and stores
it. This side assembles token ids, names each chunk's span and key, and times requests.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from ragkv.config import BlendConfig, RagkvConfig
from ragkv.engine.vllm.client import RequestBuilder, VLLMRequest

MISSING = ("the vLLM backend needs vLLM: install ragkv's `vllm` extra "
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


@dataclass
class VLLMAnswer:
    text: str
    tokens: list[int]
    ttft_s: float
    mode: str
    context_tokens: int
    trace: dict[str, Any] = field(default_factory=dict)  # the connector's: hits, misses, ...
    first_logprobs: dict[int, float] = field(default_factory=dict)  # top-k of the 1st token


class VLLMEngine:
    """A vLLM ``LLM`` with ragkv's connector; fp32 by default to compare with the hf backend.
    ``connector=False`` builds plain vLLM (prefix caching on), the baseline users run today."""

    def __init__(self, cfg: RagkvConfig, model_path: Path, *, dtype: str = "float32",
                 max_model_len: int = 4096, kv_cache_bytes: int = 1 << 30,
                 enforce_eager: bool = True, connector: bool = True, **llm_kwargs: Any) -> None:
        try:
            from vllm import LLM
        except ImportError as exc:
            raise RuntimeError(MISSING) from exc
        from transformers import AutoTokenizer

        from ragkv.engine.vllm.params import vllm_fingerprint
        from ragkv.prompt import PromptTemplate

        self.cfg = cfg
        self.llm = LLM(model=str(model_path), dtype=dtype, enforce_eager=enforce_eager,
                       max_model_len=max_model_len, enable_prefix_caching=True, seed=0,
                       kv_cache_memory_bytes=kv_cache_bytes,
                       kv_transfer_config=connector_config(cfg) if connector else None,
                       **llm_kwargs)
        self.tokenizer = AutoTokenizer.from_pretrained(model_path)
        self.fingerprint = vllm_fingerprint(str(model_path), dtype)
        self.template = PromptTemplate.from_tokenizer(self.tokenizer, cfg.system_prompt)
        self.builder = RequestBuilder(self.template, self.fingerprint, cfg)

    def complete(self, req: VLLMRequest, max_tokens: int, logprobs: int | None = None):
        """One greedy request as built by ``builder``; vLLM's ``RequestOutput``."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        prompt = TokensPrompt(prompt_token_ids=req.ids)
        if req.cache_salt:
            prompt["cache_salt"] = req.cache_salt
        extra = {"kv_transfer_params": req.kv_transfer_params} if req.kv_transfer_params else None
        sp = SamplingParams(temperature=0, max_tokens=max_tokens, logprobs=logprobs,
                            extra_args=extra)
        return self.llm.generate([prompt], sp, use_tqdm=False)[0]

    def precompute(self, ids: Sequence[int]) -> bool:
        """Store a chunk's KV through vLLM's own prefill; False if it was already stored."""
        from ragkv.cache_index import KVStore

        key = self.builder.key_for(ids)
        if KVStore.from_config(self.cfg).contains([key]).get(key):
            return False
        self.complete(self.builder.precompute(ids), max_tokens=1)
        return True

    def generate(self, chunks: Sequence[Sequence[int]], question: str, *, mode: str = "blend",
                 blend: BlendConfig | None = None, max_new_tokens: int = 64,
                 logprobs: int | None = 20, fresh: bool = False) -> VLLMAnswer:
        """Answer over ``chunks`` in this order. TTFT is the wall time of a one-token request
        (request to first token, connector work included); the answer is a second request
        whose fused context vLLM's prefix cache already holds. ``fresh`` (``full`` only) salts
        the request uniquely, so vLLM's prefix cache serves none of it: a cold full prefill."""
        req = self.builder.fused(chunks, question, mode, blend)
        if fresh:
            if mode != "full":
                raise ValueError("fresh applies to mode 'full' (a fused request's salt is fixed)")
            req = replace(req, cache_salt=uuid.uuid4().hex)
        t0 = time.perf_counter()
        first = self.complete(req, max_tokens=1, logprobs=logprobs)
        ttft = time.perf_counter() - t0
        out = self.complete(req, max_tokens=max_new_tokens) if max_new_tokens > 1 else first
        comp = out.outputs[0]
        lp = first.outputs[0].logprobs or []
        top = {int(t): float(v.logprob) for t, v in lp[0].items()} if lp else {}
        # A one-token request can finish before the worker's trace reaches the scheduler;
        # the answer request (same fused context) carries it then.
        trace = ((first.kv_transfer_params or {}).get("ragkv")
                 or (out.kv_transfer_params or {}).get("ragkv") or {})
        return VLLMAnswer(comp.text.strip(), list(comp.token_ids), ttft, mode, len(req.ids),
                          trace, top)


def main(argv: Sequence[str] | None = None) -> None:
    """Print the ``--kv-transfer-config`` JSON for vLLM's OpenAI server (README recipe)."""
    import argparse
    import json

    ap = argparse.ArgumentParser(prog="python -m ragkv.engine.vllm.engine",
                                 description=main.__doc__)
    ap.add_argument("--kv-dtype", default="float32", help="must match the clients' settings")
    ap.add_argument("--precompute-context", default="prefix", choices=("prefix", "cold"))
    ap.add_argument("--home", type=Path, help="ragkv home holding the KV store")
    a = ap.parse_args(argv)
    cfg = RagkvConfig(kv_dtype=a.kv_dtype, precompute_context=a.precompute_context,
                      **({"home": a.home} if a.home else {}))
    print(json.dumps(connector_config(cfg)))


if __name__ == "__main__":
    main()
