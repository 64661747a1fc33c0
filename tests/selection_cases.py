"""The kept-set oracle of the selection tests: which positions the first check layer keeps, by
each policy's definition, recomputed from the model's own forward (tiny model matrix from
``engine_cases``).

Until the first check layer every non-prefix token is computed (and the prefix is exact), so the
fresh K/V the blend compares there are full prefill's K/V at that layer. Deviation = squared L2
distance between those pre-RoPE rows and the cached ones, summed over heads and head_dim; qhkvd
weighs it by the attention the question suffix pays each token (mean over heads and suffix
queries); the budget's largest deviations among chunk tokens are kept, plus every uncached
position. Used by ``test_engine_selection.py`` and ``test_engine_selection_guard.py``.
"""

from __future__ import annotations

import functools
import sys
from dataclasses import dataclass

import torch
from engine_cases import _case, _engine, blend
from transformers import DynamicCache

from ragkv.config import BlendConfig
from ragkv.engine.hf import HFEngine, cache_kwarg


@dataclass
class _Layer:
    """One layer of the model's own forward over a prompt (hooks on its projections)."""

    q: torch.Tensor  # [Hq, T, D] pre-RoPE
    k: torch.Tensor  # [Hkv, T, D] pre-RoPE
    v: torch.Tensor  # [Hkv, T, D]
    k_rot: torch.Tensor  # [Hkv, T, D] as the model caches it (after RoPE)


@functools.cache
def _model_layer(name: str, layer: int) -> _Layer:
    eng, c = _engine(name), _case(name)
    model, cfg = eng.model, eng.model.config
    attn = model.model.layers[layer].self_attn
    got: dict[str, torch.Tensor] = {}
    hooks = [getattr(attn, f"{x}_proj").register_forward_hook(
        lambda _m, _i, out, x=x: got.__setitem__(x, out[0])) for x in "qkv"]
    cache = DynamicCache(config=cfg)
    try:
        with torch.inference_mode():
            model(input_ids=torch.tensor([c.prompt.ids]), use_cache=True,
                  **{cache_kwarg(model): cache})
    finally:
        for h in hooks:
            h.remove()
    T, D = len(c.prompt), attn.head_dim
    heads = {x: got[x].shape[-1] // D for x in "qkv"}
    q, k, v = (got[x].view(T, heads[x], D).transpose(0, 1) for x in "qkv")
    return _Layer(q, k, v, cache.layers[layer].keys[0])


def _suffix_attention(name: str, layer: int) -> torch.Tensor:
    """Mean attention ``[T]`` the suffix queries pay each key at ``layer`` (exact causal mask),
    from the model's own rotary embedding and scaling, in float64."""
    eng, c = _engine(name), _case(name)
    attn = eng.model.model.layers[layer].self_attn
    modeling = sys.modules[type(eng.model).__module__]
    m = _model_layer(name, layer)
    T = len(c.prompt)
    pos = torch.arange(c.prompt.suffix_start, T)
    cos, sin = eng.model.model.rotary_emb(m.q, pos[None])
    q_rot, _ = modeling.apply_rotary_pos_emb(m.q[None, :, pos], m.q[None, :, pos], cos, sin)
    k = m.k_rot.double().repeat_interleave(m.q.shape[0] // m.k_rot.shape[0], dim=0)
    scores = q_rot[0].double() @ k.transpose(1, 2) * attn.scaling
    hidden = torch.arange(T)[None, :] > pos[:, None]
    return torch.softmax(scores.masked_fill(hidden, float("-inf")), -1).mean(dim=(0, 1))


def expected_kept(name: str, cfg: BlendConfig) -> tuple[torch.Tensor, float]:
    """The positions the first check layer keeps, by the policy's definition, and the relative
    gap between the last kept and the first dropped score (how far from a tie)."""
    c = _case(name)
    p = c.prompt
    layer = cfg.check_layers[0]
    m = _model_layer(name, layer)
    T = len(p)
    cached_k = torch.full_like(m.k, float("nan"))
    cached_v = torch.full_like(m.v, float("nan"))
    for s, kv in c.cached:
        cached_k[:, s:s + kv.n_tokens] = kv.k[layer]
        cached_v[:, s:s + kv.n_tokens] = kv.v[layer]
    dev = torch.zeros(T, dtype=torch.float64)
    if cfg.deviation_on in ("k", "kv"):
        dev += (m.k.double() - cached_k.double()).pow(2).sum(dim=(0, 2))
    if cfg.deviation_on in ("v", "kv"):
        dev += (m.v.double() - cached_v.double()).pow(2).sum(dim=(0, 2))
    if cfg.policy == "qhkvd":
        dev = dev * _suffix_attention(name, layer)
    in_chunk = torch.zeros(T, dtype=torch.bool)
    for s, e in p.chunk_spans:
        in_chunk[s:e] = True
    n_chunk = int(in_chunk.sum())
    must = ~in_chunk
    must[:p.prefix_len] = False  # the exact prefix is never recomputed
    budget = round(cfg.ratio * n_chunk)
    if cfg.policy == "gradual":  # its first check layer keeps twice the ratio
        budget = round(min(1.0, 2 * cfg.ratio) * n_chunk)
    if cfg.policy == "hkvd+head":
        for s, e in p.chunk_spans:
            must[s:min(e, s + cfg.head_tokens)] = True
        budget = max(0, budget - int((must & in_chunk).sum()))
    free = torch.nonzero(in_chunk & ~must).flatten()
    order = free[torch.argsort(dev[free], descending=True, stable=True)]
    kept = torch.cat([torch.nonzero(must).flatten(), order[:budget]])
    ranked = dev[order]
    gap = float((ranked[budget - 1] - ranked[budget]) / ranked[budget - 1]) if 0 < budget < len(
        order) else 1.0
    return torch.sort(kept).values, gap


def check_selection(engine: HFEngine, name: str, cfg: BlendConfig) -> None:
    """The blend's kept set at the first check layer is :func:`expected_kept`'s."""
    want, gap = expected_kept(name, cfg)
    # Not a near-tie: fused and model K differ by float32 reassociation only (< 1e-5, relative
    # ~1e-6), so a gap of 1e-4 cannot be crossed by rounding.
    assert gap > 1e-4, f"{name} {cfg.policy}@{cfg.ratio}: near-tie at the budget ({gap:.1e})"
    out = blend(engine, _case(name), cfg, record=True)
    got = out.layer_sets[cfg.check_layers[0]]
    missing = sorted(set(want.tolist()) - set(got.tolist()))
    extra = sorted(set(got.tolist()) - set(want.tolist()))
    assert not missing and not extra, f"kept set differs: missing {missing}, extra {extra}"
