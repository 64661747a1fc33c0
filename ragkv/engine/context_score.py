"""Context scores: which chunk tokens' KV depends most on what precedes the chunk.

With ``anchor`` precompute every chunk has two entries: prefilled after the template prefix,
and after the prefix and the anchor passage. A token whose pre-RoPE keys move far between the
two is one whose KV depends on its context, so its cached KV is the likeliest to be stale in a
new prompt. The score is computed once, when the anchor entry is stored, and kept with it;
``BlendConfig.preselect`` then computes only the highest-scored tokens before the first check
layer instead of every token (the check layer still picks the final set among them). With the
question-aware policy (``qhkvd``) each score is first weighted by the attention the question
pays the token, probed over the cached KV (:func:`ragkv.engine.blend.probe_question`): what
drifts and what the question reads, the two factors of ``qhkvd``'s check.

Layer 0 sees no context (its KV is the same in both entries), so the score reads layers 1 and
2: those before and at the default check layer.
"""

from __future__ import annotations

import torch

from ragkv.engine.kv import ChunkKV

#: the layers whose key movement is scored (those a model has)
SCORE_LAYERS = (1, 2)


def context_score(reference: ChunkKV, kv: ChunkKV) -> torch.Tensor | None:
    """Per-token score ``[tokens]`` (float32, CPU) of ``kv`` against ``reference``, the same
    tokens' entry in another context: the squared distance of pre-RoPE keys summed over heads,
    divided by its mean over the chunk, averaged over :data:`SCORE_LAYERS`. None when the two
    do not describe the same tokens of one model (either may hold only its first layers,
    :func:`scoring_part`)."""
    if reference.k.shape[1:] != kv.k.shape[1:]:
        return None
    layers = [layer for layer in SCORE_LAYERS if layer < min(kv.k.shape[0],
                                                             reference.k.shape[0])]
    if not layers or kv.n_tokens == 0:
        return None
    idx = torch.tensor(layers, device=kv.k.device)
    a = kv.k.index_select(0, idx).float()
    b = reference.k.index_select(0, idx.to(reference.k.device)).to(a.device).float()
    d = (a - b).pow(2).sum(dim=(1, 3))  # [layers, tokens]
    d = d / d.mean(dim=1, keepdim=True).clamp_min(1e-12)
    score = d.mean(dim=0).cpu()
    return score if bool(torch.isfinite(score).all()) else None


def scoring_part(kv: ChunkKV) -> ChunkKV:
    """A copy of the layers of ``kv`` that :func:`context_score` reads: kept while the rest
    of the entry is freed (a view would hold every layer's storage)."""
    n = max(SCORE_LAYERS) + 1
    return ChunkKV(kv.k[:n].clone(), kv.v[:n].clone())


def preselected(starts_scores: dict[int, torch.Tensor], spans: list[tuple[int, int]],
                budget: int) -> torch.Tensor:
    """Chunk positions computed from layer 0 under a preselection of ``budget`` tokens among
    the scored chunks: their ``budget`` highest-scored positions, and every position of a chunk
    with no score. ``starts_scores``: span start -> score ``[span length]``."""
    whole = [torch.arange(s, e) for s, e in spans if s not in starts_scores]
    scored = [(s, starts_scores[s]) for s, _ in spans if s in starts_scores]
    picked = []
    if scored and budget > 0:
        pos = torch.cat([torch.arange(s, s + sc.numel()) for s, sc in scored])
        sc = torch.cat([sc.float().cpu() for _, sc in scored])
        picked = [pos[torch.topk(sc, min(budget, sc.numel())).indices]]
    out = whole + picked
    return torch.cat(out) if out else torch.empty(0, dtype=torch.long)
