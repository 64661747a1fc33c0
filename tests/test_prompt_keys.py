"""Prompt assembly from token ids (real SmolLM2 tokenizer) and content-addressed cache keys."""

from __future__ import annotations

import copy
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from ragkv.keys import COLD_CONTEXT, KV_LAYOUT, chunk_key, context_digest, model_fingerprint
from ragkv.prompt import PromptTemplate

SYSTEM = "You are a helpful assistant. Answer the question using the context."
# Chunk texts whose seams merge differently when the texts are joined and re-tokenized:
# "hello wor" + "ld" is " world" as one token in the joined text.
C1 = "The greeting printed by the demo is hello wor"
C2 = "ld says hi, then information theory"
C3 = "  indented start of a third chunk."
QUESTION = "What does the demo print?"


def enc(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False).input_ids)


@pytest.fixture(scope="module")
def template(tokenizer) -> PromptTemplate:
    return PromptTemplate.from_tokenizer(tokenizer, SYSTEM)


# ---- PromptTemplate ------------------------------------------------------------------------

def test_assemble_is_exact_concatenation_of_pieces(tokenizer, template):
    chunks = [enc(tokenizer, C1), enc(tokenizer, C2)]
    p = template.assemble(chunks, QUESTION)
    want = [*template.prefix_ids, *chunks[0], *template.sep_ids, *chunks[1],
            *template.suffix_ids(QUESTION)]
    assert p.ids == want
    assert list(template.sep_ids) == enc(tokenizer, "\n\n")
    # The prefix is the chat template's head, rendered once.
    head = tokenizer.decode(list(template.prefix_ids))
    assert head.startswith("<|im_start|>system\n" + SYSTEM)
    assert head.endswith("Context:\n")
    tail = tokenizer.decode(template.suffix_ids(QUESTION))
    assert tail == f"\n\nQuestion: {QUESTION}<|im_end|>\n<|im_start|>assistant\n"


def test_spans_and_offsets_are_consistent(tokenizer, template):
    chunks = [enc(tokenizer, c) for c in (C1, C2, C3)]
    p = template.assemble(chunks, QUESTION)
    assert p.prefix_len == len(template.prefix_ids)
    assert p.chunk_spans[0][0] == p.prefix_len
    assert len(p.chunk_spans) == 3
    sep = len(template.sep_ids)
    for (s, e), c in zip(p.chunk_spans, chunks, strict=True):
        assert e - s == len(c)
        assert p.ids[s:e] == c
    for (_, e), (s2, _) in zip(p.chunk_spans, p.chunk_spans[1:], strict=False):
        assert s2 - e == sep
        assert p.ids[e:s2] == list(template.sep_ids)
    assert p.suffix_start == p.chunk_spans[-1][1]
    assert p.ids[p.suffix_start:] == template.suffix_ids(QUESTION)
    assert p.chunk_tokens == sum(len(c) for c in chunks)
    assert len(p) == len(p.ids)
    unc = p.uncached_positions()
    assert unc == [*range(p.chunk_spans[0][1], p.chunk_spans[1][0]),
                   *range(p.chunk_spans[1][1], p.chunk_spans[2][0]),
                   *range(p.suffix_start, len(p))]


def test_chunks_are_never_retokenized(tokenizer, template):
    ids1, ids2, ids3 = enc(tokenizer, C1), enc(tokenizer, C2), enc(tokenizer, C3)
    # The seam really is one where joining and re-tokenizing merges differently.
    assert enc(tokenizer, C1 + C2) != ids1 + ids2
    p = template.assemble([ids1, ids2, ids3], QUESTION)
    # The prompt is the same text the chat template renders for the joined context...
    context = "\n\n".join([C1, C2, C3])
    rendered = tokenizer.apply_chat_template(
        [{"role": "system", "content": SYSTEM},
         {"role": "user", "content": f"Context:\n{context}\n\nQuestion: {QUESTION}"}],
        tokenize=False, add_generation_prompt=True)
    assert tokenizer.decode(p.ids) == rendered
    # ... but not its tokenization: the chunk spans hold each chunk's standalone ids.
    assert p.ids != enc(tokenizer, rendered)
    for (s, e), ids in zip(p.chunk_spans, (ids1, ids2, ids3), strict=True):
        assert p.ids[s:e] == ids
    # Token ids held as numpy or torch integers are stored as plain ints.
    q = template.assemble([[np.int64(t) for t in ids1], list(torch.tensor(ids2))], QUESTION)
    assert q.ids[q.chunk_spans[0][0]:q.chunk_spans[0][1]] == ids1
    assert q.ids[q.chunk_spans[1][0]:q.chunk_spans[1][1]] == ids2
    assert all(type(t) is int for t in q.ids)


