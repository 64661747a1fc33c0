"""The fusion on the real SmolLM2-135M-Instruct (slow: `make test-slow`).

Prompts are three ~150-token chunks of Python's own documentation (pydoc_data.topics) placed in
the model's chat template by PromptTemplate, exactly as the API builds them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from ragkv.chunking import chunk_text
from ragkv.config import BlendConfig, RagkvConfig
from ragkv.engine.blend import FusedPrefill
from ragkv.engine.hf import HFEngine
from ragkv.engine.kv import ChunkKV
from ragkv.prompt import AssembledPrompt, PromptTemplate

pytestmark = pytest.mark.slow

TOL = 1e-3
N_DECODE = 8
PROMPTS = [
    (("assert", "pass", "del"), "What does the assert statement do when its expression is false?"),
    (("if", "while", "for"), "How does a while loop decide when to stop?"),
    (("import", "global", "return"), "What does the global statement declare?"),
]


@dataclass
class Setup:
    prompt: AssembledPrompt
    chunks: list[list[int]]
    suffix: list[int]
    prefix_kv: ChunkKV
    cold: list[ChunkKV]  # each chunk prefilled alone
    first_after_prefix: ChunkKV  # chunk 1 prefilled after the template prefix
    full: FusedPrefill
    full_tokens: list[int]


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """One intra-op thread: with a second busy process on a 2-core box, two OpenMP threads run
    this model 5-10x slower than one (measured), and idle they gain less than 2x."""
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


@pytest.fixture(scope="module")
def engine(smol_path: Path) -> HFEngine:
    return HFEngine.load(smol_path, device="cpu", dtype="float32")


@pytest.fixture(scope="module")
def template(engine) -> PromptTemplate:
    return PromptTemplate.from_tokenizer(engine.tokenizer, RagkvConfig().system_prompt)


@pytest.fixture(scope="module")
def setups(engine, template) -> list[Setup]:
    from pydoc_data.topics import topics

    out = []
    for names, question in PROMPTS:
        # The longest ~150-token chunk of each topic, tokenized on its own as at ingestion.
        chunks = [max((c.token_ids for c in chunk_text(topics[n], engine.tokenizer, 150)),
                      key=len) for n in names]
        prompt = template.assemble(chunks, question)
        prefix_kv = engine.precompute(list(template.prefix_ids))
        cold = [engine.precompute(c) for c in chunks]
        after = engine.precompute(chunks[0], past=prefix_kv)
        full = engine.prefill(prompt, [], "full", BlendConfig(), 0)
        tokens = engine.decode(full, int(full.logits.argmax()), N_DECODE)
        out.append(Setup(prompt, chunks, template.suffix_ids(question), prefix_kv, cold, after,
                         full, tokens))
    return out


def _cached(s: Setup) -> list[tuple[int, ChunkKV]]:
    return [(0, s.prefix_kv), *((st, kv) for (st, _), kv in zip(s.prompt.chunk_spans, s.cold,
                                                               strict=True))]


def _kl(p_logits: torch.Tensor, q_logits: torch.Tensor) -> float:
    lp = F.log_softmax(p_logits.double(), -1)
    lq = F.log_softmax(q_logits.double(), -1)
    return float((lp.exp() * (lp - lq)).sum())


def test_prompts_have_three_sizeable_chunks(setups):
    for s in setups:
        assert len(s.prompt.chunk_spans) == 3
        assert all(90 <= len(c) <= 170 for c in s.chunks), [len(c) for c in s.chunks]
        assert len(s.full_tokens) >= 1
        assert s.prompt.chunk_tokens >= 350


def test_blend_ratio_one_equals_full(engine, setups):
    for s in setups:
        b = engine.prefill(s.prompt, _cached(s), "blend", BlendConfig(ratio=1.0),
                           s.prompt.prefix_len)
        assert (b.logits - s.full.logits).abs().max() < TOL
        assert int(b.logits.argmax()) == int(s.full.logits.argmax())
        for layer, (bk, fk) in enumerate(zip(b.k, s.full.k, strict=True)):
            assert (bk - fk).abs().max() < TOL, layer
        assert engine.decode(b, int(b.logits.argmax()), N_DECODE) == s.full_tokens


def test_reuse_of_first_chunk_after_prefix_equals_full(engine, template, setups):
    """precompute_context=prefix: chunk 1 computed after the template prefix is exact KV."""
    for s in setups:
        prompt = template.assemble(s.chunks[:1], "Summarise the context.")
        full = engine.prefill(prompt, [], "full", BlendConfig(), 0)
        _, e1 = prompt.chunk_spans[0]
        cached = [(0, s.prefix_kv), (prompt.prefix_len, s.first_after_prefix)]
        reuse = engine.prefill(prompt, cached, "reuse", BlendConfig(), e1)
        assert reuse.recomputed_per_layer[-1] == len(prompt) - e1
        assert (reuse.logits - full.logits).abs().max() < TOL
        first = int(full.logits.argmax())
        assert int(reuse.logits.argmax()) == first
        assert engine.decode(reuse, first, N_DECODE) == engine.decode(full, first, N_DECODE)


def test_prefix_mode_equals_full(engine, setups):
    for s in setups:
        _, e1 = s.prompt.chunk_spans[0]
        cached = [(0, s.prefix_kv), (s.prompt.prefix_len, s.first_after_prefix)]
        got = engine.prefill(s.prompt, cached, "prefix", BlendConfig(), e1)
        assert (got.logits - s.full.logits).abs().max() < TOL
        assert engine.decode(got, int(got.logits.argmax()), N_DECODE) == s.full_tokens


def test_blend_beats_reuse_on_first_token_kl(engine, setups, capsys):
    rows = []
    for i, s in enumerate(setups):
        cached = _cached(s)
        P = s.prompt.prefix_len
        blend = engine.prefill(s.prompt, cached, "blend", BlendConfig(ratio=0.15), P)
        reuse = engine.prefill(s.prompt, cached, "reuse", BlendConfig(), P)
        kl_b, kl_r = _kl(s.full.logits, blend.logits), _kl(s.full.logits, reuse.logits)
        same_b = int(blend.logits.argmax()) == int(s.full.logits.argmax())
        same_r = int(reuse.logits.argmax()) == int(s.full.logits.argmax())
        rows.append((kl_b, kl_r))
        with capsys.disabled():
            print(f"\n[smollm] prompt {i}: T={len(s.prompt)} KL(full||blend@0.15)={kl_b:.4g} "
                  f"(argmax same: {same_b})  KL(full||reuse)={kl_r:.4g} (argmax same: {same_r}) "
                  f"recomputed/layer={blend.recomputed_per_layer}")
        assert math.isfinite(kl_b) and math.isfinite(kl_r)
        assert kl_b >= 0 and kl_r > 0
    mean_b = sum(b for b, _ in rows) / len(rows)
    mean_r = sum(r for _, r in rows) / len(rows)
    with capsys.disabled():
        print(f"[smollm] mean KL blend@0.15={mean_b:.4g} reuse={mean_r:.4g}")
    assert mean_b < mean_r


def test_api_default_config_blend_one_matches_full(engine, setups, tmp_path, capsys):
    """Default RagkvConfig (fp16 KV storage, anchor precompute context) on the real model:
    blend at 1.0 answers like full prefill, and exactly the same whether chunks are computed
    (miss) or read back from the fp16 store (hit): a miss is used as it is stored."""
    from ragkv.api import RagKV

    rag = RagKV(RagkvConfig(home=tmp_path), engine=engine)
    s = setups[0]
    question = PROMPTS[0][1]
    full = rag.generate(s.chunks, question, mode="full", max_new_tokens=N_DECODE, keep_kv=True)
    assert full.tokens == s.full_tokens
    one = BlendConfig(ratio=1.0)
    miss = rag.generate(s.chunks, question, mode="blend", blend=one, max_new_tokens=N_DECODE,
                        keep_kv=True)
    hit = rag.generate(s.chunks, question, mode="blend", blend=one, max_new_tokens=N_DECODE,
                       keep_kv=True)
    assert miss.trace.misses == 3 and hit.trace.hits == 3
    d_miss = float((miss.first.logits - full.first.logits).abs().max())
    d_hit = float((hit.first.logits - full.first.logits).abs().max())
    with capsys.disabled():
        print(f"\n[smollm] API blend@1.0 vs full, max |logit diff|: miss {d_miss:.3g}, "
              f"fp16 hit {d_hit:.3g}")
    assert torch.equal(miss.first.logits, hit.first.logits)
    assert d_hit < 0.02
    assert miss.tokens == full.tokens == hit.tokens
    rag.index.close()


def test_corrections_lower_blend_kl(engine, setups, capsys):
    """Both corrections of the KV kept from the cache bring blend closer to full."""
    names = ("none", "chunk_mean", "local_mean")
    rows = []
    for s in setups:
        cached, P = _cached(s), s.prompt.prefix_len
        got = {c: _kl(s.full.logits, engine.prefill(
            s.prompt, cached, "blend", BlendConfig(ratio=0.15, correction=c), P).logits)
            for c in names}
        rows.append(got)
    mean = {c: sum(r[c] for r in rows) / len(rows) for c in names}
    with capsys.disabled():
        print(f"\n[smollm] mean KL blend@0.15: no correction {mean['none']:.4g}, "
              f"chunk_mean {mean['chunk_mean']:.4g}, local_mean {mean['local_mean']:.4g}")
    assert mean["chunk_mean"] < 0.9 * mean["none"]  # measured 0.038 vs 0.046 here
    assert mean["local_mean"] < 0.9 * mean["none"]


def test_anchor_context_brings_cached_kv_closer_to_the_prompts(engine, template, setups,
                                                               capsys):
    """The default anchor context: chunks 2..k prefilled after the prefix and the anchor
    passage hold keys closer to the keys they have in the prompt (full prefill) than chunks
    prefilled after the prefix alone (mean relative squared deviation over layers 2..L)."""
    from ragkv.anchor import ANCHOR_TEXT

    r = engine.runner
    dev = {"prefix": [], "anchor": []}
    for s in setups:
        anchor = engine.precompute(list(template.prefix_ids)
                                   + list(template.anchor_ids(ANCHOR_TEXT)))
        cos, sin = r.cos_sin(torch.arange(len(s.prompt.ids)))
        for name, past in (("prefix", s.prefix_kv), ("anchor", anchor)):
            for (st, e), c in zip(s.prompt.chunk_spans[1:], s.chunks[1:], strict=True):
                k = r.rotate(engine.precompute(c, past=past).k, cos[st:e], sin[st:e])
                ref = torch.stack(s.full.k)[:, :, st:e]
                err = (k - ref).pow(2).sum((1, 3)) / ref.pow(2).sum((1, 3))  # [layers, n]
                dev[name].append(float(err[2:].mean()))
    mean = {c: sum(v) / len(v) for c, v in dev.items()}
    with capsys.disabled():
        print(f"\n[smollm] cached-key deviation from full, chunks 2..k: prefix context "
              f"{mean['prefix']:.4g}, anchor context {mean['anchor']:.4g}")
    # measured 0.0243 vs 0.0260 here: these chunks are short (~150 tokens) and the second one
    # starts only ~170 tokens in; on the public sets' 400-700-token chunks the gap is a third
    # or more (docs/benchmarks.md, *Precomputing chunks after context*)
    assert mean["anchor"] < 0.97 * mean["prefix"]
