"""The rules ``ragkv.engine.correction`` decides, checked against a brute-force reference
written here from the docstrings (one loop per position, no prefix sums), on layouts the
engine tests do not reach: one chunk, a chunk of one token, a chunk with one recomputed token
or none, bf16 drifts, a chunk at position 0. Written for the mutants that survived them."""

from __future__ import annotations

import pytest
import torch

from ragkv.engine.correction import ChunkMeanDrift, LocalMeanDrift, PositionDrift, chunk_index

CPU = torch.device("cpu")


def _reference_local(dk, dv, anchors, chunk_of, strength, window, mix):
    """Per chunk position, in span order: ``strength`` times ``mix`` of its chunk's anchors
    within ``window`` positions and the rest of its chunk's anchors' mean (the chunk mean
    alone where none is near; zero where the chunk has none)."""
    x = torch.cat([dk, dv]).double()
    out = []
    for p in (chunk_of >= 0).nonzero().flatten().tolist():
        c = int(chunk_of[p])
        mine = [i for i, a in enumerate(anchors.tolist()) if int(chunk_of[a]) == c]
        if not mine:
            out.append(torch.zeros(x.shape[0], x.shape[2], dtype=torch.float64))
            continue
        whole = x[:, mine].mean(1)
        near = [i for i in mine if abs(int(anchors[i]) - p) <= window]
        d = mix * x[:, near].mean(1) + (1 - mix) * whole if near else whole
        out.append(strength * d)
    y = torch.stack(out, dim=1)
    h = dk.shape[0]
    return y[:h], y[h:]


def _reference_chunk(dk, dv, anchors, chunk_of, n_chunks, strength):
    """Per chunk: ``strength`` times its anchors' mean drift, zero where it has none."""
    mk = torch.zeros(dk.shape[0], n_chunks, dk.shape[2], dtype=torch.float64)
    mv = torch.zeros_like(mk)
    for c in range(n_chunks):
        mine = [i for i, a in enumerate(anchors.tolist()) if int(chunk_of[a]) == c]
        if mine:
            mk[:, c] = strength * dk[:, mine].double().mean(1)
            mv[:, c] = strength * dv[:, mine].double().mean(1)
    return mk, mv


# a chunk of one token at position 0, one whose only anchor is its first token, one with none,
# and one long chunk with anchors at both ends and inside
SPANS = [(0, 1), (1, 9), (12, 13), (13, 15), (15, 29)]
ANCHORS = torch.tensor([1, 4, 5, 12, 15, 20, 28])
ONE_CHUNK = ([(3, 20)], torch.tensor([3, 10, 11, 19]))


def _drifts(n: int, seed: int, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(2, n, 4, generator=g).to(dtype) for _ in "kv")


@pytest.mark.parametrize(("spans", "anchors"), [(SPANS, ANCHORS), ONE_CHUNK,
                                                ([(2, 9)], torch.tensor([6]))])
@pytest.mark.parametrize(("window", "mix", "strength"), [(2, 0.5, 0.75), (16, 0.25, 1.0)])
def test_local_mean_matches_the_reference(spans, anchors, window, mix, strength):
    chunk_of = chunk_index(30, spans, CPU)
    dk, dv = _drifts(anchors.numel(), 0)
    got = LocalMeanDrift(strength=strength, window=window, mix=mix).drift(
        dk, dv, anchors, chunk_of, len(spans))
    want_k, want_v = _reference_local(dk, dv, anchors, chunk_of, strength, window, mix)
    assert isinstance(got, PositionDrift) and got.k.dtype == dk.dtype
    torch.testing.assert_close(got.k.double(), want_k)
    torch.testing.assert_close(got.v.double(), want_v)


@pytest.mark.parametrize(("spans", "anchors"), [(SPANS, ANCHORS), ONE_CHUNK,
                                                ([(2, 9)], torch.tensor([6]))])
def test_chunk_mean_matches_the_reference(spans, anchors):
    chunk_of = chunk_index(30, spans, CPU)
    dk, dv = _drifts(anchors.numel(), 1)
    got = ChunkMeanDrift(strength=0.6).drift(dk, dv, anchors, chunk_of, len(spans))
    want_k, want_v = _reference_chunk(dk, dv, anchors, chunk_of, len(spans), 0.6)
    torch.testing.assert_close(got[0].double(), want_k)
    torch.testing.assert_close(got[1].double(), want_v)


@pytest.mark.parametrize("correction", [ChunkMeanDrift(), LocalMeanDrift()])
def test_no_drift_without_anchors_or_chunks(correction):
    chunk_of = chunk_index(30, SPANS, CPU)
    dk, dv = _drifts(ANCHORS.numel(), 2)
    assert correction.drift(dk[:, :0], dv[:, :0], ANCHORS[:0], chunk_of, len(SPANS)) is None
    # no chunk at all: nothing to move, whatever the anchors say
    assert correction.drift(dk, dv, ANCHORS, torch.full((30,), -1), 0) is None


@pytest.mark.parametrize("correction", [ChunkMeanDrift(), LocalMeanDrift()])
def test_a_bf16_drift_is_averaged_in_float32_and_returned_in_bf16(correction):
    chunk_of = chunk_index(30, SPANS, CPU)
    dk, dv = _drifts(ANCHORS.numel(), 3, torch.bfloat16)
    got = correction.drift(dk, dv, ANCHORS, chunk_of, len(SPANS))
    ref = correction.drift(dk.float(), dv.float(), ANCHORS, chunk_of, len(SPANS))
    got, ref = ((d.k, d.v) if isinstance(d, PositionDrift) else d for d in (got, ref))
    for g, r in zip(got, ref, strict=True):
        assert g.dtype == torch.bfloat16
        torch.testing.assert_close(g.float(), r.to(torch.bfloat16).float())


def test_the_kept_windows_belong_to_the_chunk_layout_too():
    """The same anchor tensor over another chunk layout gets that layout's windows."""
    one = LocalMeanDrift(window=4)
    dk, dv = _drifts(ANCHORS.numel(), 4)
    for spans in (SPANS, [(1, 13), (13, 29)], SPANS):
        chunk_of = chunk_index(30, spans, CPU)
        got = one.drift(dk, dv, ANCHORS, chunk_of, len(spans))
        want = LocalMeanDrift(window=4).drift(dk, dv, ANCHORS, chunk_of, len(spans))
        assert torch.equal(got.k, want.k) and torch.equal(got.v, want.v)
