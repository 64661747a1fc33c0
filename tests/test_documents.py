"""ragkv.documents: paths → document texts (encodings, HTML, PDF, limits, duplicates, errors)."""

from __future__ import annotations

import gzip
import hashlib
import logging
import os
import pickle
import random
import sys
import warnings
from pathlib import Path

import pytest

from ragkv.documents import (
    SUPPORTED_SUFFIXES,
    DocumentError,
    LoadReport,
    Skipped,
    load_bytes,
    load_documents,
)


def write(path: Path, data: bytes | str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data.encode() if isinstance(data, str) else data)
    return path


def texts(report: LoadReport) -> dict[str, str]:
    return {Path(d.name).name: d.text for d in report.documents}


def reasons(report: LoadReport) -> dict[str, str]:
    return {Path(s.path).name: s.reason for s in report.skipped}


@pytest.fixture
def bs4():
    """HTML needs the docs extra (beautifulsoup4); without it these tests are skipped."""
    return pytest.importorskip("bs4")


@pytest.mark.parametrize(("data", "expected"), [
    ("naïve café ☕\n".encode(), "naïve café ☕"),
    ("\ufeffwith a BOM\n".encode(), "with a BOM"),
    ("café crème".encode("cp1252"), "café crème"),  # short: the detector ties; cp1252 wins
    ("Le café crème est très bon. Où est la bibliothèque ?\n".encode("cp1252"),
     "Le café crème est très bon. Où est la bibliothèque ?"),
    ("“Smart” quotes – and a café".encode("cp1252"), "“Smart” quotes – and a café"),
    ("Grüße aus München, schöne Straße".encode("latin-1"), "Grüße aus München, schöne Straße"),
    ("Привет, как дела? Это тест.".encode("cp1251"), "Привет, как дела? Это тест."),
    ("UTF-16 wörld\r\nline two\r\n".encode("utf-16"), "UTF-16 wörld\nline two"),
    (b"windows\r\nlines\rold mac\n\n  ", "windows\nlines\nold mac"),
    # the detector prefers cp1250 / cp437 here, not by a tie: cp1252 fits as well
    ("Crème brûlée. Ünïcödé — “quoted”, €5.".encode("cp1252"),
     "Crème brûlée. Ünïcödé — “quoted”, €5."),
    ('He said “hello” — and paid €5.'.encode("cp1252"), 'He said “hello” — and paid €5.'),
    # UTF-8 with one pasted Windows-1252 byte: still UTF-8, that byte read as cp1252 (the
    # whole file was read in a Japanese code page)
    ("Le café est très bon. ".encode() * 5 + b"It\x92s 10\xa0EUR.",
     "Le café est très bon. " * 5 + "It’s 10\xa0EUR."),
])
def test_text_encodings_are_detected_and_normalised(tmp_path, data, expected):
    report = load_documents([write(tmp_path / "doc.txt", data)])
    assert report.skipped == []
    [doc] = report.documents
    assert doc.text == expected
    assert doc.format == "text"
    assert doc.sha256 == hashlib.sha256(expected.encode()).hexdigest()


@pytest.mark.parametrize("data", [
    random.Random(0).randbytes(4096),  # like compressed data
    b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + bytes(range(256)) * 8,
    b"\x00" * 1000,
    b"text\x00with\x01many\x02control\x03chars\x04" * 20,
])
@pytest.mark.parametrize("suffix", [".txt", ".html"])
def test_binary_data_with_a_text_suffix_is_skipped_as_not_text(tmp_path, data, suffix):
    if suffix == ".html":
        pytest.importorskip("bs4")
    good = write(tmp_path / "good.md", "# fine")
    report = load_documents([write(tmp_path / f"junk{suffix}", data), good])
    assert list(texts(report)) == ["good.md"]
    # (NULs alone leave an HTML page without text: empty)
    assert reasons(report)[f"junk{suffix}"].startswith(("not text", "empty"))


def test_compressed_files_are_skipped_saying_so(tmp_path, bs4):
    page = gzip.compress(b"<html><body><p>" + b"A page saved compressed. " * 50 + b"</p>")
    report = load_documents([write(tmp_path / "page.html", page),
                             write(tmp_path / "notes.txt", gzip.compress(b"notes " * 99))])
    assert set(reasons(report).values()) == {
        "compressed (gzip, zip or another archive): extract it first"}


