"""The Streamlit UI's pages under ``streamlit.testing.v1.AppTest``: every page, empty states,
errors, the docs-root confinement of the Ingest page (helpers in ``ui_cases``).

A tiny random Llama saved as a model folder (SmolLM2's tokenizer) keeps these fast. The app
gets its home and model through session state, the mechanism the page scripts read first.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

pytest.importorskip("streamlit")
from ui_cases import _outside_setup, page, texts, write_docs  # noqa: E402

from ragkv.api import RagKV  # noqa: E402
from ragkv.cache_index import CacheIndex  # noqa: E402
from ragkv.config import PRESELECT_FROM, BlendConfig, RagkvConfig  # noqa: E402
from ragkv.ui.collect import OUTSIDE_ROOTS  # noqa: E402
from ragkv.ui.frames import answer_md, literal_md  # noqa: E402
from ragkv.ui.views.dashboard import WINDOW  # noqa: E402
from ragkv.ui.views.ingest import ENABLE_HINT  # noqa: E402
from ragkv.ui.views.inspect_query import RESULT_KEY  # noqa: E402


def ingest(root: Path, tiny_model: Path, scale: float = 1.0) -> Path:
    docs = write_docs(root / "docs", scale)
    at = page("ingest", root / "home", tiny_model, docs_roots=[root]).run()
    at.text_input(key="ingest_path").input(str(docs))
    at.button(key="ingest_go").click().run()
    assert not at.exception, at.exception
    assert "Ingested 2 document(s)" in texts(at.success)
    assert len(at.dataframe) == 1  # the documents table
    return root / "home"


@pytest.fixture(scope="module")
def ingested(tmp_path_factory, tiny_model: Path) -> Path:
    """A home with two documents, ingested through the Ingest page itself."""
    return ingest(tmp_path_factory.mktemp("ui"), tiny_model)


# ---- pages ------------------------------------------------------------------------------------

def test_pages_show_empty_states(tmp_path: Path, tiny_model: Path) -> None:
    home = tmp_path / "home"
    at = page("ask", home, tiny_model).run()
    assert not at.exception and "No documents yet" in texts(at.info)
    at = page("dashboard", home, tiny_model).run()
    assert not at.exception
    info = texts(at.info)
    assert "No documents yet" in info and "No queries yet" in info
    assert "No chunk has been reused yet" in info
    at = page("inspect_query", home, tiny_model).run()
    assert not at.exception and "No documents yet" in texts(at.info)
    at = page("ingest", home, tiny_model).run()
    assert not at.exception and "No documents yet" in texts(at.info)


def test_missing_model_is_a_clear_error(tmp_path: Path) -> None:
    at = page("ask", tmp_path / "home", tmp_path / "no-such-model").run()
    assert not at.exception
    err = texts(at.error)
    assert "Could not load" in err and "no-such-model" in err and "--model" in err


@pytest.mark.parametrize("page_name", ["ask", "dashboard"])
def test_an_index_that_is_not_one_is_a_clear_error(tmp_path: Path, tiny_model: Path,
                                                     page_name: str) -> None:
    """A page showed SQLite's traceback for a home whose index is not a database."""
    home = tmp_path / "home"
    home.mkdir()
    (home / "index.sqlite").write_bytes(b"not a database at all, " * 100)
    at = page(page_name, home, tiny_model).run()
    assert not at.exception, at.exception
    err = texts(at.error)
    assert "could not be read" in err and "not a database" in err and "--model" not in err


def test_ingest_bad_path_is_an_error(tmp_path: Path, tiny_model: Path) -> None:
    at = page("ingest", tmp_path / "home", tiny_model, docs_roots=[tmp_path]).run()
    at.text_input(key="ingest_path").input(str(tmp_path / "nope"))
    at.button(key="ingest_go").click().run()
    assert not at.exception and "no such file" in texts(at.error)


