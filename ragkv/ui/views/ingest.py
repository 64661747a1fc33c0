"""Ingest page: upload files or name a path on the server; KV is precomputed with progress."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Protocol

import pandas as pd
import streamlit as st

from ragkv.ingest import TEXT_SUFFIXES, iter_text_files, read_text
from ragkv.ui import state


class Upload(Protocol):
    """What ingestion needs of a Streamlit ``UploadedFile``."""

    name: str

    def getvalue(self) -> bytes: ...


def collect(uploads: Iterable[Upload], path: str) -> tuple[list[tuple[str, str]], list[str]]:
    """``(name, text)`` documents from uploads and a server path, and one error per bad input."""
    docs: list[tuple[str, str]] = []
    errors: list[str] = []
    for up in uploads:
        try:
            text = up.getvalue().decode("utf-8")
        except UnicodeDecodeError:
            errors.append(f"{up.name} is not UTF-8 text; skipped")
            continue
        if not text.strip():
            errors.append(f"{up.name} is empty; skipped")
            continue
        docs.append((up.name, text))
    if path.strip():
        try:
            files = list(iter_text_files([Path(path.strip()).expanduser()]))
        except FileNotFoundError as exc:
            errors.append(str(exc))
            files = []
        if not files and not errors:
            errors.append(f"no {'/'.join(TEXT_SUFFIXES)} files under {path.strip()}")
        for f in files:
            try:
                docs.append((str(f), read_text(f)))
            except (ValueError, OSError) as exc:
                errors.append(f"{exc}; skipped")
    return docs, errors


def run_ingest(rag, docs: list[tuple[str, str]]) -> None:
    overall = st.progress(0.0, text=f"0/{len(docs)} documents")
    computed = chunks = 0
    done_docs = 0
    for i, (name, text) in enumerate(docs):
        bar = st.progress(0.0, text=f"{name}: chunking and embedding...")

        def progress(done: int, total: int, bar=bar, name=name) -> None:
            bar.progress(done / max(total, 1), text=f"{name}: KV of chunk {done}/{total}")

        try:
            with state.engine_lock():
                res = rag.ingest_text(name, text, progress=progress)
        except ValueError as exc:  # an empty document, text that does not tokenize
            bar.empty()
            st.error(f"{name}: {exc}")
            continue
        bar.progress(1.0, text=f"{name}: {res.n_chunks} chunks, {res.precomputed} KV computed"
                               + ("" if res.new_document else " (already ingested)"))
        computed += res.precomputed
        chunks += res.n_chunks
        done_docs += 1
        overall.progress((i + 1) / len(docs), text=f"{i + 1}/{len(docs)} documents")
    if done_docs:
        st.success(f"Ingested {done_docs} document(s): {chunks} chunks, KV computed now for "
                   f"{computed} (the rest were already stored).")


def documents(rag) -> None:
    st.subheader("Documents")
    docs = rag.index.documents()
    if not docs:
        st.info("No documents yet: upload files or give a path above.")
        return
    st.dataframe(pd.DataFrame([{"document": d.name, "chunks": d.n_chunks,
                                "added (UTC)": d.created_at} for d in docs]),
                 hide_index=True, width="stretch")


def main() -> None:
    st.title("Ingest")
    rag = state.get_rag()
    st.caption("Each document is chunked, embedded for retrieval, and every chunk's KV cache is "
               "computed once and stored, so questions can reuse it.")
    uploads = st.file_uploader("Text or markdown files",
                               type=[s.lstrip(".") for s in TEXT_SUFFIXES],
                               accept_multiple_files=True, key="ingest_files")
    path = st.text_input("...or a file or folder on the server", key="ingest_path",
                         placeholder="docs/")
    if st.button("Ingest", type="primary", key="ingest_go"):
        docs, errors = collect(uploads or [], path)
        for e in errors:
            st.error(e)
        if docs:
            run_ingest(rag, docs)
        elif not errors:
            st.warning("Nothing to ingest: upload files or give a path.")
    documents(rag)


if __name__ == "__main__":
    main()
