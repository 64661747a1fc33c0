"""Ingestion prefills several chunks per forward pass; each chunk's KV must be what prefilling
it alone gives (the cache key promises exactly that)."""

from __future__ import annotations

import pytest
import torch
from engine_cases import MODELS, _engine

from ragkv.engine.blend import compute_span
from ragkv.engine.precompute import compute_spans

# float32 reassociation only: a padded batch runs the same ops on larger matrices (measured
# <= 1.4e-6 on the position-sensitive test models); a real mix-up (a chunk seeing another, a
# wrong position) moves K/V by > 1e-1 on them.
TOL = 1e-5


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("with_past", [False, True])
def test_batched_prefill_equals_one_chunk_at_a_time(name, with_past):
    eng = _engine(name)
    g = torch.Generator().manual_seed(7)
    chunks = [torch.randint(3, 256, (n,), generator=g).tolist() for n in (20, 33, 5, 40, 27)]
    past = eng.precompute(torch.randint(3, 256, (7,), generator=g).tolist()) if with_past \
        else None
    alone = [compute_span(eng.runner, torch.tensor(c), past) for c in chunks]
    batched = compute_spans(eng.runner, chunks, past, batch=3)
    assert [kv.n_tokens for kv in batched] == [len(c) for c in chunks]
    for a, b in zip(alone, batched, strict=True):
        assert (a.k - b.k).abs().max() < TOL and (a.v - b.v).abs().max() < TOL


def test_backend_precompute_stores_what_a_lone_prefill_gives(tmp_path, tiny_model):
    from ragkv.api import RagKV
    from ragkv.config import RagkvConfig

    rag = RagKV(RagkvConfig(home=tmp_path, model=tiny_model, kv_dtype="float32",
                            precompute_context="prefix"))
    chunks = [rag.tokenizer(t, add_special_tokens=False).input_ids
              for t in ("One chunk about assert.", "Another, longer chunk about the with "
                        "statement and context managers.", "One chunk about assert.")]
    assert rag.precompute_many(chunks) == [True, True, False]  # the duplicate once
    assert rag.precompute_many(chunks) == [False, False, False]
    b = rag.backend
    for ids in chunks[:2]:
        stored, tier = b.chunks.load(rag.key_for(ids), len(ids))
        alone = b.engine.precompute(ids, b.prefix_kv())
        assert tier is not None and (stored.k - alone.k).abs().max() < TOL
