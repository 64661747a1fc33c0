"""RagKV with injected cache faults: each is a miss, recomputed, stored back, same answer."""

from __future__ import annotations

import shutil

import pytest
import torch
from api_cases import (  # noqa: F401 - fixtures are used by name
    MAX_NEW,
    QUESTION,
    _one_thread,
    blob_path,
    engine,
    make_config,
    rag,
    seed,
    three_chunks,
)

from ragkv.api import RagKV
from ragkv.keys import KV_LAYOUT, chunk_key

# ---- faults are misses ---------------------------------------------------------------------

def _corrupt(rag: RagKV, key: str) -> None:
    path = blob_path(rag, key)
    data = bytearray(path.read_bytes())
    mid = len(data) // 2
    data[mid:mid + 64] = bytes(b ^ 0xFF for b in data[mid:mid + 64])
    path.write_bytes(bytes(data))


def _truncate(rag: RagKV, key: str) -> None:
    path = blob_path(rag, key)
    path.write_bytes(path.read_bytes()[:100])


def _delete(rag: RagKV, key: str) -> None:
    blob_path(rag, key).unlink()


def _foreign(rag: RagKV, key: str) -> None:
    entry = rag.index.get_entry(key)
    shape = (rag.backend.engine.runner.n_layers, rag.backend.engine.runner.kv_heads, entry.n_tokens,
             rag.backend.engine.runner.head_dim)
    rag.backend.store.put(key, {"k": torch.ones(shape), "v": torch.ones(shape)}, model_fp="0" * 64,
                  layout=KV_LAYOUT, n_tokens=entry.n_tokens)
    assert rag.index.get_entry(key).model_fp == "0" * 64


def _wrong_shape(rag: RagKV, key: str) -> None:
    entry = rag.index.get_entry(key)
    shape = (1, 1, entry.n_tokens, 2)
    assert rag.backend.store.put(key, {"k": torch.ones(shape), "v": torch.ones(shape)},
                         model_fp=rag.fingerprint, layout=KV_LAYOUT,
                         n_tokens=entry.n_tokens)


def _non_finite(rag: RagKV, key: str) -> None:
    entry = rag.index.get_entry(key)
    r = rag.backend.engine.runner
    shape = (r.n_layers, r.kv_heads, entry.n_tokens, r.head_dim)
    v = torch.zeros(shape)
    v[0, 0, 0, 0] = float("nan")
    assert rag.backend.store.put(key, {"k": torch.zeros(shape), "v": v},
                         model_fp=rag.fingerprint, layout=KV_LAYOUT,
                         n_tokens=entry.n_tokens)


FAULTS = {"corrupt": _corrupt, "truncated": _truncate, "deleted": _delete,
          "foreign-model": _foreign, "wrong-shape": _wrong_shape, "non-finite": _non_finite}


@pytest.mark.parametrize("fault", FAULTS)
@pytest.mark.parametrize("mode", ["blend", "reuse", "prefix"])
def test_bad_entry_is_a_miss_and_is_stored_back(rag, fault, mode):
    chunks = three_chunks(rag)
    # prefix mode reads only the first chunk (the one precomputed after the template prefix).
    victim = 0 if mode == "prefix" else 1
    clean = rag.generate(chunks, QUESTION, mode=mode, max_new_tokens=MAX_NEW, keep_kv=True)
    assert clean.trace.chunks[victim].hit
    key = chunks[victim].key
    FAULTS[fault](rag, key)
    hurt = rag.generate(chunks, QUESTION, mode=mode, max_new_tokens=MAX_NEW, keep_kv=True)
    want = [c.hit for c in clean.trace.chunks]
    want[victim] = False
    assert [c.hit for c in hurt.trace.chunks] == want
    assert hurt.trace.misses == clean.trace.misses + 1 and hurt.trace.precompute_s > 0
    assert hurt.tokens == clean.tokens
    assert torch.equal(hurt.first.logits, clean.first.logits)
    # The recomputed KV was stored back, under this model, and reads back as a hit.
    entry = rag.index.get_entry(key)
    assert entry is not None and entry.model_fp == rag.fingerprint
    assert blob_path(rag, key).is_file()
    healed = rag.generate(chunks, QUESTION, mode=mode, max_new_tokens=MAX_NEW)
    assert [c.hit for c in healed.trace.chunks] == [c.hit for c in clean.trace.chunks]
    assert healed.tokens == clean.tokens


@pytest.mark.parametrize("kv_dtype", ["float16", "bfloat16", "int8"])
@pytest.mark.parametrize("context", ["prefix", "anchor"])
def test_a_miss_answers_exactly_as_a_hit_with_lossy_storage(tmp_path, engine, kv_dtype, context):
    """Chunks computed now are used as a later hit reads them back: with fp16 storage a miss
    used at full precision moved the logits, and a near tie could change the answer."""
    from api_cases import _docs

    rag = RagKV(make_config(tmp_path / "home", kv_dtype=kv_dtype, precompute_context=context),
                engine=engine)
    try:
        texts = [t[:400] for t in _docs().values()] + ["Assertions can be disabled with -O."]
        missed = rag.generate(texts, QUESTION, mode="blend", max_new_tokens=MAX_NEW)
        hit = rag.generate(texts, QUESTION, mode="blend", max_new_tokens=MAX_NEW)
        assert missed.trace.hits == 0 and hit.trace.misses == 0
        assert torch.equal(missed.first.logits, hit.first.logits)
        assert missed.tokens == hit.tokens
    finally:
        rag.index.close()


def test_missing_prefix_entry_is_recomputed(tmp_path, seed, engine):
    """A fresh RagKV whose stored template-prefix KV is corrupt still answers, the same."""
    home = tmp_path / "home"
    shutil.copytree(seed[0], home)
    ref_rag = RagKV(make_config(home), engine=engine)
    chunks = three_chunks(ref_rag)
    ref = ref_rag.generate(chunks, QUESTION, mode="blend", max_new_tokens=MAX_NEW)
    prefix_key = chunk_key(engine.fingerprint, list(ref_rag.template.prefix_ids),
                           kv_dtype="float32")
    ref_rag.index.close()
    rag = RagKV(make_config(home), engine=engine)
    _corrupt(rag, prefix_key)
    ans = rag.generate(chunks, QUESTION, mode="blend", max_new_tokens=MAX_NEW)
    assert ans.tokens == ref.tokens
    assert rag.backend.store.counters["corrupt"] >= 1
    assert rag.index.get_entry(prefix_key) is not None
    rag.index.close()


def test_an_index_that_refuses_writes_warns_in_one_line_with_no_question(rag, monkeypatch,
                                                                        caplog):
    """The query log's warning carried SQLAlchemy's whole text: the statement, its bound
    parameters (the question and the whole answer) and a link, four lines."""
    import logging

    from sqlalchemy.exc import OperationalError

    def refused(**row):
        raise OperationalError("INSERT INTO queries ...", row,
                               Exception("attempt to write a readonly database"))

    monkeypatch.setattr(rag.index, "log_query", refused)
    with caplog.at_level(logging.WARNING):
        rag.ask("What is the zebra question of the day?", k=1, max_new_tokens=1)
    (said,) = [r.getMessage() for r in caplog.records if "log query" in r.getMessage()]
    assert said == "could not log query: attempt to write a readonly database"
