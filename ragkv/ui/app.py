"""Streamlit entry script of the ragkv UI.

Run by :func:`ragkv.ui.launch.launch` as ``streamlit run app.py -- --home H --model M``; the
options after ``--`` are read here once per browser session (see :mod:`ragkv.ui.state`).
"""

from __future__ import annotations

try:
    import streamlit as st
except ModuleNotFoundError as exc:  # pragma: no cover - only without the ui extra
    from ragkv.ui import MISSING_STREAMLIT

    raise SystemExit(f"error: {MISSING_STREAMLIT}") from exc

from ragkv.ui import state

# Page scripts live in views/ (not pages/, which Streamlit would also pick up on its own).
PAGES = (
    ("views/ask.py", "Ask", ":material/chat:"),
    ("views/dashboard.py", "Dashboard", ":material/monitoring:"),
    ("views/inspect_query.py", "Inspect", ":material/grid_on:"),
    ("views/ingest.py", "Ingest", ":material/upload_file:"),
)


def main() -> None:
    st.set_page_config(page_title="ragkv", page_icon=":material/bolt:", layout="wide")
    s = state.settings()
    nav = st.navigation([st.Page(path, title=title, icon=icon, default=i == 0)
                         for i, (path, title, icon) in enumerate(PAGES)])
    with st.sidebar:
        st.caption(f"home: `{s.home}`  \nmodel: `{s.model or 'default (SmolLM2)'}`  \n"
                   f"engine: `{s.engine}`  \n"
                   f"precompute context: `{s.context or 'as ingested'}`")
    nav.run()


if __name__ == "__main__":
    main()
