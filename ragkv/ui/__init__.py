"""The ragkv web UI (Streamlit): ask, dashboard, inspect and ingest pages.

Importing this package does not import Streamlit; only the page scripts do, so the core library
works without the ``ui`` extra. Start it with :func:`ragkv.ui.launch.launch` (``ragkv ui``).
"""

from __future__ import annotations

from pathlib import Path

#: The Streamlit entry script (what ``streamlit run`` is given).
APP_PATH = Path(__file__).with_name("app.py")

MISSING_STREAMLIT = (
    "the ragkv UI needs Streamlit, which is not installed; install it with "
    "`pip install 'ragkv[ui]'`"
)
