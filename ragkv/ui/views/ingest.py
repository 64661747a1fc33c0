"""Ingest page: upload files or name a path under a ``--docs-root`` folder; KV is precomputed
with progress.

The page reads files on the server only inside the folders named at launch (``ragkv ui
--docs-root DIR``): a typed path is resolved (symlinks followed) and refused unless it lies in
one of them, and so is every file found under a folder it names. Without roots only uploads are
read. Uploads and files share :mod:`ragkv.documents`' formats, checks and size limit.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Protocol

import pandas as pd
import streamlit as st

from ragkv.documents import (
    DEFAULT_MAX_BYTES,
    SUPPORTED_SUFFIXES,
    DocumentError,
    load_bytes,
    load_documents,
)
from ragkv.ingest import progress_text
from ragkv.ui import state
from ragkv.ui.frames import literal_md

#: Largest upload or server file read (bytes): the documents loader's default, 20 MiB.
MAX_UPLOAD_BYTES = DEFAULT_MAX_BYTES
OUTSIDE_ROOTS = "paths outside the folders named with --docs-root are not read"
ENABLE_HINT = ("Reading files on the server is off. Start the UI with `ragkv ui --docs-root "
               "DIR` (repeatable) to ingest files and folders under DIR.")


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


def _collect_path(raw: str, roots: Sequence[Path], max_bytes: int,
                  docs: list[tuple[str, str]], errors: list[str]) -> None:
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
            if not _inside(real, roots) or not real.is_file():
                errors.append(f"{f}: links outside the --docs-root folders; skipped")
                continue
            files.append(f)
        if not files:
            errors.append(f"no {'/'.join(SUPPORTED_SUFFIXES)} files under {raw}")
            return
    else:
        files = [target]
    try:
        report = load_documents(files, max_bytes=max_bytes)
    except (OSError, ValueError) as exc:  # a file removed meanwhile
        errors.append(str(exc))
        return
    docs += [(d.name, d.text) for d in report.documents]
    errors += [f"{s.path}: {s.reason}; skipped" for s in report.skipped]


def collect(uploads: Iterable[Upload], path: str, roots: Sequence[str | Path] = (), *,
            max_bytes: int = MAX_UPLOAD_BYTES) -> tuple[list[tuple[str, str]], list[str]]:
    """``(name, text)`` documents from uploads and a server path, and one error per bad input.

    ``path`` is read only when it resolves (symlinks followed) inside one of ``roots``; a
    folder's files must each resolve inside one too. Uploads and files over ``max_bytes``,
    binary or empty ones, and unsupported formats are reported, not read.
    """
    docs: list[tuple[str, str]] = []
    errors: list[str] = []
    for up in uploads:
        try:
            doc = load_bytes(up.name, up.getvalue(), max_bytes=max_bytes)
        except DocumentError as exc:
            errors.append(f"{exc}; skipped")
            continue
        docs.append((up.name, doc.text))
    if path.strip():
        _collect_path(path.strip(), _resolved_roots(roots), max_bytes, docs, errors)
    return docs, errors


def run_ingest(rag, docs: list[tuple[str, str]]) -> None:
    overall = st.progress(0.0, text=f"0/{len(docs)} documents")
    computed = chunks = 0
    done_docs = 0
    for i, (raw_name, text) in enumerate(docs):
        name = literal_md(raw_name)  # shown in Markdown lines; ingested as it is
        bar = st.progress(0.0, text=f"{name}: chunking and embedding...")

        def progress(stage: str, done: int, total: int, bar=bar, name=name) -> None:
            bar.progress(done / max(total, 1),
                         text=f"{name}: {progress_text(stage, done, total)}")

        try:
            with state.engine_lock():
                res = rag.ingest_text(raw_name, text, progress=progress)
        except ValueError as exc:  # an empty document, text that does not tokenize
            bar.empty()
            st.error(f"{name}: {literal_md(str(exc))}")
            continue
        bar.progress(1.0, text=f"{name}: {res.n_chunks} chunks, {res.precomputed} KV computed"
                               + ("" if res.new_document else " (already ingested)")
                               + (" (replaces the earlier version)" if res.replaced else "")
                               + (" (a later version, ingested meanwhile, replaced it)"
                                  if res.superseded else ""))
        computed += res.precomputed
        chunks += res.n_chunks
        done_docs += 1
        overall.progress((i + 1) / len(docs), text=f"{i + 1}/{len(docs)} documents")
    if done_docs:
        st.success(f"Ingested {done_docs} document(s): {chunks} chunks, KV computed now for "
                   f"{computed} (the rest were already stored).")


def _remove_selected(rag) -> None:
    """The Remove button's callback: it runs before the page, so the page lists what is left."""
    names = st.session_state.get("remove_names") or []
    st.session_state["removed_names"] = [n for n in names if rag.remove_document(n)]
    st.session_state["remove_names"] = []


def documents(rag, can_read_paths: bool = True) -> None:
    st.subheader("Documents")
    if removed := st.session_state.pop("removed_names", None):
        st.success("Removed " + ", ".join(literal_md(n) for n in removed) + ", with the KV "
                   "of their chunks that no other document shares.")
    docs = rag.index.documents()
    if not docs:
        where = "upload files or give a path above" if can_read_paths else "upload files above"
        st.info(f"No documents yet: {where}.")
        return
    st.dataframe(pd.DataFrame([{"document": d.name, "chunks": d.n_chunks,
                                "added (UTC)": d.created_at} for d in docs]),
                 hide_index=True, width="stretch")
    picked = st.multiselect("Remove documents from the index and retrieval",
                            [d.name for d in docs], key="remove_names")
    st.button("Remove", key="remove_go", disabled=not picked, on_click=_remove_selected,
              args=(rag,))


def main() -> None:
    st.title("Ingest")
    rag = state.get_rag()
    roots = state.settings().docs_roots
    st.caption("Each document is chunked, embedded for retrieval, and every chunk's KV cache is "
               "computed once and stored, so questions can reuse it.")
    limit_mib = MAX_UPLOAD_BYTES / 2**20
    uploads = st.file_uploader("Text, markdown, HTML or PDF files",
                               type=[s.lstrip(".") for s in SUPPORTED_SUFFIXES],
                               accept_multiple_files=True, key="ingest_files",
                               help=f"At most {limit_mib:g} MiB per file.")
    path = st.text_input("...or a file or folder on the server", key="ingest_path",
                         placeholder=roots[0] if roots else "", disabled=not roots,
                         help=("Only inside: " + ", ".join(roots)) if roots else None)
    if roots:
        st.caption("Server paths are read only inside: " + ", ".join(f"`{r}`" for r in roots))
    else:
        st.caption(ENABLE_HINT)
    if st.button("Ingest", type="primary", key="ingest_go"):
        docs, errors = collect(uploads or [], path, roots)
        for e in errors:
            st.error(literal_md(e))
        if docs:
            run_ingest(rag, docs)
        elif not errors:
            st.warning("Nothing to ingest: upload files" + (" or give a path." if roots else "."))
    documents(rag, bool(roots))


if __name__ == "__main__":
    main()
