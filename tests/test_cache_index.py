"""The cache index against real SQLite files (no mocks): documents and chunks, entry lookups,
transactions, SQLite's settings, two indexes on one file, an in-memory index. Round trips,
the blob store and the index's reports are in ``test_cache_index_*.py``."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from cache_cases import (  # noqa: F401 - fixtures are used by name
    FP,
    LAYOUT,
    _blob_path,
    _key,
    _kv,
    _put,
    _records,
    blobs,
    index,
    store,
)
from sqlalchemy import text

from ragkv.cache_index import SCHEMA_VERSION, CacheIndex, KVStore

# -- documents and chunks --------------------------------------------------------------------


def test_add_document_and_chunks_idempotent(index: CacheIndex) -> None:
    doc_id, created = index.add_document("a.md", "/src/a.md", "1" * 64)
    assert created
    assert index.add_document("a.md", "/src/a.md", "1" * 64) == (doc_id, False)
    other, created2 = index.add_document("a.md", "/src/a.md", "2" * 64)
    assert created2 and other != doc_id

    ids = index.add_chunks(doc_id, _records(3))
    assert index.add_chunks(doc_id, _records(3)) == ids
    assert index.stats()["chunks"] == 3
    [doc] = [d for d in index.documents() if d.id == doc_id]
    assert (doc.name, doc.source, doc.n_chunks) == ("a.md", "/src/a.md", 3)

    infos = index.chunks([ids[2], ids[0]])
    assert [c.id for c in infos] == [ids[2], ids[0]]
    assert infos[0].document_name == "a.md" and infos[0].ordinal == 2
    assert infos[0].token_ids == [0, 1, 2, 3, 4] and infos[0].n_tokens == 5
    assert infos[0].cache_key == _key(102)
    assert infos[0].embedding == (torch.ones(4) * 2).numpy().tobytes()
    assert [c.id for c in index.chunks()] == ids
    assert index.chunks([999_999]) == []


def test_rechunk_updates_in_place_and_trims(index: CacheIndex) -> None:
    doc_id, _ = index.add_document("b.md", "", "3" * 64)
    ids = index.add_chunks(doc_id, _records(4))
    assert [d.n_chunks for d in index.documents()] == [4]
    new_ids = index.add_chunks(doc_id, _records(2, tag="!"))
    assert new_ids == ids[:2]
    assert [c.text for c in index.chunks()] == ["chunk 0!", "chunk 1!"]
    assert [d.n_chunks for d in index.documents()] == [2]


def test_versions_of_a_document_and_the_corpus_version(index: CacheIndex) -> None:
    assert index.corpus_version() is None
    versions, kept = [], []
    for sha in ("1", "2"):
        doc_id, _ = index.add_document("d", "d", sha * 64)
        index.add_chunks(doc_id, _records(2))
        versions.append(index.corpus_version())  # inserted, then updated in place
        kept.append(index.remove_documents("d", before_id=doc_id).documents)
    assert kept == [0, 1]
    assert [d.id for d in index.documents()] == [doc_id]
    assert {c.document_id for c in index.chunks()} == {doc_id}
    assert index.chunk_embeddings()[0] == [c.id for c in index.chunks()]
    assert index.chunks(document_id=doc_id) == index.chunks()
    assert index.chunks(document_id=doc_id - 1) == []  # the removed version's
    index.add_chunks(doc_id, _records(1))  # a re-chunk that drops a chunk
    versions.append(index.corpus_version())
    assert index.remove_documents("d").documents == 1
    assert index.remove_documents("d").documents == 0
    versions.append(index.corpus_version())
    assert index.documents() == [] and index.chunks() == []
    assert None not in versions and len(set(versions)) == 4


def test_the_last_removal_forgets_the_corpus_passage(index: CacheIndex) -> None:
    from ragkv.anchor import ANCHOR_SETTING

    for name in ("a", "b"):
        doc_id, _ = index.add_document(name, name, name * 64)
        index.add_chunks(doc_id, _records(1))
    index.record_setting(ANCHOR_SETTING, "passage")
    index.record_setting("other", "kept")
    index.remove_documents("a")
    assert index.setting(ANCHOR_SETTING) == "passage"
    index.remove_documents("b")
    assert index.setting(ANCHOR_SETTING) is None and index.setting("other") == "kept"


def test_writing_a_removed_document_says_it_is_gone(index: CacheIndex) -> None:
    from ragkv.cache_index.corpus import DocumentGone

    doc_id, _ = index.add_document("d", "d", "1" * 64)
    index.remove_documents("d")  # a later version's ingestion, in another process
    with pytest.raises(DocumentGone):
        index.add_chunks(doc_id, _records(2))
    assert index.chunks() == [] and index.documents() == []


def test_removed_chunks_take_the_kv_no_other_chunk_holds(store: KVStore) -> None:
    from ragkv.cache_index.models import ids_sha256

    index = store.index
    for name, n in (("a", 2), ("b", 1)):  # b's one chunk has a's first chunk's ids
        doc_id, _ = index.add_document(name, name, name * 64)
        index.add_chunks(doc_id, _records(n))
    digests = [ids_sha256(r.token_ids) for r in _records(2)]
    held = {_key(1): digests[0], _key(2): digests[0], _key(3): digests[1],  # two contexts
            _key(4): None, _key(5): ids_sha256([9, 9])}  # no digest; not a chunk's
    for key, digest in held.items():
        assert store.put(key, _kv(), model_fp=FP, layout=LAYOUT, n_tokens=5, ids_sha256=digest)
    blobs = {key: _blob_path(store, key) for key in held}
    assert index.get_entry(_key(3)).ids_sha256 == digests[1]

    removal = store.remove_documents("a")
    assert removal.documents == 1 and [e.key for e in removal.entries] == [_key(3)]
    assert index.has_entries(list(held)) == {k: k != _key(3) for k in held}
    assert [store.blobs.fs.exists(p) for p in blobs.values()] == [True, True, False, True, True]
    removal = store.remove_documents("b")
    assert sorted(e.key for e in removal.entries) == [_key(1), _key(2)]
    assert index.has_entries(list(held)) == {k: k in (_key(4), _key(5)) for k in held}
    assert [store.blobs.fs.exists(p) for p in blobs.values()] == [False, False, False, True, True]
    assert store.remove_documents("b").entries == []


def test_has_entries(store: KVStore) -> None:
    _put(store, _key(1))
    _put(store, _key(3))
    keys = [_key(i) for i in range(5)]
    expected = {k: k in (_key(1), _key(3)) for k in keys}
    assert store.index.has_entries(keys) == expected
    assert store.contains(keys) == expected
    assert store.index.has_entries([]) == {}
    many = [_key(i) for i in range(1200)]  # more than one IN (...) batch
    assert sum(store.index.has_entries(many).values()) == 2


# -- index: transactions, SQLite behaviour ---------------------------------------------------


def test_a_write_over_an_entry_promoted_meanwhile_reports_its_remote_copy(
        index: CacheIndex, monkeypatch: pytest.MonkeyPatch) -> None:
    """The replaced row a put hands back says which tiers hold its blob, for them to be
    cleared: a promotion to the remote tier between the write's read and its update went
    unseen, and the remote copy was left with no row naming it."""
    from sqlalchemy import update
    from sqlalchemy.orm import object_session

    import ragkv.cache_index.index as index_module
    from ragkv.cache_index.models import KVEntry

    fields = dict(model_fp=FP, layout=LAYOUT, n_tokens=3, nbytes=10, checksum="c",
                  dtype="float16")
    index.upsert_entry(_key(1), blob_name="first", **fields)
    read, promoted = index_module.to_info, []

    def promote_after_the_read(kind, row):  # another process copies the blob to remote
        info = read(kind, row)
        if not promoted:
            promoted.append(True)
            object_session(row).execute(update(KVEntry).values(on_remote=True))
        return info

    monkeypatch.setattr(index_module, "to_info", promote_after_the_read)
    replaced = index.upsert_entry(_key(1), blob_name="second", **fields)
    assert replaced is not None and replaced.blob_name == "first" and replaced.on_remote


def test_transaction_commits_or_rolls_back(index: CacheIndex) -> None:
    doc_id, _ = index.add_document("t.md", "", "1" * 64)
    with index.transaction() as s:
        assert s.scalar(text("SELECT name FROM documents WHERE id = :i"), {"i": doc_id}) == "t.md"
        s.execute(text("UPDATE documents SET source = 'committed' WHERE id = :i"), {"i": doc_id})
    with pytest.raises(RuntimeError), index.transaction() as s:
        s.execute(text("UPDATE documents SET source = 'lost' WHERE id = :i"), {"i": doc_id})
        raise RuntimeError("abort")
    assert index.documents()[0].source == "committed"


def test_sqlite_wal_mode(index: CacheIndex, tmp_path: Path) -> None:
    if index.engine.dialect.name != "sqlite":
        pytest.skip("SQLite pragmas")
    with index.engine.connect() as conn:
        assert conn.execute(text("PRAGMA journal_mode")).scalar() == "wal"
        assert conn.execute(text("PRAGMA busy_timeout")).scalar() > 0
    assert (tmp_path / "db" / "index.sqlite").exists()
    assert index.schema_version == SCHEMA_VERSION


def test_two_indexes_on_one_file_see_each_other(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'shared.sqlite'}"
    a, b = CacheIndex(url), CacheIndex(url)
    try:
        doc_id, created = a.add_document("a.md", "", "1" * 64)
        assert created and b.add_document("a.md", "", "1" * 64) == (doc_id, False)
        b.upsert_entry(
            _key(1),
            model_fp=FP,
            layout=LAYOUT,
            n_tokens=1,
            nbytes=1,
            blob_name="x",
            checksum="0" * 64,
            dtype="float16",
        )
        assert a.has_entries([_key(1)]) == {_key(1): True}
        a.record_hits([_key(1)])
        assert b.get_entry(_key(1)).hits == 1  # type: ignore[union-attr]
        b.delete_entry(_key(1))
        assert a.get_entry(_key(1)) is None
    finally:
        a.close()
        b.close()


def test_in_memory_sqlite_index() -> None:
    index = CacheIndex("sqlite://")
    doc_id, _ = index.add_document("m", "", "1" * 64)
    assert index.documents()[0].id == doc_id
    index.close()