def test_ingest_page_refuses_paths_outside_docs_roots(tmp_path: Path, tiny_model: Path) -> None:
    root, secret = _outside_setup(tmp_path)
    (root / "link.txt").symlink_to(secret)
    at = page("ingest", tmp_path / "home", tiny_model, docs_roots=[root]).run()
    assert not at.text_input(key="ingest_path").disabled
    assert str(root.resolve()) in texts(at.caption)
    outside = [str(secret), str(root / "link.txt"), str(root / ".." / "secret.txt")]
    if Path("/etc/hostname").exists():
        outside.append("/etc/hostname")
    for path in outside:
        at.text_input(key="ingest_path").input(path)
        at.button(key="ingest_go").click().run()
        assert not at.exception, at.exception
        assert texts(at.error) == f"{path}: {OUTSIDE_ROOTS}"
        assert not at.success and "No documents yet" in texts(at.info)
    at.text_input(key="ingest_path").input(str(root / "sub"))
    at.button(key="ingest_go").click().run()
    assert not at.exception, at.exception
    assert not at.error and "Ingested 1 document(s)" in texts(at.success)
    assert list(at.dataframe[0].value["document"]) == [str(root.resolve() / "sub" / "good.md")]


def test_ingesting_an_edited_file_again_replaces_it(tmp_path: Path, tiny_model: Path) -> None:
    root = tmp_path / "docs"
    root.mkdir()
    note = root / "note.md"
    at = page("ingest", tmp_path / "home", tiny_model, docs_roots=[root]).run()
    for text in ("The ferry leaves at nine. " * 20, "The ferry now leaves at ten. " * 20):
        note.write_text(text)
        at.text_input(key="ingest_path").input(str(note))
        at.button(key="ingest_go").click().run()
        assert not at.exception and not at.error and "Ingested 1 document(s)" in texts(at.success)
    assert list(at.dataframe[0].value["document"]) == [str(note.resolve())]
    assert at.button(key="remove_go").disabled
    at.multiselect(key="remove_names").select(str(note.resolve())).run()  # as a browser does
    at.button(key="remove_go").click().run()
    assert not at.exception and f"Removed {note.resolve()}" in texts(at.success)
    assert "No documents yet" in texts(at.info) and not at.dataframe


def test_ingest_page_without_docs_roots_reads_no_path(tmp_path: Path, tiny_model: Path) -> None:
    at = page("ingest", tmp_path / "home", tiny_model).run()  # settings without docs_roots
    box = at.text_input(key="ingest_path")
    assert box.disabled and ENABLE_HINT in texts(at.caption) and "--docs-root" in ENABLE_HINT
    # A disabled box takes no input (AppTest refuses it as a browser would); ingest gets ""
    at.button(key="ingest_go").click().run()
    assert not at.exception and not at.error and not at.success
    assert "Nothing to ingest: upload files." in texts(at.warning)
    assert "No documents yet: upload files above" in texts(at.info)


def test_ask_streams_answer_with_metrics(ingested: Path, tiny_model: Path) -> None:
    at = page("ask", ingested, tiny_model).run()
    at.text_input(key="ask_question").input("What does assert do?")
    at.number_input(key="ask_k").set_value(2)
    at.number_input(key="ask_max_new").set_value(6)
    at.checkbox(key="ask_measure_full").check()
    at.button[0].click().run()
    assert not at.exception, at.exception
    labels = {m.label: m.value for m in at.metric}
    assert labels["TTFT (this answer)"].endswith(" ms")
    assert labels["Full-prefill TTFT"].endswith(" ms") and labels["Speed-up"].startswith("x")
    assert labels["Chunk hits"] == "2/2"  # ingestion precomputed both chunks' KV
    assert "measured just now" in texts(at.caption)
    table = at.dataframe[0].value
    assert list(table.columns[:5]) == ["document", "cache", "tier", "tokens", "recomputed"]
    # Ingestion ran in this process, so its memory tier may serve what disk also holds.
    assert set(table["cache"]) == {"hit"} and set(table["tier"]) <= {"memory", "disk"}
    assert "Answer" in texts(at.subheader) and "tokens generated" in texts(at.caption)

    # Same prompt, no new measurement: the last measured figure is shown and labelled so.
    at.checkbox(key="ask_measure_full").uncheck()
    at.button[0].click().run()
    labels = {m.label: m.value for m in at.metric}
    assert "Full-prefill TTFT (last measured)" in labels
    assert "last figure measured for this exact prompt" in texts(at.caption)


