"""Ingest page: upload files or name a path under a ``--docs-root`` folder; KV is precomputed
with progress.

The page reads files on the server only inside the folders named at launch (``ragkv ui
--docs-root DIR``); what it reads, and what it refuses, is :mod:`ragkv.ui.collect`'s.
"""

from __future__ import annotations

from collections.abc import Sequence

import pandas as pd
import streamlit as st
from sqlalchemy.exc import SQLAlchemyError

from ragkv.documents import SUPPORTED_SUFFIXES, LoadReport, prefer_unchanged
from ragkv.ingest import drop_duplicates, progress_text, stored_texts
from ragkv.ui import state
from ragkv.ui.collect import MAX_UPLOAD_BYTES, collect_report
from ragkv.ui.frames import literal_md

ENABLE_HINT = ("Reading files on the server is off. Start the UI with `ragkv ui --docs-root "
               "DIR` (repeatable) to ingest files and folders under DIR.")
#: Up to this many problems or results are shown one per line; more go in a collapsed list.
MAX_BOXES = 5


def show_problems(lines: Sequence[str]) -> None:
    """A few problems as error boxes; many (a folder of bad files) as one box and a list."""
    if len(lines) <= MAX_BOXES:
        for line in lines:
            st.error(literal_md(line))
        return
    st.error(f"{len(lines):,} inputs were not ingested; the list below says why.")
    with st.expander(f"Not ingested ({len(lines):,})"):
        st.dataframe(pd.DataFrame({"input and reason": list(lines)}), hide_index=True,
                     width="stretch")


def _result_line(name: str, res) -> str:
    return (f"{name}: {res.n_chunks} chunks, {res.precomputed} KV computed"
            + ("" if res.new_document else " (already ingested)")
            + (" (replaces the earlier version)" if res.replaced else "")
            + (" (a later version, ingested meanwhile, replaced it)" if res.superseded else ""))


def run_ingest(rag, docs: list[tuple[str, str]]) -> None:
    """Ingest ``docs`` under one progress bar; each document's outcome is listed once done
    (in a collapsed list when there are many), failures as errors."""
    overall = st.progress(0.0, text=f"0/{len(docs)} documents")
    done_lines: list[str] = []
    failed: list[str] = []
    computed = chunks = replaced = 0
    for i, (raw_name, text) in enumerate(docs):
        name = literal_md(raw_name)  # shown in Markdown lines; ingested as it is

        def progress(stage: str, done: int, total: int, i=i, name=name) -> None:
            overall.progress((i + done / max(total, 1)) / len(docs),
                             text=f"{i}/{len(docs)} documents; {name}: "
                                  f"{progress_text(stage, done, total)}")

        try:
            with state.engine_lock():
                res = rag.ingest_text(raw_name, text, progress=progress)
        except ValueError as exc:  # an empty document, text that does not tokenize
            failed.append(f"{raw_name}: {exc}")
            continue
        except (SQLAlchemyError, OSError) as exc:  # the index or the blob folder: stop here
            failed.append(f"{raw_name}: the cache could not be written: {_brief(exc)}")
            break
        done_lines.append(_result_line(name, res))
        computed += res.precomputed
        chunks += res.n_chunks
        replaced += bool(res.replaced)
    overall.progress(1.0, text=f"{len(done_lines)}/{len(docs)} documents ingested")
    show_problems(failed)
    if done_lines:
        st.success(f"Ingested {len(done_lines)} document(s)"
                   + (f", {replaced} of them replacing an earlier version" if replaced else "")
                   + f": {chunks} chunks, KV computed now for {computed} (the rest were "
                   "already stored).")
        if len(done_lines) <= MAX_BOXES:
            for line in done_lines:
                st.caption(line)
        else:
            with st.expander(f"Per document ({len(done_lines):,})"):
                st.markdown("\n".join(f"- {line}" for line in done_lines))


def _brief(exc: Exception) -> str:
    from ragkv.cache_index.database import brief

    return brief(exc) if isinstance(exc, SQLAlchemyError) else str(exc)


def _remove_selected(rag) -> None:
    """The Remove button's callback: it runs before the page, so the page lists what is left."""
    names = st.session_state.get("remove_names") or []
    try:
        gone = [n for n in names if rag.remove_document(n)]
    except (SQLAlchemyError, OSError) as exc:
        st.session_state["remove_failed"] = f"Could not remove: {literal_md(_brief(exc))}"
        return
    st.session_state["removed_names"] = gone
    st.session_state["already_removed"] = [n for n in names if n not in gone]
    st.session_state["remove_names"] = []


def documents(rag, can_read_paths: bool = True) -> None:
    st.subheader("Documents")
    if removed := st.session_state.pop("removed_names", None):
        st.success("Removed " + ", ".join(literal_md(n) for n in removed) + ", with the KV "
                   "of their chunks that no other document shares.")
    if already := st.session_state.pop("already_removed", None):
        st.info(", ".join(literal_md(n) for n in already) + ": already removed meanwhile.")
    if failed := st.session_state.pop("remove_failed", None):
        st.error(failed)
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


def ingest_collected(rag, report: LoadReport, errors: list[str], can_read_paths: bool) -> None:
    """Ingest what :func:`collect_report` found, as ``ragkv ingest`` does: a text already
    stored under one file's name stays under it, and a file edited to hold another's text
    loses its earlier version."""
    try:
        report = prefer_unchanged(report, stored_texts(rag))
    except SQLAlchemyError as exc:
        st.error(f"The cache index could not be read: {literal_md(_brief(exc))}")
        return
    show_problems(errors + [f"{s.path}: {s.reason}; skipped" for s in report.skipped])
    if report.documents:
        run_ingest(rag, [(d.name, d.text) for d in report.documents])
    try:
        for name, first in drop_duplicates(rag, report.skipped):
            st.info(f"Removed the earlier version of {literal_md(name)}: it now holds the same "
                    f"text as {literal_md(first)}.")
    except (SQLAlchemyError, OSError) as exc:
        st.error(f"Could not remove earlier versions: {literal_md(_brief(exc))}")
    if not report.documents and not errors and not report.skipped:
        st.warning("Nothing to ingest: upload files" + (" or give a path." if can_read_paths
                                                        else "."))


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
        ingest_collected(rag, *collect_report(uploads or [], path, roots), bool(roots))
    documents(rag, bool(roots))


if __name__ == "__main__":
    main()
