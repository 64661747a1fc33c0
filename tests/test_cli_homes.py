"""Where a cache lives, on the command line: a home with no cache, a home that is a file or
cannot be made, a home whose path reads as URL syntax, and cache URLs that are mistyped or
whose database does not answer; each is one line and an exit code, never a traceback."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from test_cli import one_doc, run, runner

from ragkv.cli import app


@pytest.mark.parametrize("cmd", [["ask", "q"], ["documents"], ["remove", "doc.md"],
                                 ["cache", "stats"], ["cache", "verify"],
                                 ["cache", "gc", "--disk-budget-mb", "1"]])
def test_a_home_with_no_cache_is_refused_and_left_alone(tmp_path: Path, cmd: list[str],
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """A mistyped ``--home`` is said so, before any model loads, and no empty cache is made
    there for the next command to read as the real one."""
    from ragkv.api import RagKV

    monkeypatch.setattr(RagKV, "__init__", lambda *a, **k: pytest.fail("loaded a model"))
    typo = tmp_path / "hmoe"
    result = runner.invoke(app, [*cmd, "--home", str(typo)])
    said = " ".join(result.output.split())
    assert result.exit_code == 2, result.output
    assert said.startswith(f"error: no ragkv cache at {typo}: nothing was ingested there"), said
    assert not typo.exists()


def test_an_index_that_is_a_folder_and_a_link_loop_are_named_as_such(tmp_path: Path) -> None:
    """Both were reported as missing ("no ragkv cache", "no such file or folder")."""
    (tmp_path / "home" / "index.sqlite").mkdir(parents=True)
    result = runner.invoke(app, ["documents", "--home", str(tmp_path / "home")])
    assert result.exit_code == 2 and "index.sqlite is a folder, not a file" in result.output
    (tmp_path / "x.txt").symlink_to(tmp_path / "y.txt")
    (tmp_path / "y.txt").symlink_to(tmp_path / "x.txt")
    result = runner.invoke(app, ["ingest", str(tmp_path / "x.txt"), "--home", str(tmp_path)])
    said = " ".join(result.output.split())
    assert result.exit_code == 2 and said.startswith(f"error: cannot resolve {tmp_path}"), said


@pytest.mark.parametrize("command", [["documents"], ["ingest", "doc.md"]])
def test_a_read_only_home_is_said_so(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                     command: list[str]) -> None:
    """A home on a read-only mount (a root user's chmod cannot make one) failed every command
    with "unable to open database file", exit 1; ``ingest`` as well."""
    import os

    from ragkv import cli_shared

    home = tmp_path / "home"
    home.mkdir()
    (home / "index.sqlite").write_bytes(b"")
    real = os.access
    monkeypatch.setattr(cli_shared.os, "access", lambda path, mode: (
        False if Path(path) == home and mode == os.W_OK else real(path, mode)))
    (tmp_path / "doc.md").write_text("The sky is blue.")
    monkeypatch.chdir(tmp_path)
    result = runner.invoke(app, [*command, "--home", str(home)])
    said = " ".join(result.output.split())
    assert result.exit_code == 2 and f"the cache at {home} is read-only here" in said, said


def test_a_sqlite_index_url_naming_no_file_is_refused_and_left_alone(tmp_path: Path) -> None:
    """A mistyped SQLite URL made its folders and an empty index, then said "0 documents"."""
    typo = tmp_path / "nowhere" / "index.sqlite"
    result = runner.invoke(app, ["documents", "--index-url", f"sqlite:///{typo}"])
    said = " ".join(result.output.split())
    assert result.exit_code == 2 and f"no ragkv cache index at {typo}" in said, said
    assert not typo.parent.exists()


def test_a_bad_cache_url_is_one_clear_error(tmp_path: Path) -> None:
    """Cache URLs a user mistyped name the URL and the fix, exit 2, with no traceback."""
    cases = [(["cache", "stats", "--index-url", "notaurl"], "not a database URL"),
             (["cache", "verify", "--index-url", "foo://x"], "knows no database 'foo'"),
             (["cache", "stats", "--blob-url", "nope://x"], "unknown storage nope://"),
             (["cache", "gc", "--disk-budget-mb", "1", "--blob-url", "nope://y"],
              "unknown storage nope://"),
             (["cache", "gc", "--disk-budget-mb", "-5"], "'--disk-budget-mb'"),
             (["cache", "gc", "--remote-budget-mb", "0"], "--remote-budget-mb needs --remote"),
             (["cache", "verify", "--grace-s", "nan"], "--grace-s must be a number"),
             (["cache", "verify", "--grace-s", "-1"], "--grace-s must be a number")]
    for args, says in cases:
        result = runner.invoke(app, [*args, "--home", str(tmp_path)])
        assert result.exit_code == 2, (args, result.output)
        assert says in " ".join(result.output.split()), (args, result.output)
        assert result.exception is None or isinstance(result.exception, SystemExit)


def test_an_index_that_cannot_be_opened_is_one_line_exit_1(tmp_path: Path,
                                                           tiny_model: Path) -> None:
    """``cache stats`` and a command that opens the facade (through ``main``, which catches
    what a command left) on an index URL that names a folder."""
    import subprocess

    (tmp_path / "folder.sqlite").mkdir()
    url = f"sqlite:///{tmp_path / 'folder.sqlite'}"
    result = runner.invoke(app, ["cache", "stats", "--index-url", url, "--home", str(tmp_path)])
    assert result.exit_code == 1 and "could not be read" in result.output, result.output
    doc = tmp_path / "doc.md"
    doc.write_text("Some text to ingest.")
    argv = ["ragkv", "ingest", str(doc), "--home", str(tmp_path), "--model", str(tiny_model),
            "--index-url", url]
    proc = subprocess.run([sys.executable, "-c", "import sys; from ragkv.cli import main; "
                           f"sys.argv = {argv!r}; main()"], capture_output=True, text=True,
                          timeout=300)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 1, out
    assert "could not be read" in out and "Traceback" not in out, out


@pytest.mark.parametrize("cmd", [["cache", "stats"], ["documents"], ["ask", "q"]])
def test_an_index_server_that_does_not_answer_is_one_line_exit_1(tmp_path: Path,
                                                                 tiny_model: Path,
                                                                 cmd: list[str]) -> None:
    """In the shell, not CliRunner: ``ask`` loaded the model, then its parts each logged a
    warning of several lines that the index could not be read (eight lines in all)."""
    import subprocess
    import sys

    pytest.importorskip("psycopg")
    url = "postgresql://ragkv:secret@127.0.0.1:9/ragkv"  # nothing listens on port 9
    proc = subprocess.run([sys.executable, "-c", "import sys; from ragkv.cli import main; "
                           "sys.argv[0] = 'ragkv'; main()", *cmd, "--index-url", url, "--home",
                           str(tmp_path), *(["--model", str(tiny_model)] if cmd[0] == "ask"
                                            else [])],
                          capture_output=True, text=True, timeout=120)
    said = (proc.stdout + proc.stderr).strip()
    assert proc.returncode == 1 and len(said.splitlines()) == 1, said
    assert said.startswith("error: the cache index could not be read: ") and "secret" not in said


class _DownFS:
    """A blob store whose client raises its own error, as Redis's and S3's do (not OSError)."""

    class Refused(Exception):
        pass

    @classmethod
    def register(cls) -> None:
        import fsspec
        from fsspec.implementations.memory import MemoryFileSystem

        class Down(MemoryFileSystem):
            protocol = "ragkvdown"

            def __getattribute__(self, name: str):
                if name in ("exists", "find", "ls", "info", "cat_file", "pipe_file", "rm_file"):
                    raise cls.Refused("Error 111 connecting to the store. Connection refused.")
                return super().__getattribute__(name)

        fsspec.register_implementation("ragkvdown", Down, clobber=True)


@pytest.mark.parametrize("cmd", [["cache", "stats"], ["cache", "verify"],
                                 ["cache", "gc", "--disk-budget-mb", "1"]])
def test_a_store_that_does_not_answer_or_needs_a_client_is_one_line(tmp_path: Path,
                                                                     cmd: list[str]) -> None:
    _DownFS.register()
    if cmd[1] != "gc":  # (gc reads no blob of an empty index)
        result = runner.invoke(app, [*cmd, "--home", str(tmp_path), "--blob-url",
                                     "ragkvdown://b"])
        assert result.exit_code == 1, result.output
        assert "storage failed: Refused: Error 111" in result.output, result.output
        assert result.exception is None or isinstance(result.exception, SystemExit)
    result = runner.invoke(app, [*cmd, "--home", str(tmp_path), "--index-url",
                                 "mysql://u@localhost/db"])
    assert result.exit_code == 2 and "needs its database driver installed" in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)


def test_a_home_that_is_a_file_is_one_clear_error(tmp_path: Path) -> None:
    home = tmp_path / "not-a-folder"
    home.write_text("")
    for cmd in (["cache", "stats"], ["ask", "q"], ["cache", "verify"]):
        result = runner.invoke(app, [*cmd, "--home", str(home)])
        said = " ".join(result.output.split())
        assert result.exit_code == 2 and "is a file" in said, (cmd, result.output)


def test_a_home_whose_path_reads_as_url_syntax_keeps_its_index(tmp_path: Path,
                                                              tiny_model: Path) -> None:
    docs = one_doc(tmp_path)
    for name in ("h?x=1", "h%41", "h#1 2"):
        home = tmp_path / name
        run("ingest", str(docs), "--home", str(home), "--model", str(tiny_model))
        assert (home / "index.sqlite").is_file(), name
        assert "1 document" in run("documents", "--home", str(home))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["docs", "h#1 2", "h%41", "h?x=1"]


def test_a_home_that_cannot_be_made_is_one_line(tmp_path: Path, tiny_model: Path) -> None:
    docs = one_doc(tmp_path)
    (tmp_path / "file").write_text("")
    under_a_file = tmp_path / "file" / "home"
    blobs_a_file = tmp_path / "home2"
    blobs_a_file.mkdir()
    (blobs_a_file / "blobs").write_text("")
    for home in (under_a_file, blobs_a_file):
        result = runner.invoke(app, ["ingest", str(docs), "--home", str(home), "--model",
                                     str(tiny_model)])
        assert result.exit_code == 2, result.output
        assert len(result.output.strip().splitlines()) == 1, result.output
        assert result.output.startswith("error: cannot use "), result.output
    # the UI and the server: refused before a server starts (the page blamed the model, and
    # serve --print raised a traceback)
    for cmd in (["ui", "--port", "8599"], ["serve", "--print"]):
        result = runner.invoke(app, [*cmd, "--home", str(under_a_file)])
        said = " ".join(result.output.split())
        assert result.exit_code == 2 and said.startswith(f"error: cannot use {under_a_file}"), (
            cmd, result.output)


def test_another_apps_sqlite_database_is_refused_and_left_alone(tmp_path: Path) -> None:
    """A mistyped ``--index-url`` naming another app's database got ragkv's tables added to
    it, and ``cache stats`` reported an empty cache."""
    import sqlite3

    other = tmp_path / "app.db"
    with sqlite3.connect(other) as db:
        db.execute("CREATE TABLE users (id INTEGER PRIMARY KEY, name TEXT)")
    home = tmp_path / "home"
    home.mkdir()
    (home / "index.sqlite").write_bytes(other.read_bytes())
    for args in (["cache", "stats", "--index-url", f"sqlite:///{other}"],
                 ["documents", "--home", str(home)]):
        result = runner.invoke(app, args)
        said = " ".join(result.output.split())
        assert result.exit_code == 2 and "is not a ragkv cache index" in said, said
        assert "users" in said
    for db_file in (other, home / "index.sqlite"):
        with sqlite3.connect(db_file) as db:
            assert [r[0] for r in db.execute("SELECT name FROM sqlite_master")] == ["users"]


@pytest.mark.parametrize(("cause", "said"), [
    ("database or disk is full", "could not be written: database or disk is full"),
    ("attempt to write a readonly database", "could not be written: attempt to write a"),
    ("unable to open database file", "could not be read: unable to open database file")])
def test_an_index_that_could_not_be_written_is_not_said_unreadable(cause: str,
                                                                   said: str) -> None:
    from sqlalchemy.exc import OperationalError

    from ragkv.cli_shared import index_failure

    exc = OperationalError("INSERT INTO kv_entries ...", {"question": "q"}, Exception(cause))
    assert index_failure(exc).startswith(f"the cache index {said}")


@pytest.fixture
def no_aws_credentials(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                       request: pytest.FixtureRequest) -> None:
    """No AWS credentials anywhere botocore looks, and fsspec's registry left as found."""
    import sys

    pytest.importorskip("s3fs")
    # fsspec registers the s3 class on first use and never imports it again: a later test
    # that hides s3fs (test_shared_urls.py) must find it unregistered, as a fresh process does
    registry = sys.modules["fsspec.registry"]._registry
    before = set(registry)
    request.addfinalizer(lambda: [registry.pop(k) for k in set(registry) - before])
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN",
                 "AWS_PROFILE", "AWS_DEFAULT_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")  # no instance role either


