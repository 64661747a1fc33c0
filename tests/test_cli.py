"""CLI smoke runs: ingest, ask, demo (twice: the second precomputes nothing), bench, cache stats.

A tiny random Llama saved as a real model folder (with SmolLM2's tokenizer and chat template)
keeps these fast; the same commands on the real SmolLM2 run in the slow suite.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from ragkv.cli import app

runner = CliRunner()


def run(*args: str) -> str:
    result = runner.invoke(app, list(args), catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.output


def one_doc(tmp_path: Path) -> Path:
    """A ``docs`` folder under ``tmp_path`` holding one short document."""
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "a.md").write_text("The assert statement checks a condition.\n" * 20)
    return docs


def two_docs(tmp_path: Path) -> Path:
    """A ``docs`` folder under ``tmp_path`` holding two documents a question can draw on."""
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "a.md").write_text("The assert statement checks a condition.\n\n" * 30)
    (docs / "b.txt").write_text("A with statement wraps a block in a context manager.\n" * 40)
    return docs


def test_ingest_ask_and_stats(tmp_path: Path, tiny_model: Path) -> None:
    docs = two_docs(tmp_path)
    home = ["--home", str(tmp_path / "home"), "--model", str(tiny_model)]
    out = run("ingest", str(docs), *home)
    assert "2 documents" in out and "tokens/s" in out  # precompute throughput is shown
    assert "tokens/s" not in run("ingest", str(docs), *home), "nothing computed: no rate"
    out = run("ask", "What does assert do?", "-k", "2", "--compare", *home)
    assert "blend" in out and "full" in out and "TTFT" in out
    from ragkv.cache_index import CacheIndex

    index = CacheIndex(f"sqlite:///{tmp_path / 'home' / 'index.sqlite'}")
    logged = index.recent_queries(2)  # the pair, each with the retrieval it was answered on
    index.close()
    assert [q["mode"] for q in logged] == ["blend", "full"]
    assert all(q["retrieval_s"] is not None and q["retrieval_s"] > 0 for q in logged)
    out = run("ask", "What does assert do?", "-k", "2", "--preselect", "4", *home)
    assert "blend" in out and "TTFT" in out
    stats = run("cache", "stats", "--home", str(tmp_path / "home"))
    assert "kv_entries" in stats and "anchor_passage" in stats and "corpus" in stats
    assert re.search(r"kv_bytes\s+│\s+[\d,]+ \([\d,.]+ MiB\)", stats), stats  # bytes, and MiB
    hits = CacheIndex(f"sqlite:///{tmp_path / 'home' / 'index.sqlite'}").query_totals()["hits"]
    # the chunks' hits, as the query log counts them (the template prefix's read by every
    # query made it one more per query)
    assert hits == 4 and re.search(rf"chunk_hits\s+│\s+{hits}\s", stats), stats


def test_demo_twice_reuses_stored_kv(tmp_path: Path, tiny_model: Path) -> None:
    home = ["--home", str(tmp_path / "home"), "--model", str(tiny_model)]
    first = run("demo", "--max-new-tokens", "4", *home)
    assert "computed now: 0" not in first
    assert first.count("speed-up") == 3  # one table per question
    second = run("demo", "--max-new-tokens", "4", *home)
    assert "computed now: 0" in second and "nothing precomputed" in second


def test_bench_writes_json(tmp_path: Path, tiny_model: Path) -> None:
    cases = tmp_path / "cases.jsonl"
    lines = [{"id": f"c{i}", "chunks": [f"Chunk {i} about topic {j}. " * 12 for j in range(3)],
              "question": f"What is topic {i}?", "answer": "topic"} for i in range(2)]
    cases.write_text("\n".join(json.dumps(x) for x in lines))
    out_file = tmp_path / "res.json"
    said = run("bench", "--cases", str(cases), "--ratios", "0.15,1.0", "--contexts",
               "cold,prefix,anchor", "--max-new-tokens", "4", "--out", str(out_file),
               "--home", str(tmp_path / "h"), "--model", str(tiny_model))
    data = json.loads(out_file.read_text())
    # Printed into a pipe (a log), the table keeps its width: every row whole on one line.
    row = next(s for s in data["summary"] if s["context"] == "anchor" and s["ratio"] == 0.15)
    assert any(line.split()[:4] == ["anchor", "blend", row["policy"], "0.15"]
               and f"{row['first_token_kl_median']:.4f}" in line for line in said.splitlines())
    groups = {(s["context"], s["mode"], s["ratio"]) for s in data["summary"]}
    assert ("prefix", "blend", 0.15) in groups and ("cold", "reuse", None) in groups
    # anchor entries were precomputed after a passage of the cases' own chunks, which the
    # bench does not record as the cache's anchor
    anchor = data["meta"]["anchor"]
    assert anchor["source"] == "corpus" and anchor["opening"].startswith("Chunk ")
    assert data["meta"]["cpu"].strip()  # figures from two machines can be told apart
    import torch
    import transformers

    # and from two library versions (a fresh install and vLLM's pin differ)
    assert data["meta"]["transformers"] == transformers.__version__
    assert data["meta"]["torch"] == torch.__version__
    from ragkv.cache_index import CacheIndex

    index = CacheIndex(f"sqlite:///{tmp_path / 'h' / 'index.sqlite'}")
    assert index.setting("anchor_text") is None
    index.close()
    exact = [s for s in data["summary"] if s["mode"] == "blend" and s["ratio"] == 1.0]
    assert all(s["first_token_agree"] == 1.0 and s["first_token_kl_median"] < 1e-6
               for s in exact)
    assert all(s["contains"] is not None for s in data["summary"])


@pytest.mark.parametrize(("content", "message"), [
    (b"[1, 2]\n", "must be a JSON object"),
    (b'{"chunks": ["a"], "question": 5}\n', "'question' must be a non-empty string"),
    (b'{"chunks": ["a"], "question": "q", "answer": [1]}\n', "'answer' must be a non-empty"),
    (b'{"chunks": ["a"], "question": "q", "answer": "  "}\n', "'answer' must be a non-empty"),
    (b'{"chunks": ["a"]\n', "not JSON"),
    (b"\xff\xfe\x00binary", "not UTF-8 text"),
    (None, "cannot read the case file"),
])
def test_bad_case_file_is_one_line(tmp_path: Path, content: bytes | None, message: str) -> None:
    cases = tmp_path / "cases.jsonl"
    if content is None:
        cases.mkdir()  # a folder where the file should be
    else:
        cases.write_bytes(content)
    result = runner.invoke(app, ["bench", "--cases", str(cases), "--home", str(tmp_path)])
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert len(result.output.strip().splitlines()) == 1, result.output


def test_bad_input_is_a_clear_error(tmp_path: Path, tiny_model: Path) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": "x", "chunks": [], "question": "q"}\n')
    result = runner.invoke(app, ["bench", "--cases", str(bad), "--home", str(tmp_path)])
    assert result.exit_code == 2 and "chunks" in result.output
    result = runner.invoke(app, ["ingest", str(tmp_path / "missing"), "--home", str(tmp_path)])
    assert result.exit_code == 2 and "no such file" in result.output
    result = runner.invoke(app, ["ask", "q", "--mode", "nope", "--home", str(tmp_path)])
    assert result.exit_code == 2 and "unknown mode" in result.output
    (tmp_path / "doc.md").write_text("Some text to ingest.")
    result = runner.invoke(app, ["ingest", str(tmp_path / "doc.md"), "--home", str(tmp_path),
                                 "--anchor-source", "mine"])
    assert result.exit_code == 2 and "anchor_source must be" in result.output
    assert len(result.output.strip().splitlines()) == 1
    gpt2 = tmp_path / "gpt2"
    gpt2.mkdir()
    (gpt2 / "config.json").write_text('{"architectures": ["GPT2LMHeadModel"]}')
    result = runner.invoke(app, ["ingest", str(tmp_path / "doc.md"), "--home", str(tmp_path),
                                 "--model", str(gpt2)])
    assert result.exit_code == 2 and "Llama" in result.output


def test_every_command_closes_the_facade_it_opened(tmp_path: Path, tiny_model: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """vLLM in process keeps its engine core in a child process: a command that leaves the
    facade open never exits (the interpreter waits on that child), so each command closes it
    when it ends, also when it ends in an error."""
    from ragkv.api import RagKV

    closed: list[RagKV] = []
    real = RagKV.close

    def close(self: RagKV) -> None:
        closed.append(self)
        real(self)

    monkeypatch.setattr(RagKV, "close", close)
    home = ["--home", str(tmp_path / "home"), "--model", str(tiny_model)]
    run("demo", "--max-new-tokens", "2", *home)
    assert len(closed) == 1
    from ragkv.cache_index import CacheIndex

    empty = tmp_path / "empty"  # a cache whose documents were all removed
    empty.mkdir()
    CacheIndex(f"sqlite:///{empty / 'index.sqlite'}").close()
    result = runner.invoke(app, ["ask", "q", "--home", str(empty), "--model", str(tiny_model)])
    assert result.exit_code == 2 and len(closed) == 2  # "ingest first": closed all the same


def test_ask_before_ingest_says_what_to_do(tmp_path: Path, tiny_model: Path) -> None:
    result = runner.invoke(app, ["ask", "anything?", "--home", str(tmp_path),
                                 "--model", str(tiny_model)])
    assert result.exit_code == 2 and "ragkv ingest" in result.output


@pytest.mark.slow
def test_demo_on_smollm(tmp_path: Path, smol_path: Path) -> None:
    """The real `ragkv demo` on SmolLM2: answers print, blend is reported with its speed-up."""
    home = ["--home", str(tmp_path / "home"), "--model", str(smol_path)]
    out = run("demo", "--max-new-tokens", "8", *home)
    assert out.count("speed-up") == 3 and "ragkv blend" in out
    again = run("demo", "--max-new-tokens", "4", *home)
    assert "nothing precomputed" in again


@pytest.mark.parametrize(("args", "says"), [
    (["--modes", "full,xyz"], "unknown mode 'xyz'"),
    (["--contexts", "warm"], "unknown context 'warm'"),
    (["--policies", "nope"], "unknown selection policy 'nope'"),
    (["--ratios", "0.1,abc"], "--ratios takes numbers"),
    (["--ratios", "0.1,1.5"], "within [0, 1]"),
    (["--check-layers", "x"], "--check-layers takes whole numbers"),
    (["--check-layers", "99"], "check layer 99 does not exist"),
    (["--start-factor", "0.5"], "start_factor must be a number >= 1"),
    (["--preselect", "0.5"], "preselect must be a number >= 1"),
    (["--preselect-from", "-3"], "preselect_from must be a whole number"),
    (["--preselect-by", "answer"], "preselect_by must be one of auto, question, context"),
    (["--corrections", "nope"], "correction must be one of"),
    (["--limit", "0"], "limit must be at least 1"),
    (["--max-new-tokens", "0"], "max_new_tokens must be at least 1"),
    (["--out", "/"], "--out / is a folder"),  # (a finished run's results were lost)
    (["--out", "/proc/no/such.json"], "cannot make its folder"),
])
def test_bench_settings_are_checked_before_anything_is_computed(
        tmp_path: Path, tiny_model: Path, args: list[str], says: str) -> None:
    cases = tmp_path / "cases.jsonl"
    cases.write_text(json.dumps({"id": "a", "chunks": ["One chunk of text."],
                                 "question": "What?"}) + "\n")
    result = runner.invoke(app, ["bench", "--cases", str(cases), "--home", str(tmp_path),
                                 "--model", str(tiny_model), *args])
    assert result.exit_code == 2 and says in result.output, result.output
    assert "precompute" not in result.output  # refused before the corpus's KV, not after


def test_ask_and_demo_refuse_a_zero_answer_length(tmp_path: Path) -> None:
    for cmd in (["ask", "q"], ["demo"]):
        result = runner.invoke(app, [*cmd, "--max-new-tokens", "0", "--home", str(tmp_path)])
        assert result.exit_code == 2 and "at least 1" in result.output, result.output


def test_ask_refuses_a_preselection_below_the_ratio(tmp_path: Path) -> None:
    result = runner.invoke(app, ["ask", "q", "--preselect", "0.5", "--home", str(tmp_path)])
    assert result.exit_code == 2 and "preselect must be a number >= 1" in result.output
    assert len(result.output.strip().splitlines()) == 1, result.output


@pytest.mark.parametrize(("args", "says"), [
    (["serve", "--port", "99999"], "--port"),
    (["ui", "--port", "0"], "--port"),
    (["serve", "--dtype", "bogus"], "--dtype must be one of"),
    (["serve", "--kv-cache-mb", "0"], "--kv-cache-mb"),
    (["serve", "--index-url", "notaurl"], "not a database URL"),
    (["serve", "--blob-url", "nope://x"], "unknown storage nope://"),
    # vLLM refused these after loading the model, with a traceback and exit code 1
    (["serve", "--max-model-len", "99999"], "--max-model-len 99999 is past the window"),
    (["serve", "--kv-cache-mb", "1"], "--kv-cache-mb 1 cannot hold one request of 8192"),
])
def test_serve_and_ui_refuse_bad_settings_before_starting(tmp_path: Path, args: list[str],
                                                          says: str) -> None:
    """Refused here with exit 2, before a server process starts (vLLM took tens of seconds
    to report a port out of range, with a traceback)."""
    result = runner.invoke(app, [*args, "--home", str(tmp_path), "--print"]
                           if args[0] == "serve" else [*args, "--home", str(tmp_path)])
    assert result.exit_code == 2, result.output
    assert says in " ".join(result.output.split()), result.output


@pytest.mark.parametrize("command", ["serve", "ui"])
def test_a_port_in_use_is_one_line_before_starting(tmp_path: Path, command: str) -> None:
    """vLLM said so in a traceback after loading the model, Streamlit in its own words with
    exit 1; now one line and exit 2 before anything starts."""
    import socket

    host = "127.0.0.1" if command == "serve" else "localhost"
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = runner.invoke(app, [command, "--port", str(port), "--home", str(tmp_path)])
    assert result.exit_code == 2, result.output
    assert result.output.strip() == (f"error: port {port} on {host} is in use: stop what "
                                     "listens there or pick another with --port")


def test_serve_on_an_address_of_no_interface_is_one_line(tmp_path: Path) -> None:
    result = runner.invoke(app, ["serve", "--host", "192.0.2.1", "--port", "8000",
                                 "--home", str(tmp_path)])
    assert result.exit_code == 2, result.output
    assert result.output.startswith("error: cannot listen on 192.0.2.1:8000: "), result.output
    assert len(result.output.strip().splitlines()) == 1, result.output


def test_error_text_is_never_markup(tmp_path: Path) -> None:
    """Brackets in a user's path are shown as typed (rich would read ``[/b]`` as a closing tag
    and raise), and a long message stays one line in a pipe."""
    missing = tmp_path / ("[/b] not [red]here[/red] " + "x" * 120)
    result = runner.invoke(app, ["ingest", str(missing), "--home", str(tmp_path)])
    assert result.exit_code == 2, result.output
    assert result.output.strip() == f"error: no such file or folder: {missing}"


def test_answers_and_names_are_shown_verbatim() -> None:
    """A model's answer and a document's name are text: ``list[int]`` keeps its brackets and
    ``[/b]`` cannot stop the table from printing."""
    from types import SimpleNamespace

    from rich.console import Console

    from ragkv.cli_shared import answers_table
    from ragkv.trace import ChunkTrace, QueryTrace

    chunk = ChunkTrace(key="ab" * 32, n_tokens=12, hit=True, start=5, document="notes[/b].md")
    trace = QueryTrace(mode="blend", ratio=0.12, policy="qhkvd", context_tokens=40,
                       chunks=[chunk], ttft_s=0.1, error="fell back [bold]x")
    answer = SimpleNamespace(text="Use list[int] or [/b] here.", trace=trace)
    out = Console(record=True, width=200)
    out.print(answers_table([answer]))
    shown = out.export_text()
    assert "Use list[int] or [/b] here." in shown
    assert "notes[/b].md" in shown and "fell back [bold]x" in shown


def test_skipped_file_with_brackets_in_its_name(tmp_path: Path) -> None:
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "empty [red] v[2].md").write_text("   \n")
    result = runner.invoke(app, ["ingest", str(tmp_path / "docs"), "--home", str(tmp_path)])
    assert result.exit_code == 2, result.output
    assert "skipped" in result.output and "empty [red] v[2].md" in result.output


def test_version_is_the_installed_distributions() -> None:
    from importlib.metadata import version

    import ragkv

    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0
    assert result.output.strip() == f"ragkv {version('ragkv')}"
    assert ragkv.__version__ == version("ragkv")


@pytest.mark.parametrize(("args", "says"), [
    (["ask"], "Missing argument 'question'. (see `ragkv ask --help`)"),
    (["nosuch"], "No such command 'nosuch'."),
    (["ask", "q", "--ratio", "x"], "Invalid value for '--ratio'"),
    (["cache", "stats", "--bogus"], "No such option: --bogus (see `ragkv cache stats --help`)"),
])
def test_a_mistyped_command_line_is_one_line_exit_2(args: list[str], says: str) -> None:
    import subprocess

    # the installed entry point, not CliRunner: what a user's shell runs
    proc = subprocess.run([sys.executable, "-c", "import sys; from ragkv.cli import main; "
                           "sys.argv[0] = 'ragkv'; main()", *args],
                          capture_output=True, text=True, timeout=120)
    out = (proc.stdout + proc.stderr).strip()
    assert proc.returncode == 2 and len(out.splitlines()) == 1, out
    assert out.startswith("error: ") and says in out


@pytest.mark.parametrize(("args", "says"), [
    (["ingest", "DOCS", "--max-mb", "inf"], "--max-mb must be a number of MB >= 0, got inf"),
    (["ingest", "DOCS", "--max-mb", "nan"], "--max-mb must be a number of MB >= 0, got nan"),
    (["ingest", "DOCS", "--max-mb", "-1"], "--max-mb must be a number of MB >= 0, got -1"),
    (["cache", "gc", "--disk-budget-mb", "inf"], "--disk-budget-mb must be a number of MB"),
    (["cache", "gc", "--disk-budget-mb", "1e308"], "--disk-budget-mb must be a number of MB"),
    (["cache", "gc", "--remote-budget-mb", "1e400", "--remote", "memory://r"],
     "--remote-budget-mb must be a number"),
    (["bench", "--cases", "CASES", "--long-context", "5"], "--long-context must be 0 (off) or"),
    (["ui", "--engine", "foo"], "engine must be 'hf', 'vllm' or the http(s):// URL"),
    (["ui", "--context", "warm"], "precompute_context must be 'cold', 'prefix' or"),
])
def test_option_values_no_command_can_use_are_one_line(tmp_path: Path, args: list[str],
                                                       says: str) -> None:
    docs = one_doc(tmp_path)
    cases = tmp_path / "cases.jsonl"
    cases.write_text(json.dumps({"id": "c", "chunks": ["x"], "question": "q?"}) + "\n")
    home = tmp_path / "home"
    home.mkdir()
    (home / "index.sqlite").write_text("")  # `cache gc` reads a cache
    args = [{"DOCS": str(docs), "CASES": str(cases)}.get(a, a) for a in args]
    result = runner.invoke(app, [*args, "--home", str(home)])
    assert result.exit_code == 2, result.output
    assert result.output.startswith(f"error: {says}"), result.output
    assert len(result.output.strip().splitlines()) == 1, result.output


def test_errors_go_to_stderr(tmp_path: Path) -> None:
    """`ragkv documents > list.txt` on a home with no cache: the error shows, not the file."""
    result = runner.invoke(app, ["documents", "--home", str(tmp_path)])
    assert result.exit_code == 2
    assert result.stderr.startswith("error: no ragkv cache at ") and result.stdout == ""
