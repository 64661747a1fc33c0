"""Bad input of the fusion engine: unknown modes and policies, check layers past the model's
depth, invalid blend configurations, an empty chunk, an unsupported architecture, a sliding
window shorter than the prompt, malformed chunk KV (tiny model matrix from ``engine_cases``)."""

from __future__ import annotations

import pytest
import torch
from engine_cases import (  # noqa: F401 - fixtures are used by name
    _BASE,
    VOCAB,
    _one_thread,
    _Tok,
    assemble,
    blend,
    case,
    engine,
)
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
)

from ragkv.config import POLICIES, BlendConfig
from ragkv.engine.hf import HFEngine
from ragkv.engine.kv import ChunkKV
from ragkv.engine.runner import SUPPORTED, LlamaFamilyRunner
from ragkv.prompt import PromptTemplate

# ---- bad input -----------------------------------------------------------------------------

def test_unknown_mode_raises(engine, case):
    with pytest.raises(ValueError, match="unknown mode"):
        blend(engine, case, BlendConfig(), mode="fastest")


def test_check_layer_beyond_depth_raises(engine, case):
    L = engine.runner.n_layers
    for policy in POLICIES:
        with pytest.raises(ValueError, match="does not exist"):
            blend(engine, case, BlendConfig(ratio=0.15, policy=policy, check_layers=(L,)))
    # The last layer itself is a valid check layer.
    out = blend(engine, case, BlendConfig(ratio=0.15, check_layers=(L - 1,)))
    assert out.recomputed_per_layer[L - 2] == len(case.prompt) - case.prompt.prefix_len


def test_the_default_check_layer_fits_a_shallow_model_and_a_named_one_does_not():
    from ragkv.config import DEFAULT_CHECK_LAYERS
    from ragkv.engine.policies import make_policy

    deep = DEFAULT_CHECK_LAYERS[-1] + 1
    assert make_policy(BlendConfig(), 30).check_layers == DEFAULT_CHECK_LAYERS
    assert make_policy(BlendConfig(), deep).check_layers == DEFAULT_CHECK_LAYERS
    shallow = DEFAULT_CHECK_LAYERS[-1]  # the default names a layer this model lacks
    assert make_policy(BlendConfig(), shallow).check_layers == (shallow - 1,)
    with pytest.raises(ValueError, match="does not exist"):
        make_policy(BlendConfig(check_layers=(deep,)), deep)


def test_unknown_policy_raises():
    with pytest.raises(ValueError, match="unknown selection policy 'random'"):
        BlendConfig(ratio=0.15, policy="random")


@pytest.mark.parametrize(("kwargs", "says"), [
    (dict(ratio=1.5), "ratio"), (dict(ratio=-0.1), "ratio"),
    (dict(check_layers=()), "check_layers"), (dict(check_layers=(0,)), "check_layers"),
    (dict(deviation_on="q"), "deviation_on"),
    # accepted before: no check ran, every token was recomputed under a trace saying 0.1
    (dict(check_layers=(1.5,)), "check_layers"), (dict(check_layers=(True,)), "check_layers"),
    (dict(check_layers="2"), "check_layers"), (dict(min_ratio="0.1"), "min_ratio"),
    (dict(min_ratio=None), "min_ratio"), (dict(head_tokens=2.5), "head_tokens"),
    # accepted before: a bool ratio (traced as True); a NaN start factor recomputed every
    # token at the first check layer (it passed `< 1.0`)
    (dict(ratio=True), "ratio"), (dict(ratio=float("nan")), "ratio"),
    (dict(start_factor=float("nan")), "start_factor"),
    (dict(preselect=float("inf")), "preselect"),
    (dict(floor_ratio=0.1), "floor_ratio sets the budget of the coverage guard"),
])
def test_bad_blend_config(kwargs, says):
    with pytest.raises(ValueError, match=says):
        BlendConfig(**kwargs)


