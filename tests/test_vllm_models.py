"""Model variants on the vLLM engine (``make test-vllm``): the connector reads vLLM's own
rotary tables, which differ by RoPE type."""

from __future__ import annotations

from pathlib import Path

import pytest

from ragkv.config import BlendConfig, RagkvConfig

pytestmark = pytest.mark.vllm

CHUNKS = ("The capital of Freedonia is Zumbat. It lies on the river Oxo.",
          "Zumbat is famous for its blue cheese and for a kite festival held every May.")
QUESTION = "What is Zumbat famous for?"


@pytest.fixture(scope="module")
def longrope_model(tmp_path_factory, smol_path: Path) -> Path:
    """A tiny random Llama with LongRoPE (vLLM's rotary module for it has no ``cos_sin_cache``,
    only the short and long factors' tables)."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    out = tmp_path_factory.mktemp("longrope")
    torch.manual_seed(0)
    rope = {"rope_type": "longrope", "rope_theta": 10000.0, "short_factor": [1.0] * 32,
            "long_factor": [4.0] * 32, "original_max_position_embeddings": 512}
    cfg = LlamaConfig(vocab_size=49152, hidden_size=128, intermediate_size=256,
                      num_hidden_layers=3, num_attention_heads=2, num_key_value_heads=1,
                      max_position_embeddings=2048, tie_word_embeddings=True,
                      rope_parameters=rope)
    LlamaForCausalLM(cfg).save_pretrained(out)
    AutoTokenizer.from_pretrained(smol_path).save_pretrained(out)
    return out


def test_a_longrope_model_precomputes_and_fuses_as_full_prefill(tmp_path, longrope_model):
    """Every fusion and every save failed (``AttributeError: ... cos_sin_cache``): answers fell
    back to full prefill and precompute stored nothing while saying it had."""
    pytest.importorskip("vllm")
    from ragkv.api import RagKV
    from ragkv.engine.vllm.backend import VLLMBackend

    cfg = RagkvConfig(home=tmp_path, model=longrope_model, engine="vllm", kv_dtype="float32",
                      precompute_context="prefix")
    rag = RagKV(cfg, backend=VLLMBackend.in_process(cfg, kv_cache_bytes=64 * 2**20))
    try:
        ids = [rag.tokenizer(c, add_special_tokens=False).input_ids for c in CHUNKS]
        assert rag.precompute_many(ids) == [True, True]
        assert all(rag.backend.stored([rag.key_for(c) for c in ids]).values())
        full = rag.generate(ids, QUESTION, mode="full", max_new_tokens=6, log_query=False)
        ans = rag.generate(ids, QUESTION, mode="blend", blend=BlendConfig(ratio=1.0),
                           max_new_tokens=6, log_query=False)
        assert ans.trace.error is None and ans.trace.hits == 2, ans.trace
        assert ans.tokens == full.tokens
    finally:
        rag.close()
