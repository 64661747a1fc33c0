"""Shared pieces of the engine tests: a matrix of tiny random Llama-family models and prompts.

Every model is built from a seeded random initialisation, so the invariants checked in
``test_engine_exactness.py`` and ``test_engine_selection.py`` hold across RoPE variants
(default, llama3, YaRN, linear), head_dim != hidden/heads, Mistral and Qwen2 (qkv bias), not
only on the default SmolLM2.

The initialisation is chosen so that a wrong position *shows* in the logits, not only in K/V.
transformers' default (std 0.02) attends almost uniformly, with logits of about 0.5: a
one-position RoPE shift of the cached keys moved the first-token logits by only 1e-4 to 3e-4,
default RoPE tables on the llama3 model by 3e-5 (below TOL), and ``mistral`` had ``llama``'s
very weights. :func:`position_sensitive` re-draws every weight from a generator seeded by the
model's name: peaked attention (``GAINS``), unit-variance embeddings, 1/sqrt(fan_in) elsewhere
(logits of std ~1, max ~3-4), norm weights around 1 (so the two norms of a layer differ) and
non-zero biases. On these models the exact paths (ratio 1.0, prefix mode, a chunk placed first
or precomputed after the prefix) differ from the model's own forward by <= 4.4e-6 on logits and
<= 2.3e-6 on K/V, while a one-position RoPE shift of the cached keys moves the logits by
0.7-2.7, a query seeing one key too many by 0.04-1.9 (0.4-1.9 at ratio 1.0) and default RoPE
tables on a llama3/YaRN/linear model by 0.3-3.6; ``tests/test_engine_guards.py`` holds those
margins.
"""

from __future__ import annotations

import functools
import zlib
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

# Tolerance of every "equals full prefill" check, logits and K/V alike. The fused path and the
# model's own forward run the same float32 operations in a different order (SDPA vs the
# selected-query attention, one RoPE launch over the buffer vs per-call rotation, row subsets of
# the matmuls), so they differ by reassociation only: measured on these models, <= 4.4e-6 on
# logits (max ~3-4) and <= 2.3e-6 on K/V (max ~2.5), up to 8.8e-6 through the Triton kernels
# and teacher-forced scoring, i.e. a few float32 ulps (1.2e-7 relative) compounded over four
# layers. 1e-4 leaves >10x headroom for other BLAS builds, thread counts and GPU kernels, and
# stays >400x below the smallest logit error of a one-position RoPE shift, a one-key mask error
# or a wrong RoPE scaling scheme (see above).
TOL = 1e-4
VOCAB = 256
SEP = 2  # one-token separator between chunks
RATIOS = (0.05, 0.15, 0.3)

_BASE = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024)


#: Attention projections' gains over 1/sqrt(fan_in). Scores ``q.k / sqrt(head_dim)`` have std
#: ~8 x 0.5 = 4 on unit-RMS input, so each query attends to a few keys; the layer output sees
#: ``o(v)`` with gain 2 x 0.5 = 1. Split this way the cached K and V stay small (|K|, |V| <~ 2.5):
#: float32 reassociation errors scale with the magnitude of what is compared.
GAINS = {"q_proj": 8.0, "k_proj": 0.5, "v_proj": 0.5, "o_proj": 2.0}


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


def position_sensitive(model: torch.nn.Module, name: str) -> torch.nn.Module:
    """Re-draw every weight of ``model`` in place from a generator seeded by ``name`` (see the
    module docstring for why); returns the model."""
    g = torch.Generator().manual_seed(zlib.crc32(name.encode()))
    # A tied embedding is also the output head: drawn like one, so logits keep std ~1.
    tied = bool(getattr(model.config, "tie_word_embeddings", False))
    with torch.no_grad():
        for pname, p in model.named_parameters():  # a tied lm_head is the embedding: once
            noise = torch.randn(p.shape, generator=g)
            if "norm" in pname:
                p.copy_(1.0 + 0.2 * noise)
            elif pname.endswith("bias"):
                p.copy_(0.2 * noise)
            elif "embed_tokens" in pname and not tied:
                p.copy_(noise)
            else:
                gain = GAINS.get(pname.split(".")[-2], 1.0)
                p.copy_(noise * gain / p.shape[1] ** 0.5)
    return model


def make_model(name: str) -> torch.nn.Module:
    """A fresh float32 copy of the test model ``name`` (eval mode)."""
    return position_sensitive(MODEL_SPECS[name](), name).float().eval()


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
    return HFEngine(make_model(name), _Tok())


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


def bf16_tolerance(full_logits: torch.Tensor) -> float:
    """How far a bf16 fused prefill's logits may sit from the same bf16 model's own forward.

    bf16 keeps 8 significant bits: one rounding of x is off by up to u|x| with u = 2**-8, so
    a "step" at the logits' scale is u * max|logit| (0.012 for logits up to 3). The fused path
    and the model's forward round at different points in each of the four layers (attention
    order, RoPE formula, which rows share a matmul), so their logits differ by a few steps:
    measured 2.6-8.4 steps (0.03-0.11) over the eight test models and three prompts each (3.9
    on llama's default prompt), while each model's own bf16 forward is 3-27 steps from its
    float32 forward. Ten steps bounds the rounding and stays far below a one-position RoPE
    error in bf16 (>= 0.69, i.e. >= 60 steps, on the same models and prompts).
    """
    return 10 * 2.0**-8 * float(full_logits.float().abs().max())