def test_an_object_store_without_credentials_is_the_users_one_line(
        tmp_path: Path, no_aws_credentials: None) -> None:
    """No credentials for an s3:// blob URL is the user's to fix (exit 2), not a store that
    failed (exit 1)."""
    result = runner.invoke(app, ["cache", "stats", "--home", str(tmp_path), "--blob-url",
                                 "s3://ragkv-no-such-bucket/blobs"])
    assert result.exit_code == 2, result.output
    assert "needs credentials it was not given: NoCredentialsError" in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)


def test_ingest_to_an_object_store_without_credentials_stops_before_precomputing(
        tmp_path: Path, tiny_model: Path, no_aws_credentials: None) -> None:
    """Ingest precomputed every chunk, warned twice per chunk that it could not be stored,
    and ended with exit 1; the store is tried once first."""
    doc = tmp_path / "a.md"
    doc.write_text("The assert statement checks a condition.\n" * 20)
    result = runner.invoke(app, ["ingest", str(doc), "--home", str(tmp_path / "home"),
                                 "--model", str(tiny_model), "--blob-url",
                                 "s3://ragkv-no-such-bucket/blobs"])
    assert result.exit_code == 2, result.output
    assert result.output.strip().splitlines() == [
        "error: the cache's storage needs credentials it was not given: NoCredentialsError: "
        "Unable to locate credentials"], result.output


@pytest.mark.parametrize(("model", "home", "said"), [
    ("missing", None, "error: no config.json in {model}: --model must be a local transformers"),
    ("file", None, "error: no config.json in {model}"),
    (None, "/proc/ragkv-home", "error: cannot use /proc/ragkv-home: "),
])
def test_ui_refuses_a_model_or_home_its_pages_cannot_use(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, model: str | None, home: str | None,
        said: str) -> None:
    """`ragkv ui` started a server with a mistyped --model or a home nothing can be written
    in, and every page failed later in the browser; `ragkv serve` refused both."""
    import ragkv.ui.launch

    monkeypatch.setattr(ragkv.ui.launch, "launch", lambda *a, **k: pytest.fail("it started"))
    (tmp_path / "file").write_text("{}")
    args = ["ui", "--port", "8599", "--home", home or str(tmp_path / "home")]
    if model is not None:
        args += ["--model", str(tmp_path / model)]
    result = runner.invoke(app, args)
    assert result.exit_code == 2, result.output
    assert " ".join(result.output.split()).startswith(
        said.format(model=tmp_path / (model or ""))), result.output