def test_blend_config_normalises_check_layers():
    assert BlendConfig(check_layers=(3, 1, 3)).check_layers == (1, 3)
    assert BlendConfig(check_layers=2).check_layers == (2,)  # one layer, without the tuple


def test_numpy_numbers_are_taken_as_plain_ones(tmp_path):
    """np.float32 ratios were refused as "not within [0, 1]", numpy ints for counts too."""
    import numpy as np

    from ragkv.config import RagkvConfig

    b = BlendConfig(ratio=np.float32(0.5), head_tokens=np.int64(3), check_layers=np.int64(2))
    assert (b.ratio, b.head_tokens, b.check_layers) == (0.5, 3, (2,))
    assert type(b.ratio) is float and type(b.head_tokens) is int
    assert type(b.check_layers[0]) is int  # (a numpy int failed json.dumps of a bench spec)
    cfg = RagkvConfig(home=tmp_path, chunk_tokens=np.int64(64))
    assert cfg.chunk_tokens == 64 and type(cfg.chunk_tokens) is int


def test_choose_takes_what_it_is_given():
    """An empty policy name kept the old policy; it is checked as BlendConfig checks it."""
    b = BlendConfig(policy="hkvd")
    assert b.choose(ratio=0.3) == BlendConfig(policy="hkvd", ratio=0.3)
    assert b.choose(policy="qhkvd").policy == "qhkvd"
    with pytest.raises(ValueError, match="unknown selection policy ''"):
        b.choose(policy="")


@pytest.mark.parametrize(("kwargs", "says"), [
    (dict(chunk_tokens=100.5), "chunk_tokens"), (dict(chunk_tokens="512"), "chunk_tokens"),
    (dict(chunk_tokens=8), "chunk_tokens"), (dict(memory_budget_bytes="1GB"), "memory_budget"),
    (dict(disk_budget_bytes=1.5), "disk_budget"), (dict(remote_budget_bytes=-1), "remote_budget"),
    (dict(engine=None), "engine"), (dict(system_prompt=None), "system_prompt"),
    (dict(blend=0.12), "blend must be a BlendConfig"), (dict(blend={"ratio": 2.0}), "ratio"),
    (dict(blend={"ratoi": 0.2}), "blend: .*unexpected keyword argument 'ratoi'"),
    # accepted before, each failing later deep inside (torch, pathlib, the codec, the index)
    (dict(dtype="fp16"), "dtype must be"), (dict(device="gpu"), "device must be"),
    (dict(device=None), "device must be"), (dict(model=123), "model must be a folder path"),
    (dict(kv_dtype="int8", int8_key_scales="bogus"), "int8_key_scales"),
    (dict(anchor_text=123), "anchor_text must be a string"),
    (dict(index_url=123), "index_url must be a string"),
    (dict(blob_options="x"), "blob_options must be a dict"),
])
def test_bad_ragkv_config_is_a_value_error_that_names_the_setting(tmp_path, kwargs, says):
    from ragkv.config import RagkvConfig

    with pytest.raises(ValueError, match=says):
        RagkvConfig(home=tmp_path, **kwargs)


@pytest.mark.parametrize("home", [None, "", "  "])
def test_a_home_that_is_no_path_is_refused(home):
    """``home=""`` was taken as the current folder, None a pathlib TypeError."""
    from ragkv.config import RagkvConfig

    with pytest.raises(ValueError, match="home must be a folder path"):
        RagkvConfig(home=home)


def test_devices_torch_knows_are_taken():
    from ragkv.config import RagkvConfig

    for device in ("auto", "cpu", "cuda", "cuda:1", "mps"):
        assert RagkvConfig(device=device).device == device


def test_blend_settings_may_come_as_a_mapping(tmp_path):
    from ragkv.config import RagkvConfig

    cfg = RagkvConfig(home=tmp_path, blend={"ratio": 0.3, "check_layers": 3})
    assert cfg.blend == BlendConfig(ratio=0.3, check_layers=(3,))


