"""Documents change: a new text under a known name replaces the old version, a removed
document leaves retrieval, and every facade on the index retrieves what the index holds now,
whichever process changed it."""

from __future__ import annotations

import pytest
from api_cases import (  # noqa: F401 - fixtures are used by name
    _docs,
    _one_thread,
    engine,
    make_config,
    rag,
    seed,
)
from sqlalchemy import select
from typer.testing import CliRunner

from ragkv.api import RagKV
from ragkv.cache_index import CacheIndex
from ragkv.cache_index.models import KVEntry, ids_sha256
from ragkv.cli import app

EDITED = ("The pass statement has been renamed. Write skip where a statement is required "
          "syntactically but no code needs to be executed.")


def _texts(rag: RagKV, question: str = "pass statement", k: int = 50) -> set[str]:
    return {c.text for c in rag.retrieve(question, k=k)}


def _crash(*args, **kwargs):
    raise OSError("killed")  # the process dies here


def _names(rag: RagKV) -> list[str]:
    return sorted(d.name for d in rag.index.documents())


def test_an_edited_document_replaces_its_earlier_version(rag):
    old = _texts(rag)
    assert any("pass" in t for t in old)
    res = rag.ingest_text("doc:pass", EDITED)
    assert res.new_document and res.replaced == 1
    assert _names(rag) == ["doc:assert", "doc:pass"]
    now = _texts(rag)
    assert EDITED in now
    passes = {c.text for c in rag.index.chunks() if c.document_name == "doc:pass"}
    assert passes == {EDITED}
    assert not now & (old - {c.text for c in rag.index.chunks()})  # nothing of the old version
    # the other document is untouched
    assert any(c.document == "doc:assert" for c in rag.retrieve("assert", k=50))


def test_the_same_text_again_replaces_nothing(rag):
    res = rag.ingest_text("doc:pass", _docs()["doc:pass"])
    assert not res.new_document and res.replaced == 0
    assert _names(rag) == ["doc:assert", "doc:pass"]


def test_a_rerun_after_a_crash_between_adding_and_removing_cleans_up(rag, monkeypatch):
    monkeypatch.setattr(rag.index, "remove_documents", _crash)
    with pytest.raises(OSError):
        rag.ingest_text("doc:pass", EDITED)
    assert _names(rag) == ["doc:assert", "doc:pass", "doc:pass"]  # both versions, never none
    monkeypatch.undo()
    res = rag.ingest_text("doc:pass", EDITED)
    assert not res.new_document and res.replaced == 1
    assert {c.text for c in rag.index.chunks() if c.document_name == "doc:pass"} == {EDITED}


def test_a_version_replaced_while_it_is_written_gives_way(rag, engine, monkeypatch):
    other = RagKV(make_config(rag.config.home), engine=engine)
    add_chunks = rag.index.add_chunks

    def later_version_first(*args, **kwargs):
        other.ingest_text("doc:pass", EDITED)  # another process, recorded after this one
        return add_chunks(*args, **kwargs)

    try:
        monkeypatch.setattr(rag.index, "add_chunks", later_version_first)
        res = rag.ingest_text("doc:pass", "An older edit of the pass statement's page. " * 9)
        assert res.superseded and res.n_chunks == 0 and res.replaced == 0
        monkeypatch.undo()
        assert _names(rag) == ["doc:assert", "doc:pass"]
        assert {c.text for c in rag.index.chunks() if c.document_name == "doc:pass"} == {EDITED}
    finally:
        other.index.close()


def test_kv_computed_for_a_version_replaced_meanwhile_leaves_the_cache(tmp_path, engine,
                                                                      monkeypatch):
    import ragkv.ingest

    rag = RagKV(make_config(tmp_path / "home"), engine=engine)
    other = RagKV(make_config(tmp_path / "home"), engine=engine)
    older = " ".join(f"Step {i} of the old procedure moves crate {i} to shelf {i % 7}."
                     for i in range(40))
    precompute_many, calls = rag.precompute_many, []

    def replaced_before_the_second_batch(chunks):
        calls.append([ids_sha256(ids) for ids in chunks])
        if len(calls) == 2:  # another process records and stores a later version first
            other.ingest_text("doc:steps", EDITED)
        return precompute_many(chunks)

    try:
        monkeypatch.setattr(ragkv.ingest, "PRECOMPUTE_BATCH", 1)
        monkeypatch.setattr(rag, "precompute_many", replaced_before_the_second_batch)
        res = rag.ingest_text("doc:steps", older)
        assert res.superseded and res.n_chunks == 0
        assert len(calls) == 2  # the third and later chunks were not computed at all
        assert [c.text for c in rag.index.chunks()] == [EDITED]
        with rag.index.transaction() as s:
            stored = s.execute(select(KVEntry.ids_sha256, KVEntry.blob_name)).all()
        # the second chunk's KV, stored after the removal took the first's, went too
        assert not {digest for digest, _ in stored} & {d for batch in calls for d in batch}
        assert _entries(rag, "doc:steps")
        assert _blob_files(rag) == {blob for _, blob in stored}
    finally:
        other.index.close()
        rag.index.close()


