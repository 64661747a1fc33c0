"""Start the Streamlit server for the ragkv UI (what ``ragkv ui`` runs)."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

from ragkv.documents import DEFAULT_MAX_BYTES
from ragkv.ui import APP_PATH, MISSING_STREAMLIT

#: Streamlit's own cap on one upload, in its megabytes (MiB); the Ingest page checks the
#: same limit again on the bytes it gets.
MAX_UPLOAD_MB = max(1, DEFAULT_MAX_BYTES // 2**20)

#: Where the server listens: the UI runs models and writes the cache, so localhost only.
ADDRESS = "localhost"


class MissingUIDependency(RuntimeError):
    """Streamlit is not installed (the ``ui`` extra)."""


class DocsRootError(RuntimeError):
    """A ``--docs-root`` that is not an existing folder."""


def check_start(home: Path, model: Path | None) -> None:
    """Refuse, before a server starts, what every page would fail on at its first use: a home
    that cannot be made or written (under a file, a read-only or special mount) and a --model
    that is no model folder. ValueError says why in one line."""
    from ragkv.model_fetch import check_model_dir

    folder = home
    while not folder.exists() and folder.parent != folder:
        folder = folder.parent
    if not folder.is_dir():
        raise ValueError(f"cannot use {home}: {folder} is not a folder")
    try:
        home.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=home):  # the index and its journal are written here
            pass
    except OSError as exc:
        raise ValueError(f"cannot use {home}: {exc.strerror or exc}") from None
    if model is not None:
        try:
            check_model_dir(Path(model).expanduser())
        except FileNotFoundError as exc:
            raise ValueError(str(exc)) from None


def _root(path: Path) -> str:
    return str(Path(path).expanduser().resolve())


def build_command(home: Path, model: Path | None, port: int = 8501, headless: bool = True,
                  address: str = ADDRESS, engine: str = "hf",
                  docs_roots: Sequence[Path] = (), context: str | None = None) -> list[str]:
    """The ``python -m streamlit run`` command line; app options go after ``--``.

    ``docs_roots``: the only folders whose files the Ingest page reads on the server (each
    passed as ``--docs-root``, absolute with symlinks resolved); none: uploads only.
    """
    cmd = [sys.executable, "-m", "streamlit", "run", str(APP_PATH),
           "--server.port", str(port),
           "--server.address", address,
           "--server.headless", "true" if headless else "false",
           "--server.maxUploadSize", str(MAX_UPLOAD_MB),
           "--browser.gatherUsageStats", "false",
           # A local tool: no "Deploy" button in the toolbar.
           "--client.toolbarMode", "minimal",
           "--", "--home", str(Path(home).expanduser())]
    if model is not None:
        cmd += ["--model", str(Path(model).expanduser())]
    if engine != "hf":
        cmd += ["--engine", engine]
    if context is not None:  # (else the context the cache was ingested in)
        cmd += ["--context", context]
    for root in dict.fromkeys(_root(r) for r in docs_roots):
        cmd += ["--docs-root", root]
    return cmd


def launch(home: Path, model: Path | None, port: int = 8501, headless: bool = True,
           address: str = ADDRESS, engine: str = "hf",
           docs_roots: Sequence[Path] = (), context: str | None = None) -> int:
    """Run the UI server until it exits or Ctrl-C; returns its exit status.

    Raises :class:`MissingUIDependency` (a RuntimeError) when Streamlit is not installed and
    :class:`DocsRootError` (a RuntimeError) when a docs root is not an existing folder.
    """
    for root in docs_roots:
        if not Path(root).expanduser().is_dir():
            raise DocsRootError(f"--docs-root {root}: not an existing folder")
    if importlib.util.find_spec("streamlit") is None:
        raise MissingUIDependency(MISSING_STREAMLIT)
    proc = subprocess.Popen(build_command(home, model, port, headless, address, engine,
                                          docs_roots, context))
    try:
        return proc.wait()
    except KeyboardInterrupt:
        # The terminal sent SIGINT to the server too; give it a moment to shut down cleanly.
        try:
            return proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.terminate()
            return proc.wait()
