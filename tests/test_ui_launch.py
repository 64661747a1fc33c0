"""The UI's launcher and settings, without a page run: the ``streamlit run`` command, the
``--docs-root`` folders it passes on, a missing Streamlit, the app's own arguments."""

from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("streamlit")
from ragkv.ui import APP_PATH  # noqa: E402
from ragkv.ui.launch import (  # noqa: E402
    MAX_UPLOAD_MB,
    DocsRootError,
    MissingUIDependency,
    build_command,
    launch,
)
from ragkv.ui.state import Settings, parse_args  # noqa: E402

# ---- pure helpers -----------------------------------------------------------------------------

def test_launch_command_and_missing_streamlit(tmp_path: Path, monkeypatch) -> None:
    cmd = build_command(tmp_path / "h", tmp_path / "m", port=9123)
    assert cmd[1:4] == ["-m", "streamlit", "run"] and cmd[4] == str(APP_PATH)
    assert cmd[cmd.index("--server.port") + 1] == "9123"
    assert cmd[cmd.index("--") + 1:] == ["--home", str(tmp_path / "h"),
                                          "--model", str(tmp_path / "m")]
    assert "--model" not in build_command(tmp_path, None)
    assert "--docs-root" not in build_command(tmp_path, None)
    assert "--context" not in cmd  # the pages read the context the cache was ingested in
    told = build_command(tmp_path, None, context="prefix")
    assert told[told.index("--context") + 1] == "prefix"
    assert parse_args(told[told.index("--") + 1:]).context == "prefix"
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
    # no context named: the one the cache was ingested in (anchor for a new cache)
    assert s.home == str(tmp_path) and s.model is None and s.context is None
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
