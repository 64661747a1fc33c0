"""Shared fixtures of the API tests: a tiny random Llama with SmolLM2's tokenizer and a
seed home ingested once per module, copied for each test."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from ragkv.api import RagKV, RetrievedChunk
from ragkv.config import RagkvConfig
from ragkv.engine.hf import HFEngine

MODES = ("full", "prefix", "reuse", "blend")
QUESTION = "What does the assert statement do?"
MAX_NEW = 6


def _docs() -> dict[str, str]:
    from pydoc_data.topics import topics

    return {"doc:assert": topics["assert"][:1400], "doc:pass": topics["pass"][:900]}


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """A tiny model runs faster on one thread, and cannot stall on a busy second core."""
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


@pytest.fixture(scope="module")
def engine(tokenizer) -> HFEngine:
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=49152, hidden_size=64, intermediate_size=128,
                      num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=2048, bos_token_id=1, eos_token_id=2,
                      initializer_range=0.1)
    return HFEngine(LlamaForCausalLM(cfg).eval(), tokenizer)


def make_config(home: Path, **kw) -> RagkvConfig:
    # float32 storage: a KV read back from the cache is bit-identical to a freshly computed one,
    # so a miss and a hit must give exactly the same answer.
    # No memory tier by default: these tests damage the disk tier and must see it read;
    # tests/test_cache_tiers.py covers the memory tier.
    kw.setdefault("memory_budget_bytes", 0)
    # One entry per chunk keeps these suites' entry counts and fault injection simple; the
    # default anchor context (two entries per chunk) has its own file, test_api_anchor.py.
    kw.setdefault("precompute_context", "prefix")
    return RagkvConfig(home=home, chunk_tokens=64, kv_dtype=kw.pop("kv_dtype", "float32"), **kw)


@pytest.fixture(scope="module")
def seed(tmp_path_factory, engine):
    home = tmp_path_factory.mktemp("seed")
    rag = RagKV(make_config(home), engine=engine)
    results = [rag.ingest_text(name, text) for name, text in _docs().items()]
    again = rag.ingest_text("doc:assert", _docs()["doc:assert"])
    stats = rag.index.stats()
    rag.index.close()
    return home, results, again, stats


@pytest.fixture
def rag(tmp_path, seed, engine) -> RagKV:
    home = tmp_path / "home"
    shutil.copytree(seed[0], home)
    r = RagKV(make_config(home), engine=engine)
    yield r
    r.index.close()


def three_chunks(rag: RagKV) -> list[RetrievedChunk]:
    infos = sorted(rag.index.chunks(), key=lambda c: c.id)[:3]
    return [RetrievedChunk(c.token_ids, c.cache_key, c.text, c.id, c.document_name)
            for c in infos]


def blob_path(rag: RagKV, key: str) -> Path:
    entry = rag.index.get_entry(key)
    assert entry is not None
    return Path(rag.config.resolved_blob_url) / entry.blob_name