def test_ask_offers_the_faster_preselecting_blend(tmp_path: Path, tiny_model: Path) -> None:
    def layer_0() -> int:  # what the last answer computed at layer 0, from the metric's help
        (recomputed,) = [m for m in at.metric if m.label == "Tokens recomputed"]
        found = re.search(r"(\d+) at layer 0", recomputed.help)
        assert found, recomputed.help
        return int(found.group(1))

    # anchor precompute: the first answer stores the anchor entries and their scores; two
    # short chunks keep the prompt under the length from which the default preselects anyway
    at = page("ask", ingest(tmp_path, tiny_model, scale=0.4), tiny_model,
              context="anchor").run()
    at.text_input(key="ask_question").input("What does assert do?")
    at.number_input(key="ask_max_new").set_value(4)
    at.number_input(key="ask_k").set_value(2)
    at.button[0].click().run()
    whole = layer_0()
    (recomputed,) = [m for m in at.metric if m.label == "Tokens recomputed"]
    assert int(recomputed.value.split("/")[1]) < PRESELECT_FROM
    at.checkbox(key="ask_preselect").check()
    at.button[0].click().run()
    assert not at.exception, at.exception
    assert "Answer" in texts(at.subheader)
    assert 0 < layer_0() < whole  # the preselection spared layer 0 some tokens
    at.run()  # the page again without asking: the last answer and its settings
    assert "preselected by context scores" in texts(at.caption)


def test_dashboard_after_queries(ingested: Path, tiny_model: Path) -> None:
    at = page("ask", ingested, tiny_model).run()
    at.text_input(key="ask_question").input("What is a with statement?")
    at.number_input(key="ask_max_new").set_value(4)
    at.checkbox(key="ask_measure_full").check()
    at.button[0].click().run()
    assert not at.exception
    at = page("dashboard", ingested, tiny_model).run()
    assert not at.exception, at.exception
    labels = {m.label: m.value for m in at.metric}
    assert labels["Documents"] == "2" and int(labels["Queries"]) >= 1
    subs = texts(at.subheader)
    for title in ("Chunk hit rate", "Cumulative TTFT saved", "Cache size by tier",
                  "Cache size by document", "Top chunks by hits", "Recent queries"):
        assert title in subs
    assert "Measured: full-prefill TTFT minus TTFT on the same prompt" in texts(at.caption)
    charts = at.get("vega_lite_chart")
    assert len(charts) >= 5  # hit rate, TTFT saved, tier, document, top chunks
    assert len(at.dataframe) == 2  # top chunks and recent queries


def test_the_dashboards_totals_count_the_queries_before_its_window(tmp_path: Path,
                                                                   tiny_model: Path) -> None:
    """The charts draw the latest queries; the totals in their captions are of every query
    (they stopped at the latest 1,000)."""
    n = WINDOW + 5
    home = tmp_path / "home"
    index = CacheIndex(RagkvConfig(home=home).resolved_index_url)
    for i in range(n):
        first = i < 5  # outside the window: their misses and savings count too
        index.log_query(question=f"q{i}", mode="blend", ratio=0.12, n_chunks=2,
                        hits=0 if first else 2, misses=2 if first else 0, context_tokens=100,
                        recomputed_tokens=10, ttft_s=0.5, full_ttft_s=1.0, answer="a")
    index.close()
    at = page("dashboard", home, tiny_model).run()
    assert not at.exception, at.exception
    captions = texts(at.caption)
    assert f"summed over {n} of {n} queries ({n * 0.5:.2f} s)" in captions, captions
    assert f"the latest {WINDOW:,} queries. Overall {2 * WINDOW}/{2 * n} hits" in captions