def test_a_file_name_that_is_not_utf8_is_skipped_and_the_others_read(tmp_path):
    docs = tmp_path / "docs"
    write(docs / "a.txt", "first")
    bad = os.fsdecode(b"b_bad\xff.txt")  # a surrogate escape, as Python lists such a name
    write(docs / bad, "second")
    write(docs / "c.txt", "third")
    report = load_documents([docs])
    assert sorted(texts(report)) == ["a.txt", "c.txt"]
    assert reasons(report) == {"b_bad\ufffd.txt": "its name is not UTF-8 text: rename the file"}


def test_html_keeps_readable_text_and_paragraphs(tmp_path, bs4):
    html = """<!DOCTYPE html><html><head><title>The Title</title>
    <style>body { color: red }</style><script>var secret = "SCRIPT TEXT";</script></head>
    <body><nav><a href="/">NAV LINK</a></nav><!-- a COMMENT -->
    <h1>Heading</h1><p>First paragraph with <b>bold</b>
       text wrapped   over lines.</p>
    <p>Second<br>line two</p><ul><li>item one</li><li>item two</li></ul>
    <noscript>NOSCRIPT</noscript></body></html>"""
    [doc] = load_documents([write(tmp_path / "page.html", html)]).documents
    assert doc.format == "html"
    for hidden in ("SCRIPT TEXT", "color: red", "NAV LINK", "COMMENT", "NOSCRIPT"):
        assert hidden not in doc.text
    assert doc.text == ("The Title\n\nHeading\n\nFirst paragraph with bold text wrapped over "
                        "lines.\n\nSecond\nline two\n\nitem one\n\nitem two")


def test_html_declared_legacy_encoding(tmp_path, bs4):
    html = '<html><head><meta charset="windows-1252"></head><body><p>café crème</p></body>'
    [doc] = load_documents([write(tmp_path / "old.htm", html.encode("cp1252"))]).documents
    assert doc.text == "café crème"


def test_pdf_pages_are_joined_with_blank_lines(tmp_path):
    pytest.importorskip("pypdf")
    fpdf = pytest.importorskip("fpdf")  # fpdf2: writes real text PDFs (pypdf cannot)
    pdf = fpdf.FPDF()
    for line in ("Hello PDF world", "Second page café"):
        pdf.add_page()
        pdf.set_font("Helvetica", size=12)
        pdf.cell(text=line)
    path = write(tmp_path / "doc.pdf", bytes(pdf.output()))
    [doc] = load_documents([path]).documents
    assert doc.format == "pdf"
    assert doc.text == "Hello PDF world\n\nSecond page café"


def test_malformed_pdf_is_skipped(tmp_path):
    pytest.importorskip("pypdf")
    report = load_documents([write(tmp_path / "bad.pdf", b"%PDF-1.4\nnot really a pdf")])
    assert report.documents == []
    assert reasons(report)["bad.pdf"].startswith("unreadable PDF")


def test_pypdfs_own_warnings_are_silenced(tmp_path, caplog):
    pytest.importorskip("pypdf")
    with caplog.at_level(logging.DEBUG):
        report = load_documents([write(tmp_path / "junk.pdf", b"$}E\xaa<" * 100)])
    assert reasons(report)["junk.pdf"].startswith("unreadable PDF")
    assert [r.getMessage() for r in caplog.records if r.name.startswith("pypdf")] == []
    assert logging.getLogger("pypdf").level == logging.NOTSET  # as it was


def test_broken_links_and_pipes_are_skipped_not_read(tmp_path):
    docs = tmp_path / "docs"
    write(docs / "good.md", "fine")
    (docs / "gone.md").symlink_to(tmp_path / "nowhere.md")
    os.mkfifo(docs / "pipe.txt")  # reading it would wait for a writer forever
    report = load_documents([docs])
    assert [Path(d.name).name for d in report.documents] == ["good.md"]
    assert reasons(report) == {
        "gone.md": f"broken link (to {tmp_path / 'nowhere.md'}, which does not exist)",
        "pipe.txt": "not a regular file"}
    report = load_documents([docs / "pipe.txt"])  # named
    assert reasons(report) == {"pipe.txt": "not a regular file"}