def test_a_rerun_fills_a_document_whose_chunks_a_crash_left_out(rag, monkeypatch):
    monkeypatch.setattr(rag.index, "add_chunks", _crash)
    with pytest.raises(OSError):
        rag.ingest_text("doc:new", EDITED)
    assert "doc:new" in _names(rag) and not rag.index.chunks(document_id=max(
        d.id for d in rag.index.documents()))
    monkeypatch.undo()
    res = rag.ingest_text("doc:new", EDITED)
    assert not res.new_document and res.n_chunks == 1
    assert EDITED in _texts(rag)


def _entries(rag: RagKV, document: str) -> dict[str, str]:
    """The KV entries (key → blob name) holding the KV of ``document``'s chunks."""
    digests = {ids_sha256(c.token_ids) for c in rag.index.chunks() if c.document_name == document}
    with rag.index.transaction() as s:
        rows = s.execute(select(KVEntry.key, KVEntry.blob_name)
                         .where(KVEntry.ids_sha256.in_(digests))).all()
    return dict(rows)


def _blob_files(rag: RagKV) -> set[str]:
    root = rag.config.home / "blobs"
    return {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()}


@pytest.mark.parametrize("context", ["prefix", "anchor"])
def test_the_kv_of_a_replaced_or_removed_document_leaves_the_cache(tmp_path, engine, context):
    rag = RagKV(make_config(tmp_path / "home", precompute_context=context), engine=engine)
    try:
        for name, text in _docs().items():
            rag.ingest_text(name, text)
        rag.ingest_text("doc:copy", _docs()["doc:assert"])  # the same chunks, shared KV
        n_pass = len([c for c in rag.index.chunks() if c.document_name == "doc:pass"])
        old, kept = _entries(rag, "doc:pass"), _entries(rag, "doc:assert")
        assert len(old) == n_pass * (2 if context == "anchor" else 1)
        assert set(old.values()) <= _blob_files(rag)
        rag.ingest_text("doc:pass", EDITED)  # replaces the earlier version
        assert not any(rag.index.has_entries(list(old)).values())
        assert not set(old.values()) & _blob_files(rag)
        new = _entries(rag, "doc:pass")
        assert new and not set(new) & set(old)
        assert rag.remove_document("doc:assert")  # doc:copy holds the same chunks
        assert all(rag.index.has_entries(list(kept)).values())
        assert set(kept.values()) <= _blob_files(rag)
        assert rag.remove_document("doc:copy")
        assert not any(rag.index.has_entries(list(kept)).values())
        assert not set(kept.values()) & _blob_files(rag)
        assert rag.generate([EDITED], "What was renamed?", max_new_tokens=2).tokens
    finally:
        rag.index.close()


def test_entries_a_schema_4_migration_could_not_digest_leave_with_their_document(tmp_path,
                                                                                 engine):
    """A cache from before schema 4: the migration digested only the entry each chunk named
    by its cache key (the anchor entry), so removing a document left its prefix-context
    entries and their blobs for good (disk budgets are unlimited by default)."""
    from sqlalchemy import update

    from ragkv.cache_index.models import Chunk

    rag = RagKV(make_config(tmp_path / "home", precompute_context="anchor"), engine=engine)
    try:
        for name, text in _docs().items():
            rag.ingest_text(name, text)
        held = _entries(rag, "doc:pass")
        with rag.index.transaction() as s:  # as the migration left a schema-3 cache
            named = set(s.scalars(select(Chunk.cache_key)))
            s.execute(update(KVEntry).where(KVEntry.key.not_in(named)).values(ids_sha256=None))
            assert s.scalar(select(KVEntry.key).where(KVEntry.ids_sha256.is_(None)).limit(1))
        rag.ingest_text("doc:pass", EDITED)  # replaces the earlier version: its KV goes
        assert not any(rag.index.has_entries(list(held)).values())
        assert not set(held.values()) & _blob_files(rag)
        kept = {k for k, _ in _entries(rag, "doc:assert").items()}
        assert rag.remove_document("doc:assert")
        assert not any(rag.index.has_entries(list(kept)).values())
    finally:
        rag.index.close()