def test_the_pages_read_the_context_the_cache_was_ingested_in(tmp_path: Path,
                                                              tiny_model: Path) -> None:
    """As `ragkv ask` does: on a cache ingested with prefix context, anchor-context reads
    would miss every chunk but the first."""
    home = tmp_path / "home"
    rag = RagKV(RagkvConfig(home=home, model=tiny_model, precompute_context="prefix"))
    for path in sorted(write_docs(tmp_path / "docs").iterdir()):
        rag.ingest_text(path.name, path.read_text())
    rag.close()
    at = page("ask", home, tiny_model, context=None).run()
    at.text_input(key="ask_question").input("What does assert do?")
    at.number_input(key="ask_k").set_value(2)
    at.number_input(key="ask_max_new").set_value(2)
    at.button[0].click().run()
    assert not at.exception, at.exception
    assert {m.label: m.value for m in at.metric}["Chunk hits"] == "2/2"


def test_inspect_runs_three_modes_with_heatmap(ingested: Path, tiny_model: Path) -> None:
    at = page("inspect_query", ingested, tiny_model).run()
    assert "press **Run**" in texts(at.info)
    # the blend Ask and the CLI run by default, not the first policy listed
    assert at.selectbox(key="inspect_policy").value == BlendConfig().policy == "qhkvd"
    question = "What does assert do to *args and __init__?"
    at.text_input(key="inspect_question").input(question)
    at.number_input(key="inspect_k").set_value(2)
    at.number_input(key="inspect_max_new").set_value(4)
    at.button[0].click().run()
    assert not at.exception, at.exception
    # the question is shown as typed, not read as Markdown (italic "args and ", bold "init")
    assert f"Question: *{literal_md(question)}*" in [c.value for c in at.caption]
    answers = at.session_state[RESULT_KEY]["answers"]
    shown_md = [m.value for m in at.markdown]
    for mode in ("full", "reuse", "blend"):
        assert (answer_md(answers[mode]["text"]) or "_(empty answer)_") in shown_md
    labels = [m.label for m in at.metric]
    assert labels == ["TTFT full", "TTFT reuse", "TTFT blend"]
    assert len(at.get("vega_lite_chart")) == 2  # whole prompt + one chunk
    assert at.selectbox(key="inspect_chunk").options[0].startswith("chunk 1:")
    assert "tokens recomputed at the last layer" in texts(at.caption)
    at.selectbox(key="inspect_chunk").set_value(1).run()
    assert not at.exception


def test_entry_script_navigates_pages(ingested: Path, tiny_model: Path) -> None:
    at = page("app", ingested, tiny_model).run()
    assert not at.exception, at.exception
    assert at.title[0].value == "Ask"
    for script, title in (("views/dashboard.py", "Dashboard"), ("views/ingest.py", "Ingest"),
                          ("views/inspect_query.py", "Inspect")):
        at.switch_page(script).run()
        assert not at.exception, at.exception
        assert at.title[0].value == title


def test_the_log_names_the_engine_and_the_ask_page_compares_within_it(tmp_path: Path,
                                                                      tiny_model: Path) -> None:
    """The Ask page took the newest logged full-prefill TTFT of the same question whatever
    model measured it: another model's 4.1 s against a 29 ms answer read x143."""
    from ragkv.ui import state

    home = tmp_path / "home"
    write_docs(tmp_path / "docs")
    rag = RagKV(RagkvConfig(home=home, model=tiny_model))
    try:
        for f in sorted((tmp_path / "docs").iterdir()):
            rag.ingest_text(f.name, f.read_text())
        question = "What does the cache index store?"
        chunks = rag.retrieve(question, 2)
        rag.generate(chunks, question, mode="full", max_new_tokens=1)
        (row,) = rag.index.recent_queries(1)
        assert row["engine"] == rag.backend.description != ""
        mine = state.last_full_from_log(rag, question, len(chunks))
        assert mine is not None and mine.seconds == row["ttft_s"]
        rag.index.log_query(question=question, mode="full", n_chunks=len(chunks), ttft_s=4.1,
                            engine="another model")
        assert state.last_full_from_log(rag, question, len(chunks)) == mine
    finally:
        rag.index.close()