@pytest.mark.parametrize(("module", "suffix", "data"), [
    ("bs4", ".html", b"<p>hi</p>"), ("pypdf", ".pdf", b"%PDF-1.4"),
])
def test_missing_extra_skips_with_install_hint(tmp_path, monkeypatch, module, suffix, data):
    monkeypatch.setitem(sys.modules, module, None)  # makes `import module` raise ImportError
    report = load_documents([write(tmp_path / f"x{suffix}", data)])
    assert report.documents == []
    assert "pip install 'ragkv[docs]'" in reasons(report)[f"x{suffix}"]


def test_size_limit(tmp_path):
    big = write(tmp_path / "big.txt", "x" * 101)
    small = write(tmp_path / "small.txt", "y" * 100)
    report = load_documents([big, small], max_bytes=100)
    assert list(texts(report)) == ["small.txt"]
    assert reasons(report)["big.txt"].startswith("too large (101 bytes")
    with pytest.raises(DocumentError, match="too large"):
        load_bytes("big.txt", b"x" * 101, max_bytes=100)


def test_duplicates_by_normalised_content(tmp_path):
    a = write(tmp_path / "a.txt", "same text\n")
    b = write(tmp_path / "b.md", "\ufeffsame text\r\n\r\n")
    c = write(tmp_path / "c.txt", "other text")
    report = load_documents([a, b, c])
    assert list(texts(report)) == ["a.txt", "c.txt"]
    first = report.documents[0]
    dup = Skipped(str(b), f"duplicate of {a}", duplicate_of=str(a), sha256=first.sha256)
    assert report.skipped == [dup]
    # Duplicates are not bad files: strict mode still only skips them.
    assert load_documents([a, b], strict=True).skipped == [dup]
    # A file named twice (itself and inside a folder named too) is read once, no duplicate.
    assert load_documents([a, tmp_path]).skipped == [dup]


def test_empty_documents_are_skipped(tmp_path, bs4):
    report = load_documents([write(tmp_path / "empty.txt", b""),
                             write(tmp_path / "blank.md", " \n\r\n\t"),
                             write(tmp_path / "bare.html", "<script>only()</script>"),
                             write(tmp_path / "zw.txt", "\u200b\u200c\u200d\ufeff \n"),
                             write(tmp_path / "ctl.html", b"<p>\x06\x14</p>")])
    assert report.documents == []
    said = reasons(report)
    assert said.pop("ctl.html") == "not text (binary data)"
    assert set(said.values()) == {"empty (no text after extraction)"}


def test_folders_are_walked_sorted_with_supported_suffixes_only(tmp_path, bs4):
    for rel in ("b.txt", "a/z.md", "a/y.rst", "c.HTML", "notes.docx", "image.png",
                ".hidden/secret.txt", ".dot.txt"):
        write(tmp_path / "docs" / rel, f"<p>{rel}</p>" if rel.endswith("HTML") else rel)
    report = load_documents([tmp_path / "docs"])
    root = tmp_path / "docs"
    assert [d.name for d in report.documents] == [
        str(root / p) for p in ("a/y.rst", "a/z.md", "b.txt", "c.HTML")]
    assert report.skipped == []
    assert {".txt", ".md", ".markdown", ".rst", ".html", ".htm", ".pdf"} == set(SUPPORTED_SUFFIXES)


def test_explicit_unsupported_suffix_is_skipped_with_reason(tmp_path):
    report = load_documents([write(tmp_path / "data.xyz", "text"),
                             write(tmp_path / "README", "text")])
    assert reasons(report) == {"data.xyz": "unsupported format .xyz",
                               "README": "unsupported format (no suffix)"}


def test_strict_raises_at_first_bad_file(tmp_path):
    good = write(tmp_path / "good.txt", "fine")
    junk = write(tmp_path / "junk.txt", b"\x00\x01\x02" * 50)
    with pytest.raises(DocumentError) as info:
        load_documents([good, junk, write(tmp_path / "x.xyz", "x")], strict=True)
    assert isinstance(info.value, ValueError)
    assert info.value.path == str(junk)
    assert info.value.reason.startswith("not text")
    assert str(info.value).startswith(f"{junk}: not text")


