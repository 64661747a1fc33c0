"""Start the Streamlit server for the ragkv UI (what ``ragkv ui`` runs)."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

from ragkv.ui import APP_PATH, MISSING_STREAMLIT


class MissingUIDependency(RuntimeError):
    """Streamlit is not installed (the ``ui`` extra)."""


def build_command(home: Path, model: Path | None, port: int = 8501, headless: bool = True,
                  address: str = "localhost", engine: str = "hf") -> list[str]:
    """The ``python -m streamlit run`` command line; app options go after ``--``."""
    cmd = [sys.executable, "-m", "streamlit", "run", str(APP_PATH),
           "--server.port", str(port),
           # Bound to localhost by default: the Ingest page reads paths on this machine.
           "--server.address", address,
           "--server.headless", "true" if headless else "false",
           "--browser.gatherUsageStats", "false",
           # A local tool: no "Deploy" button in the toolbar.
           "--client.toolbarMode", "minimal",
           "--", "--home", str(Path(home).expanduser())]
    if model is not None:
        cmd += ["--model", str(Path(model).expanduser())]
    if engine != "hf":
        cmd += ["--engine", engine]
    return cmd


def launch(home: Path, model: Path | None, port: int = 8501, headless: bool = True,
           address: str = "localhost", engine: str = "hf") -> int:
    """Run the UI server until it exits or Ctrl-C; returns its exit status.

    Raises :class:`MissingUIDependency` (a RuntimeError) when Streamlit is not installed.
    """
    if importlib.util.find_spec("streamlit") is None:
        raise MissingUIDependency(MISSING_STREAMLIT)
    proc = subprocess.Popen(build_command(home, model, port, headless, address, engine))
    try:
        return proc.wait()
    except KeyboardInterrupt:
        # The terminal sent SIGINT to the server too; give it a moment to shut down cleanly.
        try:
            return proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.terminate()
            return proc.wait()
