"""The UI pages under everyday misuse: a folder re-ingested after one file was edited to match
another, a folder of many bad files, an index locked by another process or made by a newer
ragkv, and more retrieved chunks than the model's window holds."""

from __future__ import annotations

import sqlite3
import threading
from pathlib import Path

import pytest

pytest.importorskip("streamlit")
from sqlalchemy import create_engine, text  # noqa: E402
from ui_cases import page, texts  # noqa: E402

from ragkv.api import RagKV  # noqa: E402
from ragkv.config import RagkvConfig  # noqa: E402


def ingest_folder(at, folder: Path):
    at.text_input(key="ingest_path").input(str(folder))
    at.button(key="ingest_go").click().run()
    assert not at.exception, at.exception
    return at


def make_home(home: Path, model: Path, docs: dict[str, str]) -> Path:
    rag = RagKV(RagkvConfig(home=home, model=model))
    for name, body in docs.items():
        rag.ingest_text(name, body)
    rag.close()
    return home


def test_a_file_edited_to_match_another_loses_its_earlier_version(tmp_path: Path,
                                                                 tiny_model: Path) -> None:
    """As `ragkv ingest` does: the page skipped the edited file as a duplicate and kept its old
    text searchable."""
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "a.md").write_text("The ferry to Skye leaves at nine every morning. " * 8)
    (docs / "b.md").write_text("The museum opens at ten and closes at six. " * 8)
    at = ingest_folder(page("ingest", tmp_path / "home", tiny_model, docs_roots=[docs]).run(),
                       docs)
    assert "Ingested 2 document(s)" in texts(at.success)
    (docs / "b.md").write_text((docs / "a.md").read_text())
    at = ingest_folder(at, docs)
    b = str((docs / "b.md").resolve())
    assert f"Removed the earlier version of {b}" in texts(at.info)
    assert list(at.dataframe[0].value["document"]) == [str((docs / "a.md").resolve())]
    rag = RagKV(RagkvConfig(home=tmp_path / "home", model=tiny_model))
    assert all("museum" not in c.text for c in rag.retrieve("When does the museum open?", 4))
    rag.close()


def test_a_folder_of_many_bad_files_is_one_error_and_one_bar(tmp_path: Path,
                                                              tiny_model: Path) -> None:
    docs = tmp_path / "docs"
    docs.mkdir()
    for i in range(3):
        (docs / f"note{i}.txt").write_text(f"Note {i}: the ferry leaves at {i + 8} o'clock.")
    for i in range(12):
        (docs / f"empty{i:02d}.txt").write_text("")
    at = ingest_folder(page("ingest", tmp_path / "home", tiny_model, docs_roots=[docs]).run(),
                       docs)
    assert len(at.error) == 1 and "12 inputs were not ingested" in texts(at.error)
    assert len(at.get("progress")) == 1
    assert "Ingested 3 document(s)" in texts(at.success)
    assert len(at.dataframe[0].value) == 12  # the skipped files, in the collapsed list
    assert len(at.dataframe[1].value) == 3  # the documents table


def test_an_index_locked_by_another_process_is_an_error_not_a_traceback(
        tmp_path: Path, tiny_model: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("ragkv.cache_index.database.SQLITE_BUSY_TIMEOUT_MS", 200)
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "new.md").write_text("A new note about the ferry timetable. " * 10)
    at = page("ingest", tmp_path / "home", tiny_model, docs_roots=[docs]).run()
    holder = sqlite3.connect(tmp_path / "home" / "index.sqlite", isolation_level=None,
                             check_same_thread=False)
    holder.execute("BEGIN IMMEDIATE")  # another writer holds the index for longer than we wait
    try:
        at = ingest_folder(at, docs)
        err = texts(at.error)
        assert "the cache could not be written" in err and "locked" in err
        assert "INSERT" not in err and not at.success
    finally:
        threading.Thread(target=holder.execute, args=("ROLLBACK",)).start()


def test_an_index_of_a_newer_ragkv_is_not_blamed_on_the_model(tmp_path: Path,
                                                               tiny_model: Path) -> None:
    home = make_home(tmp_path / "home", tiny_model, {"a.md": "The ferry leaves at nine. " * 5})
    engine = create_engine(f"sqlite:///{home / 'index.sqlite'}")
    with engine.begin() as conn:
        conn.execute(text("UPDATE alembic_version SET version_num = '9999'"))
    engine.dispose()
    at = page("ask", home, tiny_model).run()
    assert not at.exception, at.exception
    err = texts(at.error)
    assert "could not be read" in err and "newer ragkv" in err
    assert "Could not load" not in err and "--model" not in err


def test_ask_says_which_retrieved_chunks_did_not_fit_the_window(tmp_path: Path,
                                                                tiny_model: Path) -> None:
    """k up to 32 chunks of up to 512 tokens: a window of 8,192 holds about 15 of them; the page
    answered over those and said nothing of the rest."""
    words = "ferry castle harbour ticket island morning tour bridge river market".split()
    docs = {f"doc{i}.txt": " ".join(words[(i * 7 + j * 3) % len(words)] for j in range(2400))
            for i in range(8)}
    home = make_home(tmp_path / "home", tiny_model, docs)
    at = page("ask", home, tiny_model).run()
    at.text_input(key="ask_question").input("When does the ferry leave?")
    at.number_input(key="ask_k").set_value(32)
    at.number_input(key="ask_max_new").set_value(2)
    at.button[0].click().run()
    assert not at.exception, at.exception
    trace = at.session_state["ragkv_last_ask"]["trace"]
    assert trace.left_out
    assert f"Left out {len(trace.left_out)} retrieved chunk(s)" in texts(at.warning)


def test_removing_a_document_another_session_removed_says_so(tmp_path: Path,
                                                             tiny_model: Path) -> None:
    home = make_home(tmp_path / "home", tiny_model, {"a.md": "The ferry leaves at nine. " * 5,
                                                      "b.md": "The museum opens at ten. " * 5})
    at = page("ingest", home, tiny_model).run()
    at.multiselect(key="remove_names").select("a.md").select("b.md").run()
    rag = RagKV(RagkvConfig(home=home, model=tiny_model))
    assert rag.remove_document("a.md")  # meanwhile, elsewhere
    rag.close()
    at.button(key="remove_go").click().run()
    assert not at.exception, at.exception
    assert "Removed b.md" in texts(at.success)
    assert "a.md: already removed meanwhile" in texts(at.info)
    assert "No documents yet" in texts(at.info)