def test_missing_path_raises_before_reading_anything(tmp_path):
    good = write(tmp_path / "good.txt", "fine")
    with pytest.raises(FileNotFoundError, match="nope"):
        load_documents([good, tmp_path / "nope"])


def test_load_bytes_for_uploads():
    doc = load_bytes("upload.TXT", "café crème".encode("cp1252"))
    assert (doc.name, doc.text, doc.format) == ("upload.TXT", "café crème", "text")
    with pytest.raises(DocumentError, match="unsupported format .exe"):
        load_bytes("tool.exe", b"MZ")
    with pytest.raises(DocumentError, match="empty"):
        load_bytes("blank.md", b"\n\n")


def test_encrypted_pdf_is_skipped(tmp_path):
    pypdf = pytest.importorskip("pypdf")
    writer = pypdf.PdfWriter()
    writer.add_blank_page(width=72, height=72)
    writer.encrypt(user_password="secret", algorithm="RC4-128")  # RC4: no cryptography needed
    path = tmp_path / "locked.pdf"
    with path.open("wb") as f:
        writer.write(f)
    assert reasons(load_documents([path])) == {"locked.pdf": "encrypted PDF (needs a password)"}


def test_html_table_cells_stay_apart_and_undeclared_pages_decode_as_text_does(bs4):
    page = "<table><tr><th>Version</th><th>Status</th></tr><tr><td>3.12</td><td>bugfix</td>"
    doc = load_bytes("t.html", (page + "</tr></table><p>Crème brûlée, “naïve”</p>").encode(
        "cp1252"))
    assert doc.text == "Version Status\n\n3.12 bugfix\n\nCrème brûlée, “naïve”"


def test_a_page_that_reads_like_a_url_warns_nothing(bs4):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert load_bytes("u.html", b"https://example.org/page").text == (
            "https://example.org/page")


def test_html_pre_and_text_after_blocks(bs4):
    doc = load_bytes("p.html", b"<div><p>a</p>tail<pre>x = 1\n  y = 2</pre>after &amp; ok</div>")
    assert doc.text == "a\n\ntail\n\nx = 1\n  y = 2\n\nafter & ok"
    # indentation of code kept across inline tags; trailing blanks and NULs are not text
    doc = load_bytes("c.html", b"<p>  lead\x00  </p><pre>def f():\n    <b>return</b> 1  \n"
                               b"\tx\x00</pre>\n   <p>  next</p>")
    assert doc.text == "lead\n\ndef f():\n    return 1\n\tx\n\nnext"


def test_document_error_survives_pickling():
    err = pickle.loads(pickle.dumps(DocumentError("a.txt", "not text (binary data)")))
    assert (err.path, err.reason, str(err)) == ("a.txt", "not text (binary data)",
                                                "a.txt: not text (binary data)")


def test_of_files_with_one_text_the_one_the_index_holds_it_under_stays() -> None:
    """a (found first) was edited to hold b's text; c is a third copy: b, which the index
    holds that text under, is kept, and a and c are its duplicates."""
    from ragkv.documents import LoadedDocument, LoadReport, Skipped, prefer_unchanged

    doc = LoadedDocument("a", "text", "d1", "text")
    report = LoadReport([doc, LoadedDocument("x", "other", "d2", "text")],
                        [Skipped("b", "duplicate of a", "a", "d1"),
                         Skipped("c", "duplicate of a", "a", "d1"), Skipped("y", "binary")])
    out = prefer_unchanged(report, {"a": {"d0"}, "b": {"d1"}})
    assert [(d.name, d.text) for d in out.documents] == [("b", "text"), ("x", "other")]
    assert [(s.path, s.duplicate_of, s.reason) for s in out.skipped] == [
        ("a", "b", "duplicate of b"), ("c", "b", "duplicate of b"), ("y", None, "binary")]
    assert prefer_unchanged(report, {"a": {"d1"}, "b": {"d1"}}) is report  # a did not change
    assert prefer_unchanged(report, {}) is report