def test_assemble_accepts_array_chunks(tokenizer, template):
    ids1, ids2 = enc(tokenizer, C1), enc(tokenizer, C2)
    q = template.assemble([np.array(ids1), torch.tensor(ids2)], QUESTION)
    assert q.ids == template.assemble([ids1, ids2], QUESTION).ids


def test_question_is_stripped_and_empty_question_rejected(template):
    ids = [[100, 200, 300]]
    assert template.assemble(ids, f"  {QUESTION} \n").ids == template.assemble(ids, QUESTION).ids
    for bad in ("", "   ", "\n\t"):
        with pytest.raises(ValueError, match="empty"):
            template.assemble(ids, bad)


def test_empty_chunk_rejected(template):
    with pytest.raises(ValueError, match="chunk 0"):
        template.assemble([[]], QUESTION)
    with pytest.raises(ValueError, match="chunk 2"):
        template.assemble([[5], [6], []], QUESTION)


def test_no_chunks_is_prefix_plus_suffix(template):
    p = template.assemble([], QUESTION)
    assert p.chunk_spans == []
    assert p.ids == [*template.prefix_ids, *template.suffix_ids(QUESTION)]
    assert p.suffix_start == p.prefix_len


def test_template_without_chat_template(smol_path: Path):
    tok = AutoTokenizer.from_pretrained(str(smol_path))
    tok.chat_template = None
    tpl = PromptTemplate.from_tokenizer(tok, "Be brief.")
    assert tokenizer_text(tok, tpl.prefix_ids) == "Be brief.\n\nContext:\n"
    assert tpl.suffix_head == "\n\nQuestion: " and tpl.suffix_tail == "\nAnswer:"
    p = tpl.assemble([enc(tok, C1)], "why?")
    assert tok.decode(p.ids) == f"Be brief.\n\nContext:\n{C1}\n\nQuestion: why?\nAnswer:"


# Spellings of SmolLM2's special tokens, as a page about chat templates or a code dump holds.
SPELLED = "End the turn with <|im_end|>, then <|im_start|>assistant; see <filename> too."


def test_content_that_spells_a_special_token_stays_text(tokenizer, template):
    """In a chunk or a question a special token's spelling is text: the prompt holds the
    template's control tokens and no others, and reads back as written."""
    from ragkv.chunking import chunk_text, tokenize_chunk

    specials = {t for t, a in tokenizer.added_tokens_decoder.items() if a.special}
    chunk = tokenize_chunk(SPELLED, tokenizer)
    assert not specials & set(chunk) and tokenizer.decode(chunk) == SPELLED
    assert [c.token_ids for c in chunk_text(SPELLED, tokenizer, 512)] == [chunk]
    assert template.chunk_ids(SPELLED) == chunk
    assert template.anchor_ids(SPELLED) == (*chunk, *template.sep_ids)  # a corpus passage too
    plain = template.assemble([enc(tokenizer, C1)], QUESTION)
    spelled = template.assemble([chunk], SPELLED)
    assert [t for t in spelled.ids if t in specials] == [t for t in plain.ids if t in specials]
    assert tokenizer.decode(spelled.ids[spelled.suffix_start:]) == (
        f"\n\nQuestion: {SPELLED}<|im_end|>\n<|im_start|>assistant\n")
    # Text without such a spelling is encoded as it always was, id for id.
    assert chunk_text(C1, tokenizer, 512)[0].token_ids == enc(tokenizer, C1)
    assert template.suffix_ids(QUESTION) == enc(
        tokenizer, f"{template.suffix_head}{QUESTION}{template.suffix_tail}")


def tokenizer_text(tok: Any, ids) -> str:
    return tok.decode(list(ids))


def test_template_is_deterministic(tokenizer):
    a = PromptTemplate.from_tokenizer(tokenizer, SYSTEM)
    b = PromptTemplate.from_tokenizer(tokenizer, SYSTEM)
    assert a == b
    assert PromptTemplate.from_tokenizer(tokenizer, "Other system.") != a


# ---- keys ----------------------------------------------------------------------------------

def _env(root: Path, hashseed: str) -> dict[str, str]:
    """A child interpreter with another hash seed (so any use of hash() would show)."""
    path = os.pathsep.join(p for p in (str(root), os.environ.get("PYTHONPATH")) if p)
    return {**os.environ, "PYTHONPATH": path, "PYTHONHASHSEED": hashseed}


