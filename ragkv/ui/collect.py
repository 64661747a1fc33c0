"""What the Ingest page reads: uploads and a server path under the ``--docs-root`` folders, as
documents (no Streamlit here, so it is tested on its own).

A typed path is resolved (symlinks followed) and refused unless it lies in one of the roots,
and so is every file found under a folder it names. Without roots only uploads are read.
Uploads and files share :mod:`ragkv.documents`' formats, checks and size limit.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Protocol

from ragkv.documents import (
    DEFAULT_MAX_BYTES,
    SUPPORTED_SUFFIXES,
    DocumentError,
    LoadReport,
    Skipped,
    load_bytes,
    load_documents,
)

#: Largest upload or server file read (bytes): the documents loader's default, 20 MiB.
MAX_UPLOAD_BYTES = DEFAULT_MAX_BYTES
OUTSIDE_ROOTS = "paths outside the folders named with --docs-root are not read"


class Upload(Protocol):
    """What ingestion needs of a Streamlit ``UploadedFile``."""

    name: str

    def getvalue(self) -> bytes: ...


def _resolved_roots(roots: Iterable[str | Path]) -> list[Path]:
    out = []
    for r in roots:
        try:
            out.append(Path(r).expanduser().resolve())
        except (OSError, RuntimeError, ValueError):  # a loop or a NUL byte: names nothing
            continue
    return out


def _inside(path: Path, roots: Sequence[Path]) -> bool:
    return any(path.is_relative_to(root) for root in roots)


def _files_under(folder: Path) -> list[Path]:
    """Supported, non-hidden files under ``folder``; symlinked folders are not entered (a
    symlinked file is listed, and checked against the roots by its target)."""
    found = []
    for top, dirs, files in os.walk(folder):  # followlinks=False
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        found += [Path(top, f) for f in files
                  if not f.startswith(".") and Path(f).suffix.lower() in SUPPORTED_SUFFIXES]
    return sorted(found)


def _collect_path(raw: str, roots: Sequence[Path], max_bytes: int, report: LoadReport,
                  errors: list[str]) -> None:
    if not roots:
        errors.append(f"{raw}: {OUTSIDE_ROOTS} (none were named at launch)")
        return
    try:
        target = Path(raw).expanduser().resolve()
    except (OSError, RuntimeError, ValueError) as exc:  # symlink loop, NUL byte
        errors.append(f"{raw}: cannot resolve this path ({exc})")
        return
    # Checked before existence, so that the answer says nothing about files outside.
    if not _inside(target, roots):
        errors.append(f"{raw}: {OUTSIDE_ROOTS}")
        return
    if not target.exists():
        errors.append(f"no such file or folder: {raw}")
        return
    if target.is_dir():
        files = []
        for f in _files_under(target):
            try:
                real = f.resolve()
            except (OSError, RuntimeError):
                errors.append(f"{f}: cannot resolve this path; skipped")
                continue
            if not _inside(real, roots):
                errors.append(f"{f}: links outside the --docs-root folders; skipped")
            elif not real.exists():
                errors.append(f"{f}: broken link; skipped")
            elif not real.is_file():  # a named pipe or a device: reading it could block
                errors.append(f"{f}: not a regular file; skipped")
            else:
                files.append(f)
        if not files:
            errors.append(f"no {'/'.join(SUPPORTED_SUFFIXES)} files under {raw}")
            return
    else:
        files = [target]
    try:
        found = load_documents(files, max_bytes=max_bytes)
    except (OSError, ValueError) as exc:  # a file removed meanwhile
        errors.append(str(exc))
        return
    report.documents += found.documents
    report.skipped += found.skipped


def _first_of_each_text(report: LoadReport) -> LoadReport:
    """``report`` with a document whose text an earlier one has (an upload and a server file,
    two uploads) skipped as its duplicate, as the loader skips one within a folder: the same
    chunk retrieved twice would fill two of the k places with one text."""
    first: dict[str, str] = {}
    out = LoadReport(skipped=list(report.skipped))
    for d in report.documents:
        if d.sha256 in first:
            out.skipped.append(Skipped(d.name, f"duplicate of {first[d.sha256]}",
                                       duplicate_of=first[d.sha256], sha256=d.sha256))
        else:
            first[d.sha256] = d.name
            out.documents.append(d)
    return out


def collect_report(uploads: Iterable[Upload], path: str, roots: Sequence[str | Path] = (), *,
                   max_bytes: int = MAX_UPLOAD_BYTES) -> tuple[LoadReport, list[str]]:
    """The documents of uploads and a server path, each text once (later copies are skipped
    as duplicates), and one error per input that could not be read.

    ``path`` is read only when it resolves (symlinks followed) inside one of ``roots``; a
    folder's files must each resolve inside one too. Uploads and files over ``max_bytes``,
    binary or empty ones, and unsupported formats are reported, not read. A document is named
    by its upload's file name, so a second upload of one name in a batch is refused: it would
    replace the first.
    """
    report = LoadReport()
    errors: list[str] = []
    names: set[str] = set()
    for up in uploads:
        if up.name in names:
            errors.append(f"{up.name}: another file uploaded now has this name; skipped "
                          "(documents are named by file name: rename one to ingest both)")
            continue
        names.add(up.name)
        try:
            report.documents.append(load_bytes(up.name, up.getvalue(), max_bytes=max_bytes))
        except DocumentError as exc:
            errors.append(f"{exc}; skipped")
    if path.strip():
        _collect_path(path.strip(), _resolved_roots(roots), max_bytes, report, errors)
    return _first_of_each_text(report), errors


def collect(uploads: Iterable[Upload], path: str, roots: Sequence[str | Path] = (), *,
            max_bytes: int = MAX_UPLOAD_BYTES) -> tuple[list[tuple[str, str]], list[str]]:
    """:func:`collect_report` as ``(name, text)`` documents and one line per input not read
    (a skipped file: ``"<path>: <reason>; skipped"``)."""
    report, errors = collect_report(uploads, path, roots, max_bytes=max_bytes)
    return ([(d.name, d.text) for d in report.documents],
            errors + [f"{s.path}: {s.reason}; skipped" for s in report.skipped])