def test_a_document_removed_and_ingested_again_is_stored_again(tmp_path, engine):
    # the facade's memory tier still holds the removed KV; the index must have it back
    rag = RagKV(make_config(tmp_path / "home", memory_budget_bytes=2**28), engine=engine)
    try:
        rag.ingest_text("doc:pass", _docs()["doc:pass"])
        held = _entries(rag, "doc:pass")
        assert rag.remove_document("doc:pass")
        assert not any(rag.index.has_entries(list(held)).values())
        res = rag.ingest_text("doc:pass", _docs()["doc:pass"])
        assert res.precomputed == res.n_chunks
        assert set(_entries(rag, "doc:pass")) == set(held)
    finally:
        rag.index.close()


def test_remove_document(rag):
    assert rag.remove_document("doc:pass") is True
    assert _names(rag) == ["doc:assert"]
    assert all(c.document == "doc:assert" for c in rag.retrieve("pass statement", k=50))
    assert rag.remove_document("doc:pass") is False
    with pytest.raises(TypeError):
        rag.remove_document(None)  # type: ignore[arg-type]


def test_another_facades_changes_reach_retrieval(tmp_path, seed, engine, rag):
    other = RagKV(make_config(rag.config.home), engine=engine)
    try:
        assert _texts(rag)  # the first facade has built its retrieval index
        other.ingest_text("doc:new", EDITED)
        assert EDITED in _texts(rag)
        other.remove_document("doc:pass")
        assert {c.document for c in rag.retrieve("pass statement", k=50)} == {
            "doc:assert", "doc:new"}
    finally:
        other.index.close()


def test_a_chunk_removed_after_the_version_check_is_left_out(rag, monkeypatch):
    _texts(rag)
    stale = rag.index.corpus_version()
    rag.remove_document("doc:pass")
    monkeypatch.setattr(rag.index, "corpus_version", lambda: stale)  # the race, made certain
    got = rag.retrieve("pass statement", k=50)
    assert got and all(c.document == "doc:assert" for c in got)


def test_chunks_that_took_a_removed_chunks_id_meanwhile_are_not_retrieved(rag, engine,
                                                                         monkeypatch):
    """SQLite gives a new row the id of the last one removed: another process replacing the
    last document between the search and the row lookup handed out its new chunks in the
    removed ones' places, with their scores."""
    question = "pass statement"
    _texts(rag, question)  # the retrieval index, of the corpus as it is now
    pass_ids = {c.id for c in rag.index.chunks() if c.document_name == "doc:pass"}
    other = RagKV(make_config(rag.config.home), engine=engine)
    lookup = rag.index.chunks
    raced = []

    def after_the_search(ids=None, **kwargs):
        if not raced:  # the other process, between this search and its row lookup
            raced.append(True)
            other.remove_document("doc:pass")
            other.ingest_text("doc:new", "Compound statements contain groups of other "
                              "statements; they affect or control their execution. " * 3)
        return lookup(ids, **kwargs)

    try:
        monkeypatch.setattr(rag.index, "chunks", after_the_search)
        got = rag.retrieve(question, k=50)
        monkeypatch.undo()
        reused = {c.id for c in rag.index.chunks() if c.document_name == "doc:new"}
        assert reused & pass_ids, "the race needs a reused id"
        again = rag.retrieve(question, k=50)  # nothing changes now: the true answer
        assert [(c.chunk_id, c.text, c.score) for c in got] == [
            (c.chunk_id, c.text, c.score) for c in again]
    finally:
        other.index.close()


def test_a_chunk_under_a_reused_id_is_never_handed_out_for_the_one_searched(rag, engine,
                                                                          monkeypatch):
    """However often the corpus changes under a retrieval: a row read under an id the search
    found is handed out only if it is the chunk the search found."""
    _texts(rag)
    stale = rag.index.corpus_version()
    other = RagKV(make_config(rag.config.home), engine=engine)
    try:
        other.remove_document("doc:pass")
        other.ingest_text("doc:new", "Compound statements contain groups of other "
                          "statements; they affect or control their execution. " * 3)
    finally:
        other.index.close()
    monkeypatch.setattr(rag.index, "corpus_version", lambda: stale)  # never seen to change
    got = rag.retrieve("pass statement", k=50)
    assert got and all(c.document == "doc:assert" for c in got)