FP = "f" * 64
IDS = [1, 17, 9000, 42, 42, 3]


def test_chunk_key_stable_across_processes():
    here = chunk_key(FP, IDS, context=context_digest([5, 6]), kv_dtype="bfloat16")
    code = ("from ragkv.keys import chunk_key, context_digest; "
            f"print(chunk_key({FP!r}, {IDS!r}, context=context_digest([5, 6]), "
            "kv_dtype='bfloat16'))")
    root = Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, cwd=root, env=_env(root, "12345"))
    assert out.stdout.strip() == here
    assert len(here) == 64 and int(here, 16) >= 0


def test_chunk_key_covers_everything_that_produced_the_kv():
    base = chunk_key(FP, IDS)
    variants = {
        "model": chunk_key("e" + FP[1:], IDS),
        "context": chunk_key(FP, IDS, context=context_digest([1, 2, 3])),
        "dtype": chunk_key(FP, IDS, kv_dtype="float32"),
        "layout": chunk_key(FP, IDS, layout=KV_LAYOUT + "x"),
        "token": chunk_key(FP, [*IDS[:-1], IDS[-1] + 1]),
        "order": chunk_key(FP, IDS[::-1]),
        "shorter": chunk_key(FP, IDS[:-1]),
        "longer": chunk_key(FP, [*IDS, 0]),
    }
    for name, key in variants.items():
        assert key != base, name
    assert len(set(variants.values())) == len(variants)
    # Defaults are what the API uses.
    assert base == chunk_key(FP, IDS, context=COLD_CONTEXT, kv_dtype="float16", layout=KV_LAYOUT)


def test_chunk_key_is_position_free_and_type_free():
    """The same ids give the same key wherever the chunk lands, whatever int type holds them."""
    base = chunk_key(FP, IDS)
    assert chunk_key(FP, tuple(IDS)) == base
    assert chunk_key(FP, np.array(IDS, dtype=np.int64)) == base
    assert chunk_key(FP, torch.tensor(IDS)) == base
    prompt_a = [7, 7, *IDS, 8]
    prompt_b = [9, 9, 9, 9, 9, *IDS]
    assert chunk_key(FP, prompt_a[2:2 + len(IDS)]) == chunk_key(FP, prompt_b[5:]) == base


def test_context_digest():
    assert context_digest(None) == COLD_CONTEXT
    a = context_digest([1, 2, 3])
    assert a.startswith("prefix:") and a != COLD_CONTEXT
    assert context_digest((1, 2, 3)) == a == context_digest(np.array([1, 2, 3]))
    assert context_digest([1, 2, 4]) != a
    assert context_digest([]) != COLD_CONTEXT


def _tiny(seed: int = 0, dtype=torch.float32) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1)
    return LlamaForCausalLM(cfg).to(dtype).eval()


def test_model_fingerprint_tracks_weights():
    m = _tiny()
    fp = model_fingerprint(m)
    assert fp == model_fingerprint(m)
    assert len(fp) == 64
    twin = copy.deepcopy(m)
    twin.config._name_or_path = "/somewhere/else"
    assert model_fingerprint(twin) == fp  # weights, not names
    assert model_fingerprint(_tiny(seed=0)) == fp  # same seed, same weights
    with torch.no_grad():
        twin.model.layers[1].mlp.down_proj.weight[3, 5] += 1e-3
    assert model_fingerprint(twin) != fp
    assert model_fingerprint(_tiny(seed=1)) != fp


def test_model_fingerprint_tracks_config_and_dtype():
    m = _tiny()
    fp = model_fingerprint(m)
    other = copy.deepcopy(m)
    other.config.rms_norm_eps = 1e-5 if m.config.rms_norm_eps != 1e-5 else 1e-6
    assert model_fingerprint(other) != fp
    bf = _tiny(dtype=torch.bfloat16)
    fp_bf = model_fingerprint(bf)
    assert fp_bf != fp
    assert fp_bf == model_fingerprint(copy.deepcopy(bf))


def test_model_fingerprint_stable_across_processes():
    m = _tiny(seed=3)
    code = ("import torch; from transformers import LlamaConfig, LlamaForCausalLM; "
            "from ragkv.keys import model_fingerprint; torch.manual_seed(3); "
            "cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, "
            "num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1); "
            "print(model_fingerprint(LlamaForCausalLM(cfg).eval()))")
    root = Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, cwd=root, env=_env(root, "999"))
    assert out.stdout.strip().splitlines()[-1] == model_fingerprint(m)
