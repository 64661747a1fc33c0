"""The document commands on the command line: an edited file replaces its earlier version,
``--prune`` drops deleted files, documents are named by their resolved paths (so two
projects' files on one cache stay apart), and ``documents`` / ``remove`` read the index."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from test_cli import run, runner, two_docs

from ragkv.cli import app


def test_ingest_replaces_edited_files_and_prunes_deleted_ones(tmp_path: Path,
                                                              tiny_model: Path) -> None:
    docs, other = tmp_path / "docs", tmp_path / "other.md"
    (docs / "sub").mkdir(parents=True)
    (docs / "a.md").write_text("The assert statement checks a condition.\n" * 20)
    (docs / "sub" / "b.md").write_text("A with statement wraps a block.\n" * 20)
    other.write_text("The pass statement does nothing.\n" * 20)
    home = ["--home", str(tmp_path / "home"), "--model", str(tiny_model)]
    run("ingest", str(docs), str(other), *home)
    (docs / "a.md").write_text("The assert statement was edited.\n" * 20)
    out = run("ingest", str(docs), *home)
    assert "earlier versions replaced: 1" in out and "3 documents" in out
    (docs / "sub" / "b.md").unlink()
    out = run("ingest", str(docs), "--prune", *home)
    assert f"pruned {docs / 'sub' / 'b.md'}" in out and "pruned 1 document this" in out
    assert "2 documents, 2 chunks" in out  # the totals count what was pruned (said 3)
    listed = run("documents", "--home", str(tmp_path / "home"))
    assert "2 documents" in listed and "other.md" in listed  # outside the folder: kept
    assert "ingested (UTC)" in listed  # the index's time, not the local one (unsaid)
    (docs / "a.md").unlink()
    out = run("ingest", str(docs), "--prune", *home)  # nothing left to read is no error here
    assert "pruned 1 document this" in out
    assert "1 document\n" in run("documents", "--home", str(tmp_path / "home"))
    result = runner.invoke(app, ["ingest", str(docs), *home])
    assert result.exit_code == 2 and "no readable" in result.output


def test_documents_are_named_by_resolved_path(tmp_path: Path, tiny_model: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    from ragkv.cache_index import CacheIndex

    home = ["--home", str(tmp_path / "home"), "--model", str(tiny_model)]
    for project in ("alpha", "beta"):  # two projects, one cache, both with a README.md
        (tmp_path / project / "docs").mkdir(parents=True)
        (tmp_path / project / "README.md").write_text(f"The {project} project.\n" * 20)
        (tmp_path / project / "docs" / "a.md").write_text(f"Alpha {project} page.\n" * 20)
    monkeypatch.chdir(tmp_path / "alpha")
    run("ingest", "README.md", "docs", *home)
    monkeypatch.chdir(tmp_path / "beta")
    run("ingest", "README.md", *home)
    index = CacheIndex(f"sqlite:///{tmp_path / 'home' / 'index.sqlite'}")
    real = tmp_path.resolve()
    assert sorted(d.name for d in index.documents()) == [
        str(real / "alpha" / "README.md"), str(real / "alpha" / "docs" / "a.md"),
        str(real / "beta" / "README.md")]
    # a document named as typed, by an ingestion before names were resolved, is an earlier
    # version of the same file when ingested from the same folder
    (tmp_path / "beta" / "notes").mkdir()
    (tmp_path / "beta" / "notes" / "b.md").write_text("Beta page, edited.\n" * 20)
    index.add_document(str(Path("notes") / "b.md"), "", "0" * 64)
    out = run("ingest", "notes", *home)
    assert "earlier versions replaced: 1" in out
    assert str(Path("notes") / "b.md") not in {d.name for d in index.documents()}
    out = run("remove", "notes/b.md", "--home", str(tmp_path / "home"))  # a path works too
    assert f"removed {real / 'beta' / 'notes' / 'b.md'}" in out
    assert len(index.documents()) == 3
    index.close()


def test_ingest_says_when_another_process_replaced_a_file_meanwhile(
        tmp_path: Path, tiny_model: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from ragkv import RagKV, RagkvConfig

    doc = tmp_path / "a.md"
    doc.write_text("The assert statement checks a condition.\n" * 20)
    precompute_many, raced = RagKV.precompute_many, []

    def another_process_first(self, chunks):
        if not raced:  # before this run's first chunk: a later version is recorded and stored
            raced.append(True)
            other = RagKV(RagkvConfig(home=tmp_path / "home", model=tiny_model))
            other.ingest_text(str(doc.resolve()), "The assert statement was edited.\n" * 20)
            other.close()
        return precompute_many(self, chunks)

    monkeypatch.setattr(RagKV, "precompute_many", another_process_first)
    out = run("ingest", str(doc), "--home", str(tmp_path / "home"), "--model", str(tiny_model))
    said = " ".join(out.split())  # as the console wraps it
    assert "computed now: 0; replaced meanwhile by a later version from another process: 1" in said
    assert "1 document, 1 chunk" in said


def _two_files_ingested(tmp_path: Path, tiny_model: Path, a: str,
                        b: str) -> tuple[Path, list[str]]:
    """``docs/a.md`` and ``docs/b.md`` holding ``a`` and ``b``, ingested once: the folder and
    the options naming the home and model."""
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "a.md").write_text(a)
    (docs / "b.md").write_text(b)
    home = ["--home", str(tmp_path / "home"), "--model", str(tiny_model)]
    run("ingest", str(docs), *home)
    return docs, home


def test_a_file_edited_to_another_files_text_leaves_no_earlier_version(
        tmp_path: Path, tiny_model: Path) -> None:
    from ragkv.cache_index import CacheIndex

    docs, home = _two_files_ingested(tmp_path, tiny_model,
                                     "The assert statement checks a condition.\n" * 20,
                                     "ZEBRA-42 is the old text of b.\n" * 20)
    (docs / "b.md").write_text((docs / "a.md").read_text())  # now a copy of a.md
    out = run("ingest", str(docs), *home)
    b, a = docs.resolve() / "b.md", docs.resolve() / "a.md"
    assert f"skipped {b}: duplicate of {a}" in out
    assert f"removed the earlier version of {b}: it now holds the same text as {a}" in out
    index = CacheIndex(f"sqlite:///{tmp_path / 'home' / 'index.sqlite'}")
    assert [d.name for d in index.documents()] == [str(a)]
    assert not any("ZEBRA" in c.text for c in index.chunks())
    out = run("ingest", str(docs), str(docs / "a.md"), *home)  # a file named twice: read once
    assert "duplicate" not in out.replace(f"{b}: duplicate of {a}", "")


def test_a_file_edited_to_an_unchanged_files_text_leaves_that_file_in(
        tmp_path: Path, tiny_model: Path) -> None:
    """a.md (read first) edited to hold b.md's text: b.md did not change, so it stays (it
    was removed as an "earlier version", for good), and a.md is the duplicate (it went in,
    and the index held the text twice: one chunk filled two places of a prompt)."""
    from ragkv.cache_index import CacheIndex

    docs, home = _two_files_ingested(tmp_path, tiny_model, "ZEBRA-42 is the old text of a.\n" * 20,
                                     "The assert statement checks a condition.\n" * 20)
    (docs / "a.md").write_text((docs / "b.md").read_text())
    out = run("ingest", str(docs), "--prune", *home)
    a, b = docs.resolve() / "a.md", docs.resolve() / "b.md"
    assert f"skipped {a}: duplicate of {b}" in out and "pruned 0 documents" in out
    assert f"removed the earlier version of {a}: it now holds the same text as {b}" in out
    index = CacheIndex(f"sqlite:///{tmp_path / 'home' / 'index.sqlite'}")
    assert [d.name for d in index.documents()] == [str(b)]
    assert not any("ZEBRA" in c.text for c in index.chunks())


def test_a_link_inside_a_folder_is_removed_by_its_own_name(tmp_path: Path,
                                                          tiny_model: Path) -> None:
    from ragkv.cache_index import CacheIndex

    docs, outside = tmp_path / "docs", tmp_path / "outside"
    docs.mkdir()
    outside.mkdir()
    (outside / "target.md").write_text("The target file's own text.\n" * 20)
    (docs / "alias.md").symlink_to(outside / "target.md")
    (docs / "page.md").write_text("A page of the docs folder.\n" * 20)
    home = ["--home", str(tmp_path / "home"), "--model", str(tiny_model)]
    run("ingest", str(docs), *home)
    run("ingest", str(outside / "target.md"), *home)
    index = CacheIndex(f"sqlite:///{tmp_path / 'home' / 'index.sqlite'}")
    alias, target = docs.resolve() / "alias.md", (outside / "target.md").resolve()
    assert {str(alias), str(target)} <= {d.name for d in index.documents()}
    out = run("remove", str(docs / "alias.md"), "--home", str(tmp_path / "home"))
    assert f"removed {alias} " in out
    assert str(target) in {d.name for d in index.documents()}  # the other document stays
    assert str(alias) not in {d.name for d in index.documents()}
    assert out.rstrip().endswith("2 documents left")
    out = run("remove", str(docs / "page.md"), "--home", str(tmp_path / "home"))
    assert out.rstrip().endswith("1 document left")


def test_ask_reads_the_entries_ingest_stored(tmp_path: Path, tiny_model: Path) -> None:
    docs = two_docs(tmp_path)
    home = ["--home", str(tmp_path / "home"), "--model", str(tiny_model)]
    run("ingest", str(docs), "--context", "prefix", *home)
    out = run("ask", "What does assert do?", "-k", "2", *home)
    assert re.search(r"│\s*2/2\s*│", out), out  # every chunk a hit: prefix-context entries
    out = run("ask", "What does assert do?", "-k", "2", "--context", "anchor", *home)
    # told otherwise: the second chunk's anchor entry is new (the first reads its prefix one)
    assert re.search(r"│\s*1/2\s*│", out), out


def test_ingest_into_a_full_blob_store_says_so(tmp_path: Path, tiny_model: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """Every write refused (a full disk): ingest printed "computed now: 2" and exit 0, the
    cache holding nothing; a rerun with room stores what is missing."""
    import errno

    from ragkv.cache_index.blobs import BlobStore

    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "a.md").write_text("The assert statement checks a condition.\n" * 20)
    (docs / "b.md").write_text("A with statement wraps a block.\n" * 20)
    home = ["--home", str(tmp_path / "home"), "--model", str(tiny_model)]
    def full(self, name: str, data: bytes) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    with monkeypatch.context() as m:
        m.setattr(BlobStore, "put", full)
        result = runner.invoke(app, ["ingest", str(docs), *home])
    said = " ".join(result.output.split())
    assert result.exit_code == 1, result.output
    assert "computed now: 0" in said and "the KV of 2 chunks could not be stored" in said
    out = run("ingest", str(docs), *home)
    assert "computed now: 2" in out and "could not be stored" not in out


def test_remove_says_which_kv_it_could_not_delete(tmp_path: Path, tiny_model: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """A blob store that refuses deletes (read-only): remove reported all the KV "freed" and
    exit 0 though every blob stayed; it now says how much stayed and exits 1, the document
    gone, and ``verify`` then removes the orphans."""
    import errno

    from ragkv.cache_index.blobs import BlobStore

    docs, home = _two_files_ingested(tmp_path, tiny_model, "The assert statement.\n" * 20,
                                     "A with statement wraps a block.\n" * 20)
    blobs = tmp_path / "home" / "blobs"
    before = sorted(p.name for p in blobs.rglob("*") if p.is_file())

    def refused(self, name: str) -> None:
        raise OSError(errno.EROFS, "Read-only file system")

    with monkeypatch.context() as m:
        m.setattr(BlobStore, "delete", refused)
        result = runner.invoke(app, ["remove", str(docs / "a.md"), *home[:2]])
    said = " ".join(result.output.split())
    assert result.exit_code == 1, result.output
    assert "KV freed: 0.0 MiB; not deleted:" in said and "could not be deleted" in said
    assert "1 document left" in said
    assert sorted(p.name for p in blobs.rglob("*") if p.is_file()) == before
    out = run("remove", str(docs / "b.md"), *home[:2])
    assert "not deleted" not in out and "could not" not in out


def test_ingest_again_stores_kv_whose_blobs_were_deleted(tmp_path: Path,
                                                          tiny_model: Path) -> None:
    """Blob files deleted behind ragkv's back (to free disk, say): ingest again said
    "computed now: 0", trusting the rows, and every query missed; it now stores them again."""
    docs, home = _two_files_ingested(tmp_path, tiny_model, "The assert statement.\n" * 20,
                                     "A with statement wraps a block.\n" * 20)
    blobs = tmp_path / "home" / "blobs"
    files = [p for p in blobs.rglob("*.safetensors") if p.is_file()]
    assert files
    for p in files:
        p.unlink()
    out = run("ingest", str(docs), *home)
    assert "computed now: 2" in " ".join(out.split())
    assert len([p for p in blobs.rglob("*.safetensors") if p.is_file()]) == len(files)
    assert "computed now: 0" in " ".join(run("ingest", str(docs), *home).split())


def test_remove_takes_the_kv_a_schema_4_migration_could_not_digest(tmp_path: Path,
                                                                    tiny_model: Path) -> None:
    """A cache from before schema 4 kept each chunk's other-context entry undigested by the
    migration: `ragkv remove` left it, and its blob, for good."""
    from sqlalchemy import create_engine, select, text

    from ragkv.cache_index.models import Chunk

    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "a.md").write_text("The assert statement checks a condition.\n" * 20)
    home = tmp_path / "home"
    run("ingest", str(docs), "--home", str(home), "--model", str(tiny_model))
    engine = create_engine(f"sqlite:///{home / 'index.sqlite'}")
    with engine.begin() as conn:  # as the migration left a schema-3 cache
        named = list(conn.scalars(select(Chunk.cache_key)))
        digests = list(conn.scalars(select(Chunk.ids_sha256)))
        mine = dict(conn.execute(text(  # the chunk's entries: anchor and prefix context
            "SELECT key, blob_name FROM kv_entries WHERE ids_sha256 IN "
            f"({', '.join(repr(d) for d in digests)})")).all())
        assert len(mine) == 2 * len(named)
        conn.execute(text("UPDATE kv_entries SET ids_sha256 = NULL WHERE key NOT IN "
                          f"({', '.join(repr(k) for k in named)})"))
    run("remove", str(docs / "a.md"), "--home", str(home), "--model", str(tiny_model))
    with engine.connect() as conn:
        left = set(conn.scalars(text("SELECT key FROM kv_entries")))
    engine.dispose()
    assert not left & set(mine)
    blobs = {str(p.relative_to(home / "blobs")) for p in (home / "blobs").rglob("*")}
    assert not blobs & set(mine.values())
