"""Paths → document texts, robustly: what ``ragkv ingest`` reads before chunking.

Rules:

* Formats, by suffix (case-insensitive): ``.txt .md .markdown .rst`` as plain text; ``.html
  .htm`` through BeautifulSoup (script, style, nav and the like dropped; block elements become
  paragraphs separated by a blank line, table cells by a space; ``<pre>`` keeps its line breaks
  and indentation); ``.pdf`` through pypdf (page texts joined by a blank line). HTML and PDF
  need the ``docs`` extra (``pip install 'ragkv[docs]'``); without it such files are skipped
  with a reason saying so.
* Plain text is decoded by :mod:`ragkv.text_decoding`: UTF-8 (stray non-UTF-8 bytes in a
  UTF-8 file read as Windows-1252), else charset-normalizer's guess, Windows-1252 preferred
  where it fits about as well; an HTML page without a declared charset the same way. Text
  with more than 1 % of control characters, in any format, is "not text" (binary).
* Every text is normalised: BOM dropped, ``\\r\\n``/``\\r`` → ``\\n``, surrounding
  whitespace stripped. ``LoadedDocument.sha256`` is of that normalised text.
* Skipped with a one-line reason: an explicitly named file with an unsupported suffix, a file
  over ``max_bytes`` (default 20 MiB, checked before reading), binary data, a compressed
  file, an unreadable file, a file whose name is not UTF-8, a malformed or encrypted PDF, a
  document with no visible text, and a file whose normalised text equals an earlier one's
  ("duplicate of <first path>").
* Bad files never stop the others. ``strict=True`` raises :class:`DocumentError` at the first
  bad file instead; duplicates are not bad files (still only skipped, even when strict).
* Folders are walked recursively in sorted order, taking only supported suffixes and ignoring
  hidden files and folders (names starting with "."); linked folders are followed, each real
  folder once (a link loop ends); a folder that cannot be read is skipped with the reason; a
  link whose target is gone is skipped as a broken link, a named pipe or device as not a
  regular file (never read: it could block). A path that does not exist (or is empty, which
  would name the working directory) raises FileNotFoundError before anything is read.
* pypdf's and BeautifulSoup's own log lines about a bad file are silenced: the skip reason
  says it once.
"""

from __future__ import annotations

import hashlib
import importlib
import io
import logging
import os
import re
import warnings
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType

from ragkv.text_decoding import NotText, decode_text, has_text, looks_binary

TEXT_SUFFIXES = (".txt", ".md", ".markdown", ".rst")
HTML_SUFFIXES = (".html", ".htm")
PDF_SUFFIXES = (".pdf",)
SUPPORTED_SUFFIXES: tuple[str, ...] = TEXT_SUFFIXES + HTML_SUFFIXES + PDF_SUFFIXES
DEFAULT_MAX_BYTES = 20 * 2**20
EXTRA_HINT = "pip install 'ragkv[docs]'"

# gzip, zip, 7z, xz, zstd: an archive saved under a text suffix (a page saved compressed)
_COMPRESSED = (b"\x1f\x8b", b"PK\x03\x04", b"7z\xbc\xaf\x27\x1c", b"\xfd7zXZ\x00",
               b"\x28\xb5\x2f\xfd")
_DECLARES_CHARSET = re.compile(rb"<meta[^>]*charset|<\?xml[^>]*encoding|^\xef\xbb\xbf|^\xff\xfe"
                               rb"|^\xfe\xff", re.IGNORECASE)
# Elements whose text is never part of the readable document.
_HTML_DROP = {"script", "style", "noscript", "template", "nav", "iframe", "svg"}
# starts a line of <pre> text while HTML is read (dropped from the page's own text)
_PRE_LINE = "\ufdd0"
# Elements that start a new paragraph in the text.
_HTML_BLOCKS = {"p", "div", "section", "article", "main", "header", "footer", "aside", "h1", "h2",
                "h3", "h4", "h5", "h6", "li", "dt", "dd", "tr", "table", "blockquote", "pre",
                "figure", "figcaption", "title", "hr", "ul", "ol", "dl", "address", "details"}


