"""Cache keys are a fixed function of what produced the KV (docs/design.md §3.2).

The key format is part of every stored cache: a change to it (field names, JSON form, digest)
silently orphans every entry, so it is pinned here, and a deliberate change bumps
``KV_LAYOUT`` and these constants together. ``KeySpace`` is the only place keys are derived:
each of its methods names a precompute context, checked against the plain ``chunk_key``.
"""

from __future__ import annotations

import copy
import hashlib
import json

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, configuration_utils

from ragkv.keys import (
    COLD_CONTEXT,
    KV_LAYOUT,
    KeySpace,
    chunk_key,
    context_digest,
    model_fingerprint,
    position_context,
    stored_contexts,
)

FP = "f" * 64
IDS = [1, 17, 9000, 42, 42, 3]
PREFIX = (11, 12, 13)


def _spec_key(model: str, ids, context: str, dtype: str, layout: str = KV_LAYOUT) -> str:
    """The documented derivation: SHA-256 of canonical JSON (sorted keys, no spaces)."""
    payload = {"context": context, "dtype": dtype, "ids": list(ids), "layout": layout,
               "model": model}
    blob = json.dumps(payload, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(blob).hexdigest()


def test_key_format_is_pinned():
    ctx = context_digest([5, 6])
    assert ctx == ("prefix:2f9cf80b937f44b41379ae3765c65668e5e96241d19d2088e76d72d18ea324b2")
    key = chunk_key(FP, IDS, context=ctx, kv_dtype="bfloat16")
    assert key == "c9992cc259f3889f47d0178550f8610d0d8c96fa8a0c40e5fc1e573c18cac489"
    assert key == _spec_key(FP, IDS, ctx, "bfloat16")
    assert ctx == "prefix:" + hashlib.sha256(b"[5,6]").hexdigest()
    assert chunk_key(FP, IDS) == _spec_key(FP, IDS, COLD_CONTEXT, "float16")


def test_key_space_chunk_keys_name_the_precompute_context():
    space = KeySpace(FP, "float16", PREFIX)  # prefix-context precompute (the default)
    assert space.context == "prefix"
    assert space.context_name() == context_digest(PREFIX)
    assert space.context_name("prefix") == context_digest(PREFIX)
    assert space.context_name("cold") == COLD_CONTEXT
    assert space.chunk(IDS) == chunk_key(FP, IDS, context=context_digest(PREFIX),
                                         kv_dtype="float16")
    assert space.chunk(IDS, "cold") == chunk_key(FP, IDS, kv_dtype="float16")
    cold = KeySpace(FP, "float16", PREFIX, context="cold")
    assert cold.context_name() == COLD_CONTEXT
    assert cold.chunk(IDS) == space.chunk(IDS, "cold") != space.chunk(IDS)
    assert cold.chunk(IDS, "prefix") == space.chunk(IDS)


def test_key_space_keys_name_the_stored_dtype_and_model():
    a = KeySpace(FP, "float16", PREFIX)
    for other in (KeySpace(FP, "int8/k-channel/v-token", PREFIX),
                  KeySpace("e" * 64, "float16", PREFIX), KeySpace(FP, "float16", (11, 12))):
        assert other.chunk(IDS) != a.chunk(IDS), other
    q8 = KeySpace(FP, "int8/k-channel/v-token", PREFIX)
    assert q8.chunk(IDS) == chunk_key(FP, IDS, context=context_digest(PREFIX),
                                      kv_dtype="int8/k-channel/v-token")
    assert q8.exact(IDS) == chunk_key(FP, IDS, kv_dtype="int8/k-channel/v-token")


def test_exact_keys_are_cold_in_any_space():
    """The template prefix is computed from position 0 after nothing: one key in any space."""
    for context in ("prefix", "cold"):
        space = KeySpace(FP, "bfloat16", PREFIX, context=context)
        assert space.exact(IDS) == chunk_key(FP, IDS, kv_dtype="bfloat16")
        assert space.exact(IDS) == space.chunk(IDS, "cold")


def test_after_keys_name_exactly_the_tokens_before():
    space = KeySpace(FP, "float16", PREFIX)
    assert space.after([], IDS) == space.exact(IDS) == space.chunk(IDS, "cold")
    assert space.after(PREFIX, IDS) == space.chunk(IDS) == space.after(list(PREFIX), IDS)
    assert space.after([9], IDS) == chunk_key(FP, IDS, context=context_digest([9]),
                                              kv_dtype="float16")
    assert space.after([9], IDS) != space.after([9, 9], IDS)
    bf16 = KeySpace(FP, "bfloat16", PREFIX)
    assert bf16.after([], IDS) == chunk_key(FP, IDS, kv_dtype="bfloat16")
    assert bf16.after([9], IDS) == chunk_key(FP, IDS, context=context_digest([9]),
                                             kv_dtype="bfloat16")


# ---- model fingerprint ---------------------------------------------------------------------

def _tiny(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1)
    return LlamaForCausalLM(cfg).eval()


def test_fingerprint_ignores_what_loading_and_the_runtime_set(monkeypatch):
    """The same weights loaded from another path, in another dtype spelling, with another cache
    setting or by another transformers version read the same KV."""
    m = _tiny()
    fp = model_fingerprint(m)
    for name, value in (("_name_or_path", "/else"), ("_model_name_or_path", "/else"),
                        ("dtype", "bfloat16"), ("_attn_implementation_autoset", True),
                        ("use_cache", not m.config.use_cache)):
        twin = copy.deepcopy(m)
        setattr(twin.config, name, value)
        assert twin.config.to_dict()[name] != m.config.to_dict().get(name), name
        assert model_fingerprint(twin) == fp, name
    # to_dict() stamps the running version: another one is another release of transformers.
    monkeypatch.setattr(configuration_utils, "__version__", "0.0.1")
    assert m.config.to_dict()["transformers_version"] == "0.0.1"
    assert model_fingerprint(m) == fp


def test_fingerprint_does_not_depend_on_config_key_order():
    m = _tiny()
    fp = model_fingerprint(m)
    entries = list(vars(m.config).items())
    vars(m.config).clear()
    vars(m.config).update(reversed(entries))
    assert list(m.config.to_dict()) != [k for k, _ in entries if k in m.config.to_dict()]
    assert model_fingerprint(m) == fp


def test_fingerprint_covers_config_values_json_cannot_hold():
    """A quantization config holds torch dtypes: still hashed, by name."""
    m = _tiny()
    m.config.quantization_config = {"bnb_4bit_compute_dtype": torch.bfloat16}
    a = model_fingerprint(m)
    m.config.quantization_config = {"bnb_4bit_compute_dtype": torch.float16}
    assert model_fingerprint(m) != a


def test_fingerprint_covers_every_tensor_dtype_and_modules_without_config():
    m = _tiny()
    m.register_buffer("q8", torch.arange(5, dtype=torch.int8))  # an odd-sized int8 tensor
    a = model_fingerprint(m)
    m.q8[2] = 7
    assert model_fingerprint(m) != a
    lin = torch.nn.Linear(3, 2)
    b = model_fingerprint(lin)
    assert len(b) == 64 and b == model_fingerprint(copy.deepcopy(lin))
    with torch.no_grad():
        lin.weight[0, 0] += 1.0
    assert model_fingerprint(lin) != b



def test_fingerprint_hashes_dtypes_numpy_lacks_and_changes_with_their_bytes():
    """float8 and bfloat16 weights (numpy has neither) and 0-d buffers hash by their bytes."""
    m = _tiny()
    m.register_buffer("scale", torch.tensor(0.5))
    m.register_buffer("f8", torch.linspace(-2, 2, 6).to(torch.float8_e4m3fn))
    m.register_buffer("bf", torch.linspace(-2, 2, 6).to(torch.bfloat16))
    a = model_fingerprint(m)
    for name in ("scale", "f8", "bf"):
        twin = copy.deepcopy(m)
        buf = getattr(twin, name)
        buf.reshape(-1).view(torch.uint8)[0] ^= 1
        assert model_fingerprint(twin) != a, name
    assert model_fingerprint(copy.deepcopy(m)) == a

ANCHOR = (21, 22, 23)


def test_anchor_keys_name_the_prefix_and_the_anchor():
    """An anchor-context entry is the chunk prefilled after the prefix and the anchor; the
    first prompt position reads the prefix-context entry (exact there), later ones the anchor
    entry, and another anchor passage is another key."""
    space = KeySpace(FP, "float16", PREFIX, context="anchor", anchor_ids=ANCHOR)
    assert space.before("anchor") == PREFIX + ANCHOR
    assert space.chunk(IDS) == space.after(PREFIX + ANCHOR, IDS)
    assert space.chunk(IDS) not in {space.chunk(IDS, "prefix"), space.chunk(IDS, "cold")}
    assert space.at(IDS, 0) == space.chunk(IDS, "prefix") == KeySpace(FP, "float16",
                                                                      PREFIX).chunk(IDS)
    assert space.at(IDS, 1) == space.at(IDS, 5) == space.chunk(IDS, "anchor")
    assert KeySpace(FP, "float16", PREFIX, "anchor", (21, 22)).chunk(IDS) != space.chunk(IDS)
    # other contexts read one entry at every position
    for context in ("prefix", "cold"):
        plain = KeySpace(FP, "float16", PREFIX, context=context, anchor_ids=ANCHOR)
        assert plain.at(IDS, 0) == plain.at(IDS, 3) == plain.chunk(IDS)
    assert stored_contexts("anchor") == ("prefix", "anchor")
    assert stored_contexts("prefix") == ("prefix",) and stored_contexts("cold") == ("cold",)
    assert position_context("anchor", 0) == "prefix"
    assert position_context("anchor", 1) == "anchor"
    with pytest.raises(ValueError, match="anchor's token ids"):
        KeySpace(FP, "float16", PREFIX, context="anchor").chunk(IDS)


def test_a_chunk_is_read_in_the_context_asked_for():
    space = KeySpace(FP, "float16", PREFIX, context="anchor", anchor_ids=(7, 8))
    for ctx in ("cold", "prefix", "anchor"):
        assert space.at(IDS, 1, ctx) == space.chunk(IDS, position_context(ctx, 1))
    assert space.at(IDS, 1, "cold") != space.at(IDS, 1)
    with pytest.raises(ValueError, match="^anchor-context keys need the anchor's token ids$"):
        KeySpace(FP, "float16", PREFIX, context="anchor").before()
