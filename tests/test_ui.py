"""The Streamlit UI under ``streamlit.testing.v1.AppTest``: every page, empty states, errors.

A tiny random Llama saved as a model folder (SmolLM2's tokenizer) keeps these fast. The app
gets its home and model through session state, the mechanism the page scripts read first.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("streamlit")
from streamlit.testing.v1 import AppTest  # noqa: E402

from ragkv.cache_index import CacheIndex, ChunkRecord  # noqa: E402
from ragkv.ui import APP_PATH, frames  # noqa: E402
from ragkv.ui.launch import (  # noqa: E402
    MAX_UPLOAD_MB,
    DocsRootError,
    MissingUIDependency,
    build_command,
    launch,
)
from ragkv.ui.state import SETTINGS_KEY, Settings, parse_args  # noqa: E402
from ragkv.ui.views.ingest import ENABLE_HINT, OUTSIDE_ROOTS, collect  # noqa: E402

VIEWS = APP_PATH.parent / "views"
TIMEOUT = 300  # seconds per script run: model load and first embedding happen in one run


def page(name: str, home: Path, model: Path | None,
         docs_roots: list[Path] | None = None) -> AppTest:
    """The page's AppTest; ``docs_roots=None`` leaves the key out of the settings (as older
    session state would), so no server path is readable."""
    path = APP_PATH if name == "app" else VIEWS / f"{name}.py"
    at = AppTest.from_file(str(path), default_timeout=TIMEOUT)
    raw = {"home": str(home), "model": str(model) if model else None, "context": "prefix"}
    if docs_roots is not None:
        raw["docs_roots"] = [str(r) for r in docs_roots]
    at.session_state[SETTINGS_KEY] = raw
    return at


def texts(elements) -> str:
    return "\n".join(str(e.value) for e in elements)


def write_docs(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "assert.md").write_text("The assert statement checks a condition and raises "
                                      "AssertionError when it is false.\n\n" * 25)
    (folder / "with.txt").write_text("A with statement wraps a block in a context manager "
                                     "that exits even when the block raises.\n" * 30)
    return folder


@pytest.fixture(scope="module")
def ingested(tmp_path_factory, tiny_model: Path) -> Path:
    """A home with two documents, ingested through the Ingest page itself."""
    root = tmp_path_factory.mktemp("ui")
    docs = write_docs(root / "docs")
    at = page("ingest", root / "home", tiny_model, docs_roots=[root]).run()
    at.text_input(key="ingest_path").input(str(docs))
    at.button(key="ingest_go").click().run()
    assert not at.exception, at.exception
    assert "Ingested 2 document(s)" in texts(at.success)
    assert len(at.dataframe) == 1  # the documents table
    return root / "home"


# ---- pure helpers -----------------------------------------------------------------------------

def test_launch_command_and_missing_streamlit(tmp_path: Path, monkeypatch) -> None:
    cmd = build_command(tmp_path / "h", tmp_path / "m", port=9123)
    assert cmd[1:4] == ["-m", "streamlit", "run"] and cmd[4] == str(APP_PATH)
    assert cmd[cmd.index("--server.port") + 1] == "9123"
    assert cmd[cmd.index("--") + 1:] == ["--home", str(tmp_path / "h"),
                                          "--model", str(tmp_path / "m")]
    assert "--model" not in build_command(tmp_path, None)
    assert "--docs-root" not in build_command(tmp_path, None)
    assert cmd[cmd.index("--server.address") + 1] == "localhost"
    assert cmd[cmd.index("--server.maxUploadSize") + 1] == str(MAX_UPLOAD_MB) == "20"
    monkeypatch.setattr("importlib.util.find_spec", lambda name: None)
    with pytest.raises(MissingUIDependency, match=r"pip install 'ragkv\[ui\]'"):
        launch(tmp_path, None)


def test_launch_passes_docs_roots(tmp_path: Path, monkeypatch) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    (tmp_path / "link").symlink_to(b, target_is_directory=True)
    cmd = build_command(tmp_path / "h", None, docs_roots=[a, tmp_path / "link", a])
    app_args = cmd[cmd.index("--") + 1:]
    # Each root once, absolute and with symlinks resolved, after the home.
    assert app_args == ["--home", str(tmp_path / "h"),
                        "--docs-root", str(a.resolve()), "--docs-root", str(b.resolve())]
    assert parse_args(app_args).docs_roots == (str(a.resolve()), str(b.resolve()))
    assert cmd[cmd.index("--server.address") + 1] == "localhost"
    other = build_command(tmp_path, None, address="0.0.0.0", docs_roots=[a])
    assert other[other.index("--server.address") + 1] == "0.0.0.0"
    with pytest.raises(DocsRootError, match="not an existing folder"):
        launch(tmp_path, None, docs_roots=[tmp_path / "missing"])
    (tmp_path / "h.txt").write_text("a file, not a folder")
    with pytest.raises(DocsRootError):
        launch(tmp_path, None, docs_roots=[tmp_path / "h.txt"])
    started: list[list[str]] = []

    class _Proc:
        def __init__(self, cmd: list[str]) -> None:
            started.append(cmd)

        def wait(self, timeout: float | None = None) -> int:
            return 0

    monkeypatch.setattr("importlib.util.find_spec", lambda name: object())
    monkeypatch.setattr("subprocess.Popen", _Proc)
    assert launch(tmp_path / "h", None, docs_roots=[a]) == 0
    assert started[0][-2:] == ["--docs-root", str(a.resolve())]


def test_parse_args_ignores_foreign_arguments(tmp_path: Path) -> None:
    s = parse_args(["-q", "tests/x.py", "--home", str(tmp_path), "-m", "not slow"])
    assert s.home == str(tmp_path) and s.model is None and s.context == "prefix"
    assert parse_args(["--model", str(tmp_path)]).model == str(tmp_path)
    assert s.docs_roots == ()


def test_settings_docs_roots(tmp_path: Path) -> None:
    s = parse_args(["--docs-root", str(tmp_path / "a"), "--home", str(tmp_path),
                    "--docs-root", str(tmp_path / "b" / ".." / "c"), "--docs-root",
                    str(tmp_path / "a")])
    assert s.docs_roots == (str((tmp_path / "a").resolve()), str((tmp_path / "c").resolve()))
    # Session state written before the option existed, or by tests, still makes Settings.
    assert Settings(**{"home": "h", "model": None, "context": "prefix"}).docs_roots == ()
    assert Settings(home="h", docs_roots=["/x", Path("/y")]).docs_roots == ("/x", "/y")
    assert Settings(home="h", docs_roots="/x").docs_roots == ("/x",)


def test_queries_frame_measures_saved_time_only_where_measured() -> None:
    rows = [dict(id=2, created_at=1, hits=2, misses=2, ttft_s=0.1, full_ttft_s=0.5),
            dict(id=1, created_at=0, hits=0, misses=0, ttft_s=0.4, full_ttft_s=None),
            dict(id=3, created_at=2, hits=4, misses=0, ttft_s=0.1, full_ttft_s=None)]
    df = frames.queries_frame(rows)
    assert list(df["id"]) == [1, 2, 3]
    assert np.isnan(df["hit_rate"][0]) and df["hit_rate"][1] == 0.5 and df["hit_rate"][2] == 1.0
    assert np.isnan(df["saved_s"][0]) and df["saved_s"][1] == pytest.approx(0.4)
    assert list(df["cum_saved_s"].round(6)) == [0.0, 0.4, 0.4]
    assert frames.queries_frame([]).empty


def test_heatmap_frame_bins_wide_prompts() -> None:
    m = frames.recompute_matrix([torch.tensor([0, 1, 2, 3, 9]), torch.tensor([3]), []], 10)
    assert m.shape == (3, 10) and m[0].sum() == 5 and m[1, 3] and not m[2].any()
    df, width = frames.heatmap_frame(m, 0, 10, max_columns=5)
    assert width == 2 and len(df) == 15
    assert df[(df.layer == 0) & (df.position == 0)]["recomputed"].item() == 1.0
    assert df[(df.layer == 0) & (df.position == 8)]["recomputed"].item() == 0.5
    df, width = frames.heatmap_frame(m, 2, 5)
    assert width == 1 and sorted(set(df.position)) == [2, 3, 4]
    assert list(frames.token_shades(m, 2, 5).round(3)) == [round(1 / 3, 3), round(2 / 3, 3), 0]



def test_cache_size_frames_shape_the_index_summaries() -> None:
    index = CacheIndex("sqlite://")  # in memory: the frames only shape what the index reports
    try:
        assert list(frames.size_by_tier(index).itertuples(index=False)) == [("disk", 0, 0.0)]
        assert frames.size_by_document(index).empty
        assert list(frames.size_by_document(index).columns) == ["document", "chunks", "MiB"]
        assert list(frames.top_chunks(index).columns) == ["chunk", "hits", "tokens", "text"]
        doc, _ = index.add_document("a.md", "", "1" * 64)
        keys = [f"{i:064x}" for i in range(3)]
        index.add_chunks(doc, [ChunkRecord(i, f"line {i}\n" + "x" * 200, [1, 2], keys[i])
                               for i in range(2)])
        for i, key in enumerate(keys):  # keys[2] is no chunk's (a prompt prefix, say)
            index.upsert_entry(key, model_fp="f", layout="l", n_tokens=i + 1, nbytes=2**20,
                               blob_name=key, checksum="0", dtype="float16", on_remote=i == 0)
        index.record_hits([keys[2], keys[2], keys[1]])
        tiers = frames.size_by_tier(index)
        assert tiers.to_dict("records") == [{"tier": "disk", "entries": 3, "MiB": 3.0},
                                            {"tier": "remote", "entries": 1, "MiB": 1.0}]
        assert frames.size_by_document(index).to_dict("records") == [
            {"document": "a.md", "chunks": 2, "MiB": 2.0}]
        top = frames.top_chunks(index, 10)
        assert list(top["chunk"]) == [keys[2][:12], "a.md #1"]
        assert list(top["hits"]) == [2, 1] and list(top["tokens"]) == [3, 2]
        assert top["text"][0] == "" and top["text"][1] == ("line 1 " + "x" * 200)[:120]
    finally:
        index.close()

class _Upload:
    def __init__(self, name: str, data: bytes) -> None:
        self.name, self._data = name, data

    def getvalue(self) -> bytes:
        return self._data


def test_collect_reports_bad_files(tmp_path: Path) -> None:
    docs, errors = collect([_Upload("a.md", b"hello"), _Upload("b.txt", bytes(range(256)) * 3),
                            _Upload("c.txt", b"  \n"), _Upload("d.exe", b"MZ")], "")
    assert docs == [("a.md", "hello")]
    assert any(e.startswith("b.txt: not text") for e in errors)
    assert any(e.startswith("c.txt: empty") for e in errors)
    assert any(e.startswith("d.exe: unsupported format .exe") for e in errors)
    docs, errors = collect([], str(tmp_path / "missing"), [tmp_path])
    assert not docs and "no such file" in errors[0]
    empty = tmp_path / "empty"
    empty.mkdir()
    docs, errors = collect([], str(empty), [tmp_path])
    assert not docs and "no .txt" in errors[0]


def test_collect_uploads_size_limit_and_formats() -> None:
    html = b"<html><body><nav>menu</nav><p>Hello <b>there</b>.</p><script>x()</script></body>"
    big = b"word " * 50
    docs, errors = collect([_Upload("page.HTML", html), _Upload("big.txt", big),
                            _Upload("bom.txt", "caf\u00e9 na\u00efve".encode("utf-8-sig"))],
                           "", max_bytes=200)
    assert docs == [("page.HTML", "Hello there."), ("bom.txt", "caf\u00e9 na\u00efve")]
    assert errors == ["big.txt: too large (250 bytes; the limit is 200); skipped"]
    docs, errors = collect([_Upload("big.txt", big)], "")  # the default limit is 20 MiB
    assert docs == [("big.txt", big.decode().strip())] and not errors


def _outside_setup(tmp_path: Path) -> tuple[Path, Path]:
    """A docs root with one good file, and a secret file beside it (outside the root)."""
    root = tmp_path / "root"
    (root / "sub").mkdir(parents=True)
    (root / "sub" / "good.md").write_text("Inside the root.")
    secret = tmp_path / "secret.txt"
    secret.write_text("SECRET outside the root")
    return root, secret


def test_collect_reads_only_inside_docs_roots(tmp_path: Path) -> None:
    root, secret = _outside_setup(tmp_path)
    (root / "sub" / "link.txt").symlink_to(secret)
    (root / "dirlink").symlink_to(tmp_path, target_is_directory=True)
    outside = [str(secret), str(root / ".." / "secret.txt"), str(root / "sub" / "link.txt"),
               str(root / "dirlink" / "secret.txt"), str(root / "dirlink"), str(tmp_path),
               "/", str(tmp_path / "missing-outside.txt")]
    if Path("/etc/hostname").exists():
        outside.append("/etc/hostname")
    for path in outside:
        docs, errors = collect([], path, [root])
        assert docs == [], path
        assert errors == [f"{path}: {OUTSIDE_ROOTS}"], path
    # No roots at all: no server path is read, not even one that exists.
    docs, errors = collect([], str(root / "sub" / "good.md"))
    assert not docs and OUTSIDE_ROOTS in errors[0] and "none were named" in errors[0]
    # Inside: a file, a folder (the link inside it is skipped with its reason, the linked
    # folder is not entered), a relative spelling that stays inside, a second root.
    for path in (root / "sub" / "good.md", root / "sub" / ".." / "sub" / "good.md"):
        docs, errors = collect([], str(path), [tmp_path / "elsewhere", root])
        assert docs == [(str((root / "sub" / "good.md").resolve()), "Inside the root.")]
        assert not errors
    docs, errors = collect([], str(root), [root])
    assert docs == [(str(root.resolve() / "sub" / "good.md"), "Inside the root.")]
    assert errors == [f"{root.resolve() / 'sub' / 'link.txt'}: links outside the --docs-root "
                      "folders; skipped"]
    assert not any("SECRET" in text for _, text in docs)
    # A link inside a root that points into another root is read.
    other = tmp_path / "other"
    other.mkdir()
    (other / "shared.txt").write_text("Shared text.")
    (root / "sub" / "shared.txt").symlink_to(other / "shared.txt")
    docs, _ = collect([], str(root / "sub"), [root, other])
    assert [t for _, t in docs] == ["Inside the root.", "Shared text."]


def test_collect_folder_reports_skipped_files(tmp_path: Path) -> None:
    root = tmp_path / "docs"
    (root / ".hidden").mkdir(parents=True)
    (root / ".hidden" / "h.txt").write_text("hidden")
    (root / "a.txt").write_text("Alpha text.")
    (root / "b.md").write_text("Alpha text.")
    (root / "bin.txt").write_bytes(bytes(range(256)) * 4)
    (root / "big.txt").write_text("x" * 300)
    (root / "notes.csv").write_text("ignored,by,suffix")
    docs, errors = collect([], str(root), [root], max_bytes=200)
    assert docs == [(str(root.resolve() / "a.txt"), "Alpha text.")]
    assert sorted(errors) == sorted([
        f"{root.resolve() / 'b.md'}: duplicate of {root.resolve() / 'a.txt'}; skipped",
        f"{root.resolve() / 'big.txt'}: too large (300 bytes; the limit is 200); skipped",
        f"{root.resolve() / 'bin.txt'}: too large (1,024 bytes; the limit is 200); skipped",
    ])
    docs, errors = collect([], str(root / "bin.txt"), [root])
    assert not docs and errors == [f"{root.resolve() / 'bin.txt'}: not text (no character "
                                   "encoding fits); skipped"]


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


def test_inspect_runs_three_modes_with_heatmap(ingested: Path, tiny_model: Path) -> None:
    at = page("inspect_query", ingested, tiny_model).run()
    assert "press **Run**" in texts(at.info)
    at.text_input(key="inspect_question").input("What does assert do?")
    at.number_input(key="inspect_k").set_value(2)
    at.number_input(key="inspect_max_new").set_value(4)
    at.button[0].click().run()
    assert not at.exception, at.exception
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
