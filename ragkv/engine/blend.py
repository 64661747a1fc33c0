"""The fusion: cached chunk KV placed at new positions, selected tokens recomputed.

One loop serves every mode but ``full``: the policy decides which positions are computed at
layer 0 and which stay active after each check layer. Everything else follows from three
rules (docs/design.md §3):

* cached keys are stored before RoPE and rotated to their true positions by the model's own
  rotary embedding (exact re-encoding);
* a computed token's fresh K/V overwrites the cached entry at its position in the layer's
  buffer, so later queries see the best KV available;
* a computed query at position p attends to keys at positions <= p only (exact causal mask),
  whatever mix of cached and fresh keys sits there.

A ``Correction`` (``correction.py``) may then move the KV of the chunk tokens still served from
the cache by the drift the recomputed tokens of their chunk show at the same layer.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch

from ragkv.engine.correction import Correction, apply_drift, chunk_index
from ragkv.engine.kernels import TorchOps
from ragkv.engine.kv import ChunkKV
from ragkv.engine.loading import LayerClock, LayerFeed, Workspace
from ragkv.engine.policies import SelectionContext, SelectionPolicy
from ragkv.engine.runner import LlamaFamilyRunner

#: the first layer whose cached KV can depend on what preceded the chunk: layer 0's K/V are
#: projections of each token's own embedding, so a cached entry there differs from fresh KV
#: only by the stored dtype's rounding, and a correction would only spread that noise
CORRECT_FROM_LAYER = 1


@dataclass
class FusedPrefill:
    """Result of one prefill.

    k, v: per layer ``[kv_heads, T, head_dim]``, keys rotated to their positions (ready for
    decoding). logits: ``[vocab]`` at the last position (None when not asked for).
    recomputed_per_layer: how many positions' K/V were computed at each layer. layer_sets: the
    computed positions per layer when recording was asked for (for inspection). layer_s /
    place_s: seconds each layer took to compute and to place its cached KV (the loading
    controller's measurements).
    """

    k: list[torch.Tensor]
    v: list[torch.Tensor]
    logits: torch.Tensor | None
    recomputed_per_layer: list[int]
    final_positions: torch.Tensor
    layer_sets: list[torch.Tensor] = field(default_factory=list)
    layer_s: list[float] = field(default_factory=list)
    place_s: list[float] = field(default_factory=list)
    #: tokens the policy's quality guard recomputed beyond the ratio's budget (negative: spared)
    guard_tokens: int = 0


def deviation(ops: TorchOps, k_new: torch.Tensor, v_new: torch.Tensor, k_buf: torch.Tensor,
              v_buf: torch.Tensor, index: torch.Tensor, on: str) -> torch.Tensor:
    """Per-token squared L2 distance ``[n]`` between fresh pre-RoPE K and/or V ``[kv_heads, n,
    head_dim]`` and the cached rows ``index`` of ``k_buf/v_buf [kv_heads, T, head_dim]``.
    Pre-RoPE keys make the comparison position-free."""
    d = ops.deviation(k_new, k_buf, index) if on in ("k", "kv") else None
    if on in ("v", "kv"):
        d = ops.deviation(v_new, v_buf, index, d)
    return d


def fuse(runner: LlamaFamilyRunner, ids: torch.Tensor, cached: list[tuple[int, ChunkKV]],
         ctx: SelectionContext, policy: SelectionPolicy, *, deviation_on: str = "k",
         record: bool = False, pipelined: bool | None = None,
         workspace: Workspace | None = None,
         correction: Correction | None = None, logits: bool = True) -> FusedPrefill:
    """Prefill ``ids [T]`` reusing ``cached`` spans ``(start, ChunkKV)``.

    Positions covered by no span must be among the policy's initial positions; the last
    position (end of the question suffix) always is, since it carries the first-token logits.
    With a ``workspace`` the result's K/V are views into it, valid until its next use.

    After the last layer only the last position's hidden state is read (for the logits), so
    that layer attends and runs its MLP for that position alone; every computed position's
    K/V is still written. ``logits=False`` (an engine that computes the last position itself)
    skips the last layer's attention and MLP altogether and returns no logits.
    """
    T = ids.shape[0]
    runner.check_length(T)
    dev, L = runner.device, runner.n_layers
    positions = torch.arange(T, device=dev)
    cos, sin = runner.cos_sin(positions)
    ops = runner.ops
    # Cached keys reach their true positions layer by layer, behind the compute (loading.py).
    feed = LayerFeed(runner, cached, T, cos, sin, pipelined=pipelined, workspace=workspace)
    k_pre, k_buf, v_buf = feed.k_pre, feed.k_buf, feed.v_buf
    ctx = replace(ctx, ops=ops)

    if policy.probes_question(ctx):
        w = probe_question(runner, ids, ctx, feed, cos, sin, policy.check_layers[0])
        ctx = replace(ctx, question_weight=w)
    active = torch.unique(policy.initial(ctx)).to(dev)  # sorted, as attention expects
    if active.numel() == 0 or int(active[-1]) != T - 1:
        raise AssertionError("the last prompt position must be computed")
    uncovered = ctx.forced.to(dev)
    if not torch.isin(uncovered.nonzero().flatten(), active).all():
        raise AssertionError("positions without cached KV must be computed from layer 0")

    h = runner.embed(ids[active])
    correct = correction is not None and correction.name != "none" and bool(ctx.chunk_spans)
    chunk_of = chunk_index(T, ctx.chunk_spans, dev) if correct else None
    chunk_tokens = sum(e - s for s, e in ctx.chunk_spans)
    anchors = anchor_pos = None  # chunk positions in the active set: indices, positions
    counts: list[int] = []
    sets: list[torch.Tensor] = []
    checks = set(policy.check_layers)
    clock = LayerClock(dev)
    for layer in range(L):
        q, k, v = runner.qkv(layer, h)
        feed.wait(layer)
        d = None
        if layer in checks:  # before the buffers are overwritten below
            d = deviation(ops, k, v, k_pre[layer], v_buf[layer], active, deviation_on)
        drift = None
        if chunk_of is not None and layer >= CORRECT_FROM_LAYER:
            if anchors is None:
                anchors = (chunk_of[active] >= 0).nonzero().flatten()
                anchor_pos = active[anchors]  # one tensor until the active set changes
            # some chunk token keeps cached KV, and some was recomputed to show the drift
            if 0 < anchors.numel() < chunk_tokens:  # pre-RoPE: rotate_qk may rotate in place
                drift = correction.drift(k[:, anchors] - k_pre[layer][:, anchor_pos],
                                         v[:, anchors] - v_buf[layer][:, anchor_pos],
                                         anchor_pos, chunk_of, len(ctx.chunk_spans))
        q, k = runner.rotate_qk(q, k, active, cos, sin)
        if drift is not None:
            apply_drift(k_buf[layer], v_buf[layer], drift, ctx.chunk_spans, cos, sin)
        # Fresh KV of every computed token replaces the cached entry, dropped or not.
        k_buf[layer].index_copy_(1, active, k)
        v_buf[layer].index_copy_(1, active, v)
        if d is not None:
            if policy.reads_question:
                tail = active >= ctx.suffix_start
                w = runner.attention_probs(q[:, tail], k_buf[layer], active[tail])
                d = d * w.mean(dim=(0, 1))[active].float()
            keep = policy.select(layer, ctx, active, d)
            if not bool(keep.all()):
                active, q, h = active[keep], q[:, keep], h[keep]
                anchors = None
        if layer < L - 1:
            q_pos = None if active.numel() == T else active  # None: plain causal
            h = runner.finish(layer, h, runner.attend(q, k_buf[layer], v_buf[layer], q_pos,
                                                      layer=layer))
        elif logits:  # after the last layer only the last position's row is read
            h = runner.finish(layer, h[-1:], runner.attend(q[:, -1:], k_buf[layer],
                                                           v_buf[layer], active[-1:],
                                                           layer=layer))
        counts.append(int(active.numel()))
        clock.lap()
        if record:
            sets.append(active.cpu())
    last = runner.logits(h)[0] if logits else None
    place_s = feed.close()
    return FusedPrefill(list(k_buf.unbind(0)), list(v_buf.unbind(0)), last, counts,
                        active.cpu(), sets, layer_s=clock.seconds(), place_s=place_s,
                        guard_tokens=policy.raised)


def probe_question(runner: LlamaFamilyRunner, ids: torch.Tensor, ctx: SelectionContext,
                   feed: LayerFeed, cos: torch.Tensor, sin: torch.Tensor,
                   upto: int) -> torch.Tensor:
    """The attention ``[T]`` the question suffix pays each position at layer ``upto`` (mean
    over heads and question tokens), with every chunk token on its cached KV.

    Only the positions no cache covers (separators, the question) are computed, through
    layers ``0..upto``, their K/V written into the fused buffers (the blend computes them again
    from layer 0 and overwrites them). Chunk keys are exact at layer 0 and close to the fused
    ones up to the check layer, so this is the question weighting of ``qhkvd``'s check, known
    before any chunk token is computed: a preselection can then favour the tokens the question
    reads (about 30 positions through three layers on the public cases: some 9 ms of a
    0.5 s blend on the transformers engine).
    """
    pos = ctx.forced_positions().to(runner.device)
    h = runner.embed(ids[pos])
    tail = pos >= ctx.suffix_start
    for layer in range(upto + 1):
        q, k, v = runner.qkv(layer, h)
        feed.wait(layer)
        q, k = runner.rotate_qk(q, k, pos, cos, sin)
        feed.k_buf[layer].index_copy_(1, pos, k)
        feed.v_buf[layer].index_copy_(1, pos, v)
        if layer == upto:
            w = runner.attention_probs(q[:, tail], feed.k_buf[layer], pos[tail])
            return w.mean(dim=(0, 1))
        # layer=None: ragkv's own attention over the buffers, never an engine's cache
        h = runner.finish(layer, h, runner.attend(q, feed.k_buf[layer], feed.v_buf[layer], pos))
    raise ValueError(f"check layer {upto} is not a layer of the model")


def compute_span(runner: LlamaFamilyRunner, ids: torch.Tensor,
                 past: ChunkKV | None = None) -> ChunkKV:
    """Prefill ``ids`` after ``past`` (KV of the tokens before it, or none) and return the
    span's own pre-RoPE K and V ``[layers, kv_heads, n, head_dim]``: what ingestion stores."""
    P = 0 if past is None else past.n_tokens
    n = ids.shape[0]
    T = P + n
    runner.check_length(T)
    dev, dt = runner.device, runner.dtype
    positions = torch.arange(T, device=dev)
    cos, sin = runner.cos_sin(positions)
    L, H, D = runner.n_layers, runner.kv_heads, runner.head_dim
    ks = torch.empty(L, H, n, D, device=dev, dtype=dt)
    vs = torch.empty(L, H, n, D, device=dev, dtype=dt)
    past_k = None if past is None else runner.rotate(past.k.to(dev, dt), cos[:P], sin[:P])
    q_pos = None if P == 0 else positions[P:]
    h = runner.embed(ids.to(dev))
    for layer in range(L):
        q, k, v = runner.qkv(layer, h)
        ks[layer], vs[layer] = k, v
        if layer == L - 1:  # nothing reads the last layer's output
            break
        q, k = runner.rotate(q, cos[P:], sin[P:]), runner.rotate(k, cos[P:], sin[P:])
        if past is not None:
            k = torch.cat([past_k[layer], k], dim=1)
            v = torch.cat([past.v[layer].to(dev, dt), v], dim=1)
        h = runner.finish(layer, h, runner.attend(q, k, v, q_pos))
    return ChunkKV(ks, vs)