@pytest.mark.parametrize("order", [(0, 1), (1, 0)])
def test_of_two_versions_ingested_at_once_the_later_recorded_stays(tmp_path, order):
    index = CacheIndex(f"sqlite:///{tmp_path / 'index.sqlite'}")
    index.add_document("d", "d", "sha-1")
    ids = [index.add_document("d", "d", sha)[0] for sha in ("sha-2", "sha-3")]
    for i in order:  # each ingestion removes what was recorded before its own version
        index.remove_documents("d", before_id=ids[i])
    assert [d.id for d in index.documents()] == [ids[1]]
    index.close()


def test_every_change_to_the_chunks_gives_a_new_corpus_version(rag):
    seen = [rag.index.corpus_version()]
    rag.ingest_text("doc:new", EDITED)
    seen.append(rag.index.corpus_version())
    rag.ingest_text("doc:new", EDITED)  # no change
    assert rag.index.corpus_version() == seen[-1]
    rag.remove_document("doc:new")
    seen.append(rag.index.corpus_version())
    assert None not in seen and len(set(seen)) == 3


runner = CliRunner()


def test_documents_and_remove_on_the_command_line(rag):
    home = str(rag.config.home)
    listed = runner.invoke(app, ["documents", "--home", home])
    assert listed.exit_code == 0
    assert "doc:assert" in listed.output and "2 documents" in listed.output
    bad = runner.invoke(app, ["remove", "doc:pass", "doc:nope", "--home", home])
    assert bad.exit_code == 2
    assert len(bad.output.strip().splitlines()) == 1 and "'doc:nope'" in bad.output
    assert _names(rag) == ["doc:assert", "doc:pass"]  # all or nothing
    held = _entries(rag, "doc:pass")
    assert held
    ok = runner.invoke(app, ["remove", "doc:pass", "--home", home])
    assert ok.exit_code == 0 and "removed doc:pass (KV freed: " in ok.output
    assert _names(rag) == ["doc:assert"]
    assert not any(rag.index.has_entries(list(held)).values())


def test_ingesting_a_known_document_again_reads_its_own_chunks_only(rag, monkeypatch):
    # a rerun over a corpus read every chunk once per document: quadratic in the corpus
    rows = []
    chunks = rag.index.chunks

    def counting(*args, **kwargs):
        out = chunks(*args, **kwargs)
        rows.extend(out)
        return out

    monkeypatch.setattr(rag.index, "chunks", counting)
    res = rag.ingest_text("doc:pass", _docs()["doc:pass"])
    assert not res.new_document and res.n_chunks >= 1
    assert {c.document_name for c in rows} == {"doc:pass"} and len(rows) == res.n_chunks


def test_a_long_documents_stages_show_it_moving(rag, monkeypatch):
    """A long document was chunked and embedded whole before anything moved: minutes of a
    still bar for a few MB of text. Each stage now reports as it moves, and the embeddings of
    chunks embedded a group at a time are those of one call."""
    import numpy as np

    from ragkv import chunking, ingest

    monkeypatch.setattr(chunking, "SEGMENT_CHARS", 400)
    monkeypatch.setattr(ingest, "EMBED_GROUP", 2)
    text = "\n\n".join(_docs().values()) + "\n\n" + EDITED
    moved: list[tuple[str, int, int]] = []
    res = rag.ingest_text("doc:long", text, progress=lambda *m: moved.append(m))
    stages = list(dict.fromkeys(stage for stage, _, _ in moved))
    assert stages == ["chunking", "embedding", "precomputing"], moved
    for stage in stages:
        steps = [(done, total) for s, done, total in moved if s == stage]
        assert [d for d, _ in steps] == sorted(d for d, _ in steps) and steps[-1][0] == steps[-1][1]
    chunks = sorted((c for c in rag.index.chunks() if c.document_name == "doc:long"),
                    key=lambda c: c.id)
    n = res.n_chunks
    assert len(chunks) == n >= 3 and moved[-1] == ("precomputing", n, n)
    assert sum(s == "embedding" for s, _, _ in moved) == (n + 1) // 2
    ids, vectors = rag.index.chunk_embeddings()
    stored = np.stack([np.frombuffer(vectors[ids.index(c.id)], dtype=np.float32)
                       for c in chunks])
    whole = ingest._embedder(rag).embed([c.text for c in chunks])
    np.testing.assert_allclose(stored, whole, atol=1e-5)


def test_a_text_of_characters_the_tokenizer_drops_gives_no_chunk_and_no_error(rag):
    """It has no chunk to embed: the embedding step (grouped for long documents) failed on
    an empty list."""
    res = rag.ingest_text("doc:control", "\x04\x06\x13\x14\x16")
    assert res.n_chunks == 0 and res.precomputed == 0
