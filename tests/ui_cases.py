"""Shared pieces of the UI tests: a page under ``streamlit.testing.v1.AppTest`` with its home and
model in session state (the mechanism the page scripts read first), its texts, a docs folder,
and a docs root with a secret file beside it. Test modules call
``pytest.importorskip("streamlit")`` before importing this one."""

from __future__ import annotations

import re
from pathlib import Path

from streamlit.testing.v1 import AppTest

from ragkv.ui import APP_PATH
from ragkv.ui.state import SETTINGS_KEY

VIEWS = APP_PATH.parent / "views"
TIMEOUT = 300  # seconds per script run: model load and first embedding happen in one run


def page(name: str, home: Path, model: Path | None,
         docs_roots: list[Path] | None = None, context: str = "prefix") -> AppTest:
    """The page's AppTest; ``docs_roots=None`` leaves the key out of the settings (as older
    session state would), so no server path is readable. ``context``: the precompute context
    (``anchor`` stores the context scores a preselection reads)."""
    path = APP_PATH if name == "app" else VIEWS / f"{name}.py"
    at = AppTest.from_file(str(path), default_timeout=TIMEOUT)
    raw = {"home": str(home), "model": str(model) if model else None, "context": context}
    if docs_roots is not None:
        raw["docs_roots"] = [str(r) for r in docs_roots]
    at.session_state[SETTINGS_KEY] = raw
    return at


def texts(elements) -> str:
    """The elements' Markdown as the page shows it: a backslash escape shows its character."""
    return "\n".join(shown(str(e.value)) for e in elements)


def shown(markdown: str) -> str:
    return re.sub(r"\\(.)", r"\1", markdown)


def write_docs(folder: Path, scale: float = 1.0) -> Path:
    """Two documents; ``scale`` shortens them (their chunks, so the prompts)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "assert.md").write_text("The assert statement checks a condition and raises "
                                      "AssertionError when it is false.\n\n" * round(25 * scale))
    (folder / "with.txt").write_text("A with statement wraps a block in a context manager "
                                     "that exits even when the block raises.\n" * round(30 * scale))
    return folder


def _outside_setup(tmp_path: Path) -> tuple[Path, Path]:
    """A docs root with one good file, and a secret file beside it (outside the root)."""
    root = tmp_path / "root"
    (root / "sub").mkdir(parents=True)
    (root / "sub" / "good.md").write_text("Inside the root.")
    secret = tmp_path / "secret.txt"
    secret.write_text("SECRET outside the root")
    return root, secret
