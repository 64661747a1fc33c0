"""Shared pieces of the engine tests: a matrix of tiny random Llama-family models and prompts.

Every model is built from a seeded random initialisation, so the invariants checked in
``test_engine_exactness.py`` and ``test_engine_selection.py`` hold across RoPE variants
(default, llama3, YaRN, linear), head_dim != hidden/heads, Mistral and Qwen2 (qkv bias), not
only on the default SmolLM2.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import pytest
import torch
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from ragkv.config import BlendConfig
from ragkv.engine.blend import FusedPrefill
from ragkv.engine.hf import HFEngine
from ragkv.engine.kv import ChunkKV
from ragkv.prompt import AssembledPrompt

TOL = 1e-4
VOCAB = 256
SEP = 2  # one-token separator between chunks
RATIOS = (0.05, 0.15, 0.3)

_BASE = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024)


def _llama(**extra) -> LlamaForCausalLM:
    return LlamaForCausalLM(LlamaConfig(**{**_BASE, **extra}))


MODEL_SPECS = {
    "llama": lambda: _llama(),
    "llama3-rope": lambda: _llama(rope_parameters={
        "rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0, "original_max_position_embeddings": 128}),
    "yarn-rope": lambda: _llama(rope_parameters={
        "rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
        "original_max_position_embeddings": 256}),
    "linear-rope": lambda: _llama(rope_parameters={
        "rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0}),
    "llama-headdim32": lambda: _llama(head_dim=32),
    "llama-bias": lambda: _llama(attention_bias=True, mlp_bias=True, tie_word_embeddings=True),
    "mistral": lambda: MistralForCausalLM(MistralConfig(**_BASE, head_dim=16)),
    "qwen2": lambda: Qwen2ForCausalLM(Qwen2Config(**_BASE)),
}
MODELS = list(MODEL_SPECS)


class _Tok:
    """HFEngine only asks the tokenizer for EOS (and text, which these tests never decode)."""

    eos_token_id = None


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """These models are tiny: one intra-op thread is faster, and immune to the OpenMP stalls
    two threads suffer when other processes share the cores."""
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


@functools.cache
def _engine(name: str) -> HFEngine:
    torch.manual_seed(1234)
    model = MODEL_SPECS[name]().float().eval()
    return HFEngine(model, _Tok())


@pytest.fixture(params=MODELS)
def engine(request) -> HFEngine:
    return _engine(request.param)


# ---- prompts -------------------------------------------------------------------------------

@dataclass
class Case:
    """One 3-chunk prompt, its cold chunk caches and the full-prefill reference."""

    prompt: AssembledPrompt
    prefix: list[int]
    chunks: list[list[int]]
    suffix: list[int]
    cached: list[tuple[int, ChunkKV]]
    full: FusedPrefill


def _ids(g: torch.Generator, n: int) -> list[int]:
    return torch.randint(3, VOCAB, (n,), generator=g).tolist()


def assemble(prefix: list[int], chunks: list[list[int]], suffix: list[int]) -> AssembledPrompt:
    ids = list(prefix)
    spans = []
    for i, c in enumerate(chunks):
        if i:
            ids.append(SEP)
        spans.append((len(ids), len(ids) + len(c)))
        ids.extend(c)
    start = len(ids)
    return AssembledPrompt(ids + list(suffix), len(prefix), spans, start)


def make_case(engine: HFEngine, seed: int = 0, lengths=None, n_chunks: int = 3,
              prefix_len: int = 5, suffix_len: int = 6) -> Case:
    g = torch.Generator().manual_seed(seed)
    if lengths is None:
        lengths = torch.randint(20, 41, (n_chunks,), generator=g).tolist()
    prefix = _ids(g, prefix_len)
    chunks = [_ids(g, n) for n in lengths]
    suffix = _ids(g, suffix_len)
    prompt = assemble(prefix, chunks, suffix)
    cached = []
    if prefix:
        cached.append((0, engine.precompute(prefix)))
    for (s, _), c in zip(prompt.chunk_spans, chunks, strict=True):
        cached.append((s, engine.precompute(c)))
    full = engine.prefill(prompt, [], "full", BlendConfig(), 0)
    return Case(prompt, prefix, chunks, suffix, cached, full)


@functools.cache
def _case(name: str, seed: int = 0) -> Case:
    return make_case(_engine(name), seed)


@pytest.fixture
def case(request, engine) -> Case:
    name = request.node.callspec.params["engine"]
    return _case(name)


def blend(engine: HFEngine, case: Case, cfg: BlendConfig, mode: str = "blend",
          record: bool = False) -> FusedPrefill:
    return engine.prefill(case.prompt, case.cached, mode, cfg, case.prompt.prefix_len,
                          record=record)


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item()


def assert_same_prefill(got: FusedPrefill, want: FusedPrefill, tol: float = TOL) -> None:
    assert got.logits.shape == want.logits.shape
    assert max_diff(got.logits, want.logits) < tol
    assert len(got.k) == len(want.k) and len(got.v) == len(want.v)
    for layer, (gk, wk, gv, wv) in enumerate(zip(got.k, want.k, got.v, want.v, strict=True)):
        assert gk.shape == wk.shape, layer
        assert max_diff(gk, wk) < tol, f"layer {layer} keys differ"
        assert max_diff(gv, wv) < tol, f"layer {layer} values differ"


