"""Shared fixtures: the real default model folder (fetched once, then cached) and its tokenizer."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from ragkv.config import default_home
from ragkv.model_fetch import ensure_default_model

# Without a GPU the Triton kernels run through Triton's numpy interpreter, which is read when
# a kernel is defined, so it must be set before any kernel module is imported.
if not os.environ.get("TRITON_INTERPRET"):
    import torch

    if not torch.cuda.is_available():
        os.environ["TRITON_INTERPRET"] = "1"


@pytest.fixture(scope="session")
def smol_path() -> Path:
    return ensure_default_model(default_home(), progress=False)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory, smol_path: Path) -> Path:
    """A tiny random Llama saved as a real model folder with SmolLM2's tokenizer and chat
    template: the real loading path at a fraction of the cost."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("tiny-model")
    cfg = LlamaConfig(vocab_size=49152, hidden_size=64, intermediate_size=128,
                      num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=8192, tie_word_embeddings=True)
    LlamaForCausalLM(cfg).save_pretrained(out)
    AutoTokenizer.from_pretrained(smol_path).save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tokenizer(smol_path: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(smol_path))


@pytest.fixture(scope="module")
def pydoc_rag(tmp_path_factory, tiny_model: Path):
    """A RagKV on the tiny model with three short pydoc topics ingested (one per module)."""
    from pydoc_data.topics import topics

    from ragkv import RagKV, RagkvConfig

    home = tmp_path_factory.mktemp("ragkv-home")
    rag = RagKV(RagkvConfig(home=home, model=tiny_model, chunk_tokens=96))
    for name in ("assert", "pass", "del"):
        rag.ingest_text(f"pydoc:{name}", topics[name])
    return rag