def test_empty_chunk_in_assemble_raises():
    class Stub:
        def __call__(self, text, add_special_tokens=False):
            class R:
                input_ids = [ord(ch) % VOCAB for ch in text]
            return R()

    tpl = PromptTemplate((1, 2), (3,), "Q: ", " A:", Stub())
    ok = tpl.assemble([[10, 11], [12]], "why")
    assert ok.chunk_spans == [(2, 4), (5, 6)]
    with pytest.raises(ValueError, match="chunk 1"):
        tpl.assemble([[10, 11], []], "why")


def test_unsupported_architecture_raises():
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=1, n_head=2,
                                      n_positions=64))
    with pytest.raises(ValueError) as info:
        LlamaFamilyRunner(gpt2)
    for name in SUPPORTED:
        assert name in str(info.value)
    assert "GPT2LMHeadModel" in str(info.value)
    with pytest.raises(ValueError):
        HFEngine(gpt2, _Tok())


def test_sliding_window_shorter_than_prompt_raises():
    torch.manual_seed(0)
    model = MistralForCausalLM(MistralConfig(**_BASE, head_dim=16, sliding_window=32)).eval()
    eng = HFEngine(model, _Tok())
    with pytest.raises(ValueError, match="sliding window"):
        eng.precompute(list(range(3, 43)))
    prompt = assemble([5, 6, 7], [list(range(3, 40))], [8, 9])
    with pytest.raises(ValueError, match="sliding window"):
        eng.prefill(prompt, [], "prefix", BlendConfig(), 0)


@pytest.mark.parametrize("rope", [
    # LongRoPE: other frequencies past the original length (here 32)
    {"rope_type": "longrope", "rope_theta": 10000.0, "original_max_position_embeddings": 32,
     "short_factor": [1.0 + 0.1 * i for i in range(8)],
     "long_factor": [2.0 + 3.0 * i for i in range(8)]},
    # dynamic NTK: other frequencies past the trained length
    {"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 2.0},
])
def test_a_rope_whose_frequencies_change_with_length_is_refused_past_that_length(rope):
    """KV computed on a short span (a chunk, the template prefix) holds the short-length
    rotations: placed in a longer prompt it silently differed from full prefill (max logit
    gap 2.57). The facade cuts prompts at that length; the engine refuses longer ones."""
    from ragkv.engine.runner import fusion_window

    torch.manual_seed(0)
    cfg = LlamaConfig(**{**_BASE, "max_position_embeddings": 40}, head_dim=16,
                      rope_parameters=rope)
    limit = 32 if rope["rope_type"] == "longrope" else 40
    assert fusion_window(cfg)[0] == limit
    eng = HFEngine(LlamaForCausalLM(cfg).eval(), _Tok())
    prompt = assemble([5, 6, 7], [list(range(3, 40))], [8, 9])
    assert len(prompt.ids) > limit
    with pytest.raises(ValueError, match="frequencies change"):
        eng.prefill(prompt, [], "prefix", BlendConfig(), 0)
    assert fusion_window(LlamaConfig(**_BASE)) is None  # plain RoPE: any length


def test_chunk_kv_shape_checks():
    with pytest.raises(ValueError):
        ChunkKV(torch.zeros(2, 2, 3, 4), torch.zeros(2, 2, 4, 4))
    kv = ChunkKV(torch.randn(2, 2, 3, 4), torch.randn(2, 2, 3, 4))
    t = kv.to_tensors("float16")
    assert t["k"].dtype == torch.float16
    back = ChunkKV.from_tensors(t, layers=2, kv_heads=2, head_dim=4, n_tokens=3)
    assert back.n_tokens == 3
    with pytest.raises(ValueError, match="shape"):
        ChunkKV.from_tensors(t, layers=2, kv_heads=2, head_dim=4, n_tokens=4)
    t["v"][0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="non-finite"):
        ChunkKV.from_tensors(t, layers=2, kv_heads=2, head_dim=4, n_tokens=3)
