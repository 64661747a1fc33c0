"""Ask a `vllm serve` OpenAI-compatible server that runs ragkv's KV connector.

Start the server (prefix caching stays on; the connector config is printed by
``python -c "from ragkv.config import RagkvConfig; from ragkv.engine.vllm.engine import
connector_config; import json; print(json.dumps(connector_config(RagkvConfig())))"``)::

    vllm serve MODEL_DIR --dtype float32 --enforce-eager --max-model-len 4096 \\
        --kv-transfer-config "$(python -c '...as above...')"

then run ``python examples/vllm_client.py MODEL_DIR http://localhost:8000``. The client
tokenizes with ragkv (token ids are the truth), sends the prompt as token ids with the
connector parameters and the cache salt, and prints the answer and the connector's trace.
The first request for a chunk computes and stores its KV; later ones reuse it.
"""

from __future__ import annotations

import json
import sys
import urllib.request

from transformers import AutoTokenizer

from ragkv.config import BlendConfig, RagkvConfig
from ragkv.engine.vllm.client import RequestBuilder
from ragkv.engine.vllm.params import vllm_fingerprint
from ragkv.prompt import PromptTemplate

CHUNKS = ["The capital of Freedonia is Zumbat. It lies on the river Oxo.",
          "Zumbat is famous for its blue cheese and a kite festival every May."]


def main(model_dir: str, url: str, dtype: str = "float32") -> None:
    cfg = RagkvConfig()  # must match the server's connector settings (keys depend on them)
    tok = AutoTokenizer.from_pretrained(model_dir)
    builder = RequestBuilder(PromptTemplate.from_tokenizer(tok, cfg.system_prompt),
                             vllm_fingerprint(model_dir, dtype), cfg)
    chunks = [tok(c, add_special_tokens=False).input_ids for c in CHUNKS]
    req = builder.fused(chunks, "What is Zumbat famous for?", mode="blend",
                        blend=BlendConfig(ratio=0.15))
    body = {"model": model_dir, "prompt": req.ids, "max_tokens": 32, "temperature": 0,
            "kv_transfer_params": req.kv_transfer_params, "cache_salt": req.cache_salt}
    http = urllib.request.Request(f"{url}/v1/completions", json.dumps(body).encode(),
                                  {"Content-Type": "application/json"})
    with urllib.request.urlopen(http) as resp:
        out = json.load(resp)
    print(out["choices"][0]["text"])
    print(out.get("kv_transfer_params"))


if __name__ == "__main__":
    main(*sys.argv[1:])