class DocumentError(ValueError):
    """A file that cannot become a document; ``reason`` is the one-line why."""

    def __init__(self, path: str, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path = path
        self.reason = reason

    def __reduce__(self):  # keep path and reason across pickling (process pools)
        return type(self), (self.path, self.reason)


@dataclass(frozen=True)
class LoadedDocument:
    name: str  # the path as given or as found under a given folder
    text: str  # normalised (see the module docstring)
    sha256: str  # of ``text`` encoded as UTF-8
    format: str  # "text", "html" or "pdf"


@dataclass(frozen=True)
class Skipped:
    path: str
    reason: str
    #: for a file with the same text as one loaded before it: that one's name, and the
    #: digest of the text (``LoadedDocument.sha256``)
    duplicate_of: str | None = None
    sha256: str | None = None


@dataclass
class LoadReport:
    documents: list[LoadedDocument] = field(default_factory=list)
    skipped: list[Skipped] = field(default_factory=list)


def prefer_unchanged(report: LoadReport, stored: Mapping[str, set[str]]) -> LoadReport:
    """``report`` with each text kept under the file that already holds it in the index
    (``stored``: a name's stored text digests). Of files with one text, the first found was
    kept: where that was a file edited to hold another's text, the edited one went in, and
    the unchanged one, "skipped", stayed as well, so the index held that text twice."""
    docs = {d.name: d for d in report.documents}
    renamed: dict[str, str] = {}  # a kept file that gives way → the file kept instead
    for s in report.skipped:
        kept = docs.get(s.duplicate_of or "")
        if (kept is None or s.duplicate_of in renamed or s.sha256 not in stored.get(s.path, ())
                or kept.sha256 in stored.get(kept.name, ())):
            continue
        renamed[kept.name] = s.path
        docs[kept.name] = LoadedDocument(s.path, kept.text, kept.sha256, kept.format)
    if not renamed:
        return report
    skipped = []
    for s in report.skipped:
        if s.duplicate_of in renamed and s.path == renamed[s.duplicate_of]:  # kept instead
            s = Skipped(s.duplicate_of, f"duplicate of {s.path}", duplicate_of=s.path,
                        sha256=s.sha256)
        elif s.duplicate_of in renamed:  # a third file with the text
            s = Skipped(s.path, f"duplicate of {renamed[s.duplicate_of]}",
                        duplicate_of=renamed[s.duplicate_of], sha256=s.sha256)
        skipped.append(s)
    return LoadReport([docs[d.name] for d in report.documents], skipped)


def load_documents(paths: Iterable[str | Path], *, max_bytes: int = DEFAULT_MAX_BYTES,
                   strict: bool = False) -> LoadReport:
    """Load every supported document under ``paths`` (see the module docstring for the rules);
    one path alone is taken as one (it read as one path per character)."""
    given = [paths] if isinstance(paths, str | os.PathLike) else list(paths)
    if any(p == "" for p in given):  # Path("") is the working directory: an unset variable
        raise FileNotFoundError("no such file or folder: '' (an empty path; give '.' for the "
                                "working directory)")
    paths = [Path(p) for p in given]
    # Fail before reading anything: a typo in one path should not cost a long partial run.
    for p in paths:
        try:
            there = p.exists()
        except OSError:  # a folder on the way cannot be searched: reported as unreadable
            continue
        if not there:
            raise FileNotFoundError(f"no such file or folder: {p}")
    report = LoadReport()
    first_with: dict[str, str] = {}  # sha256 → name of the first document with that text
    seen: set[str] = set()  # a file named and also inside a folder named is read once
    for path in _iter_files(paths, report.skipped):
        name = str(path)
        if name in seen:
            continue
        seen.add(name)
        try:
            if _undecodable(name):
                name = name.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
                raise DocumentError(name, "its name is not UTF-8 text: rename the file")
            doc = _load_file(path, max_bytes)
        except DocumentError as exc:
            if strict:
                raise
            report.skipped.append(Skipped(name, exc.reason))
            continue
        if doc.sha256 in first_with:
            first = first_with[doc.sha256]
            report.skipped.append(Skipped(name, f"duplicate of {first}", duplicate_of=first,
                                          sha256=doc.sha256))
            continue
        first_with[doc.sha256] = name
        report.documents.append(doc)
    return report


def _undecodable(name: str) -> bool:
    """Whether a path holds bytes that are not UTF-8 (as Python's surrogate escapes)."""
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def load_bytes(name: str, data: bytes, *, max_bytes: int = DEFAULT_MAX_BYTES) -> LoadedDocument:
    """One document from bytes in memory (an upload); its format comes from ``name``'s suffix.

    Raises DocumentError for anything :func:`load_documents` would skip (but duplicates)."""
    _check_size(name, len(data), max_bytes)
    return _extract(name, Path(name).suffix.lower(), data)


def walk_finds(folder: Path, path: Path) -> bool:
    """Whether walking ``folder`` takes ``path`` (a path under it): a supported suffix, and no
    hidden file or folder on the way."""
    return (path.suffix.lower() in SUPPORTED_SUFFIXES and path.is_relative_to(folder)
            and not any(part.startswith(".") for part in path.relative_to(folder).parts))


def _iter_files(paths: list[Path], skipped: list[Skipped]) -> Iterator[Path]:
    for p in paths:
        try:
            folder = p.is_dir()
        except OSError:  # cannot be searched: _load_file says why
            folder = False
        if folder:
            yield from _walk(p, skipped)
        else:
            yield p  # named explicitly: an unsupported suffix is reported, not ignored


def _walk(root: Path, skipped: list[Skipped]) -> list[Path]:
    """The files a folder holds that :func:`walk_finds` takes, sorted; linked folders are
    followed (each real folder once, so a link loop ends), and a folder that cannot be read is
    reported in ``skipped``, not left out in silence."""
    def unreadable(exc: OSError) -> None:
        skipped.append(Skipped(str(exc.filename), f"unreadable folder: {exc.strerror or exc}"))

    found: list[Path] = []
    walked: set[str] = set()
    for folder, subfolders, files in os.walk(root, onerror=unreadable, followlinks=True):
        real = os.path.realpath(folder)
        if real in walked:  # a link back up the tree, or a second link to one folder
            subfolders[:] = []
            continue
        walked.add(real)
        subfolders[:] = sorted(d for d in subfolders if not d.startswith("."))
        # not only regular files: a pipe or device is reported as skipped, unread
        found.extend(p for p in (Path(folder, f) for f in files) if walk_finds(root, p))
    return sorted(found)


def _load_file(path: Path, max_bytes: int) -> LoadedDocument:
    name = str(path)
    suffix = path.suffix.lower()
    if suffix not in SUPPORTED_SUFFIXES:
        raise DocumentError(name, f"unsupported format {suffix or '(no suffix)'}")
    try:
        if path.is_symlink() and not path.exists():
            raise DocumentError(name, f"broken link (to {os.readlink(path)}, which does not "
                                      "exist)")
        if not path.is_file():
            raise DocumentError(name, "not a regular file")
        # Checked before reading so that a huge file is never loaded into memory.
        _check_size(name, path.stat().st_size, max_bytes)
        data = path.read_bytes()
    except OSError as exc:
        raise DocumentError(name, f"unreadable: {exc.strerror or exc}") from exc
    return _extract(name, suffix, data)


def _check_size(name: str, size: int, max_bytes: int) -> None:
    if size > max_bytes:
        raise DocumentError(name, f"too large ({size:,} bytes; the limit is {max_bytes:,})")


def _extract(name: str, suffix: str, data: bytes) -> LoadedDocument:
    if data.startswith(_COMPRESSED):
        raise DocumentError(name, "compressed (gzip, zip or another archive): extract it first")
    if suffix in TEXT_SUFFIXES:
        fmt, text = "text", _decode_text(name, data)
    elif suffix in HTML_SUFFIXES:
        fmt, text = "html", _html_to_text(name, data)
    elif suffix in PDF_SUFFIXES:
        fmt, text = "pdf", _pdf_to_text(name, data)
    else:
        raise DocumentError(name, f"unsupported format {suffix or '(no suffix)'}")
    if fmt != "text" and looks_binary(text):  # (plain text was checked as it was decoded)
        raise DocumentError(name, "not text (binary data)")
    text = _normalise(text)
    if not has_text(text):  # zero-width only too
        raise DocumentError(name, "empty (no text after extraction)")
    return LoadedDocument(name, text, hashlib.sha256(text.encode()).hexdigest(), fmt)


def _normalise(text: str) -> str:
    """Drop a BOM, turn \\r\\n and \\r into \\n, strip surrounding whitespace."""
    return text.removeprefix("\ufeff").replace("\r\n", "\n").replace("\r", "\n").strip()


def _decode_text(name: str, data: bytes) -> str:
    """Bytes of a plain-text file → str (:mod:`ragkv.text_decoding`), or DocumentError."""
    try:
        return decode_text(data)
    except NotText as exc:
        raise DocumentError(name, str(exc)) from None


def _optional(name: str, module: str, package: str, what: str) -> ModuleType:
    # Lazy: the docs extra is only needed by those who ingest HTML or PDF.
    try:
        return importlib.import_module(module)
    except ImportError:
        raise DocumentError(name, f"{what} needs {package}: {EXTRA_HINT}") from None


def _html_to_text(name: str, data: bytes) -> str:
    bs4 = _optional(name, "bs4", "beautifulsoup4", "HTML")
    # A page that declares its charset is handed over as bytes (BeautifulSoup honours the
    # declaration); one that does not is decoded as plain text is, since BeautifulSoup's own
    # guess reads Windows-1252 pages as cp1250. html.parser is in the standard library.
    markup: bytes | str = data
    if not _DECLARES_CHARSET.search(data[:4096]):
        # Stray NULs are not text (dropped, as from any page). Bytes that are not text, NULs
        # aside, or mostly NULs, are refused here: BeautifulSoup would guess a decoding for
        # them (NULs read as UTF-16) and hand back garbage that looks like text.
        if data.count(b"\x00") * 10 > len(data):
            raise DocumentError(name, "not text (binary data)")
        markup = _decode_text(name, data.replace(b"\x00", b""))
    # A page whose text looks like a URL or a file name warns; bs4 logs bytes it cannot decode
    # without naming the file (the skip reason names it).
    with warnings.catch_warnings(), _quiet("bs4"):
        warnings.simplefilter("ignore", bs4.MarkupResemblesLocatorWarning)
        soup = bs4.BeautifulSoup(markup, "html.parser")
    # One walk over the tree, without changing it: bs4's insert/replace look nodes up in
    # their parent's child list, which turns a tree rewrite quadratic on large flat pages.
    # The stack holds (node, inside <pre>); None marks a block's end (a paragraph break).
    out: list[str] = []
    stack: list[tuple[object, bool] | None] = [(soup, False)]
    while stack:
        item = stack.pop()
        if item is None:
            out.append("\n\n")
            continue
        node, pre = item
        if isinstance(node, bs4.element.PreformattedString):
            continue  # comments, doctype, CDATA, processing instructions
        if isinstance(node, bs4.element.NavigableString):
            # Whitespace in HTML source is layout, not text: a wrapped line is one line. In
            # <pre> it is text: its lines are marked, to keep their indentation below.
            text = str(node).replace(_PRE_LINE, "").replace("\x00", "")  # NULs: not text
            out.append(_PRE_LINE + text.replace("\n", "\n" + _PRE_LINE) if pre
                       else re.sub(r"\s+", " ", text))
        elif isinstance(node, bs4.element.Tag) and node.name not in _HTML_DROP:
            if node.name == "br":
                out.append("\n")
            elif node.name in ("td", "th"):  # a row's cells, apart (minified tables glued them)
                out.append(" ")
            elif node.name in _HTML_BLOCKS:
                out.append("\n\n")
                stack.append(None)
            pre = pre or node.name == "pre"
            stack.extend((child, pre) for child in reversed(node.contents))
    lines = [line.replace(_PRE_LINE, "").rstrip() if line.startswith(_PRE_LINE)
             else line.replace(_PRE_LINE, "").strip() for line in "".join(out).split("\n")]
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines))


def _pdf_to_text(name: str, data: bytes) -> str:
    pypdf = _optional(name, "pypdf", "pypdf", "PDF")
    try:
        with _quiet("pypdf"):
            return _pdf_pages(name, pypdf, data)
    except DocumentError:
        raise
    except Exception as exc:  # pypdf raises many types on malformed files; all mean "bad PDF"
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise DocumentError(name, f"unreadable PDF: {reason}") from exc


@contextmanager
def _quiet(logger: str) -> Iterator[None]:
    """``logger``'s warnings (and below) off while a file is read."""
    log = logging.getLogger(logger)
    saved = log.level
    log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        log.setLevel(saved)


def _pdf_pages(name: str, pypdf: ModuleType, data: bytes) -> str:
    reader = pypdf.PdfReader(io.BytesIO(data))
    if reader.is_encrypted and not reader.decrypt(""):
        raise DocumentError(name, "encrypted PDF (needs a password)")
    pages = [page.extract_text() or "" for page in reader.pages]
    return "\n\n".join(p.strip() for p in pages if p.strip())
