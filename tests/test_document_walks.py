"""Where documents are looked for: an empty path, linked and unreadable folders, paths that
cannot be searched, binary HTML, and ``--prune`` next to files the walk does not take."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest
from test_cli import run, runner

from ragkv.cli import app
from ragkv.config import default_home
from ragkv.documents import load_documents


def write(path: Path, text: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    return path


def names(report, root: Path) -> list[str]:
    return [str(Path(d.name).relative_to(root)) for d in report.documents]


@pytest.mark.parametrize("given", ["", [""], ["a.md", ""]])
def test_an_empty_path_is_refused_not_read_as_the_working_directory(tmp_path, monkeypatch,
                                                                    given):
    write(tmp_path / "a.md", "A document in the working directory.")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"no such file or folder: '' \(an empty path"):
        load_documents(given)
    assert [d.name for d in load_documents(".").documents] == ["a.md"]  # said, it is read


@pytest.mark.parametrize("args", [["ingest", ""], ["ingest", ".", ""], ["ask", "q", "--home", ""],
                                  ["bench", "--cases", ""]])
def test_an_empty_path_on_the_command_line_is_one_line_and_exit_2(tmp_path, monkeypatch, args):
    write(tmp_path / "a.md", "A document in the working directory.")
    monkeypatch.chdir(tmp_path)
    result = runner.invoke(app, args)
    assert result.exit_code == 2, result.output
    assert "an empty path names no file or folder" in result.output
    assert not (tmp_path / "index.sqlite").exists()


def test_an_empty_home_variable_is_the_default_home(monkeypatch):
    monkeypatch.setenv("RAGKV_HOME", "")
    assert default_home() == Path.home() / ".cache" / "ragkv"
    monkeypatch.setenv("RAGKV_HOME", "~/h")
    assert default_home() == Path.home() / "h"


def test_linked_folders_are_walked_once_and_a_link_loop_ends(tmp_path):
    docs = tmp_path / "docs"
    write(docs / "top.md", "Top.")
    write(tmp_path / "shared" / "deep" / "s.md", "Shared.")
    (docs / "shared").symlink_to(tmp_path / "shared")  # a linked folder: followed
    (docs / "again").symlink_to(tmp_path / "shared")  # a second link to it: walked once
    (tmp_path / "shared" / "up").symlink_to(docs)  # back up the tree: the walk ends
    report = load_documents(docs)
    assert names(report, docs) == ["again/deep/s.md", "top.md"]  # sorted: "again" first
    assert report.skipped == []


def test_an_unreadable_folder_is_reported_not_left_out_in_silence(tmp_path, monkeypatch):
    docs = tmp_path / "docs"
    write(docs / "ok.md", "Readable.")
    write(docs / "locked" / "x.md", "Behind a lock.")
    scandir = os.scandir

    def denied(path=".", *a):  # as for a folder without read permission (root reads any)
        if os.fspath(path).endswith("locked"):
            raise PermissionError(13, "Permission denied", os.fspath(path))
        return scandir(path, *a)

    monkeypatch.setattr(os, "scandir", denied)
    report = load_documents(docs)
    assert names(report, docs) == ["ok.md"]
    assert [(s.path, s.reason) for s in report.skipped] == [
        (str(docs / "locked"), "unreadable folder: Permission denied")]


def _unsearchable(monkeypatch, inside: Path) -> None:
    """Paths under ``inside`` cannot be looked up, as under a folder without search
    permission (Path.exists raises there, it does not answer False)."""
    stat, lstat = Path.stat, Path.lstat

    def check(path: Path) -> None:
        if path.is_relative_to(inside) and path != inside:
            raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(Path, "stat", lambda p, **k: (check(p), stat(p, **k))[1])
    monkeypatch.setattr(Path, "lstat", lambda p: (check(p), lstat(p))[1])


def test_a_path_that_cannot_be_searched_is_skipped_as_unreadable(tmp_path, monkeypatch):
    good = write(tmp_path / "good.md", "Readable.")
    hidden = write(tmp_path / "locked" / "x.md", "Behind a lock.")
    _unsearchable(monkeypatch, tmp_path / "locked")
    report = load_documents([good, hidden])
    assert [d.name for d in report.documents] == [str(good)]
    assert [(s.path, s.reason) for s in report.skipped] == [
        (str(hidden), "unreadable: Permission denied")]
    result = runner.invoke(app, ["ingest", str(hidden), "--home", str(tmp_path / "home")])
    assert result.exit_code == 2, result.output  # a traceback exits 1
    assert "unreadable: Permission denied" in result.output and "no readable" in result.output


@pytest.mark.parametrize("page", [b"SQLite format 3\x00" + b"\x00" * 200,
                                  b"<p>x</p>" + bytes(range(1, 32)) * 8])
def test_binary_html_is_skipped_as_not_text(tmp_path, page):
    pytest.importorskip("bs4")
    report = load_documents(write(tmp_path / "page.html", page))
    assert report.documents == []
    assert [s.reason.split(" (")[0] for s in report.skipped] == ["not text"]


def test_stray_nuls_in_html_are_dropped_not_read_as_utf16(tmp_path):
    """A page with NULs was handed to BeautifulSoup as bytes, which read it as UTF-16."""
    pytest.importorskip("bs4")
    report = load_documents(write(tmp_path / "page.html", b"<p>a\x00b</p>"))
    assert [d.text for d in report.documents] == ["ab"]


def test_beautifulsoups_own_log_lines_are_silenced(tmp_path, caplog):
    pytest.importorskip("bs4")
    page = b'<meta charset="utf-8"><p>' + bytes(range(128, 256)) * 8 + b"</p>"
    with caplog.at_level(logging.WARNING):
        load_documents(write(tmp_path / "photo.html", page))
    assert [r for r in caplog.records if r.name.startswith("bs4")] == []


def test_prune_keeps_a_hidden_file_ingested_by_name_while_it_is_there(tmp_path, tiny_model):
    docs = tmp_path / "docs"
    write(docs / "a.md", "The assert statement checks a condition.\n" * 20)
    draft = write(docs / ".drafts" / "plan.md", "A plan for the with statement.\n" * 20)
    home = ["--home", str(tmp_path / "home"), "--model", str(tiny_model)]
    run("ingest", str(docs), str(draft), *home)
    out = run("ingest", str(docs), "--prune", *home)
    assert "pruned 0 documents" in out
    draft.unlink()
    out = run("ingest", str(docs), "--prune", *home)
    assert f"pruned {draft.resolve()}" in out and "pruned 1 document this" in out


def test_a_path_longer_than_the_index_keeps_is_skipped_saying_so(tmp_path, tiny_model):
    deep = tmp_path / ("d" * 200) / ("e" * 200) / ("f" * 150)
    good = write(tmp_path / "good.md", "The assert statement checks a condition.\n" * 20)
    long = write(deep / "long.md", "The pass statement does nothing.\n" * 20)
    out = run("ingest", str(good), str(long), "--home", str(tmp_path / "home"), "--model",
              str(tiny_model))
    assert f"skipped {long.resolve()}: its path is {len(str(long.resolve())):,} characters; " \
           "the cache index keeps names of at most 512" in out.replace("\n", "")
    assert "1 document, 1 chunk" in out
