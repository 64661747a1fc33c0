"""Per-process resources and per-session settings of the UI.

The engine (model weights) and the cache index are built once per server process with
``st.cache_resource`` and shared by every browser session; a lock serialises generation on the
shared engine, whose decode loop and recording are not safe to interleave across threads.
"""

from __future__ import annotations

import argparse
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from datetime import UTC
from pathlib import Path
from typing import TYPE_CHECKING

try:
    import streamlit as st
except ModuleNotFoundError as exc:  # pragma: no cover - exercised only without the extra
    from ragkv.ui import MISSING_STREAMLIT

    raise ModuleNotFoundError(MISSING_STREAMLIT) from exc

from ragkv.config import RagkvConfig, default_home
from ragkv.ui.frames import literal_md

if TYPE_CHECKING:
    from ragkv.api import RagKV

#: Session-state key holding the app settings; tests set it before the first run.
SETTINGS_KEY = "ragkv_settings"
#: Session-state key of the last answer on the Ask page (read by Inspect).
LAST_ASK_KEY = "ragkv_last_ask"


@dataclass(frozen=True)
class Settings:
    """home, model, precompute context and engine of the shared RagKV; ``docs_roots``: the
    folders (absolute, symlinks resolved) whose files the Ingest page may read on the server.
    No roots: it reads uploads only."""

    home: str
    model: str | None = None
    context: str | None = None  # None: the one the cache was ingested in (else anchor)
    engine: str = "hf"
    docs_roots: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        # Session state may hold a list (tests, ``asdict`` round trips); one bare string is
        # one folder, not a sequence of one-letter folders.
        roots = self.docs_roots
        roots = (roots,) if isinstance(roots, str | Path) else tuple(roots or ())
        object.__setattr__(self, "docs_roots", tuple(str(r) for r in roots))


def parse_args(argv: Sequence[str]) -> Settings:
    """App options as ``streamlit run app.py -- --home H --model M [--docs-root DIR ...]``
    passes them.

    ``--docs-root`` may be repeated; each folder is made absolute with symlinks resolved.
    Unknown arguments are ignored so a foreign ``sys.argv`` (a test runner's) does no harm.
    """
    p = argparse.ArgumentParser(prog="ragkv ui", add_help=False, allow_abbrev=False)
    p.add_argument("--home", default=None)
    p.add_argument("--model", default=None)
    p.add_argument("--context", default=None)
    p.add_argument("--engine", default="hf")
    p.add_argument("--docs-root", action="append", default=[], dest="docs_roots")
    ns, _ = p.parse_known_args(list(argv))
    home = Path(ns.home).expanduser() if ns.home else default_home()
    model = str(Path(ns.model).expanduser()) if ns.model else None
    roots = tuple(dict.fromkeys(str(Path(r).expanduser().resolve()) for r in ns.docs_roots))
    return Settings(str(home), model, ns.context, ns.engine, roots)


def settings() -> Settings:
    """This session's settings: from session state if set (tests), else from the command line."""
    raw = st.session_state.get(SETTINGS_KEY)
    if raw is None:
        s = parse_args(sys.argv[1:])
        st.session_state[SETTINGS_KEY] = asdict(s)
        return s
    return raw if isinstance(raw, Settings) else Settings(**raw)


@st.cache_resource(show_spinner="Loading the model and the cache index...")
def _load_rag(home: str, model: str | None, context: str | None, engine: str = "hf") -> RagKV:
    from ragkv.api import RagKV

    cfg = RagkvConfig(home=Path(home), model=Path(model) if model else None,
                      precompute_context=context or "anchor",  # type: ignore[arg-type]
                      engine=engine)  # type: ignore[arg-type]
    rag = RagKV(cfg)
    if context is None:  # the context the cache was ingested in, as `ragkv ask` reads
        rag = rag.as_ingested()
    # One short untimed answer now, so the first TTFT a user sees (or a full-prefill baseline
    # measured first) does not carry the engine's one-time start-up cost.
    prefix = list(rag.template.prefix_ids)[:8]
    rag.generate([prefix], "Warm up?", mode="full", max_new_tokens=1, log_query=False)
    return rag


@st.cache_resource
def _engine_lock(home: str, model: str | None, context: str | None,
                 engine: str = "hf") -> threading.Lock:
    return threading.Lock()


def get_rag() -> RagKV:
    """The shared RagKV, or an error box and a stopped page if it cannot be built."""
    from sqlalchemy.exc import SQLAlchemyError

    from ragkv.cache_index.migrate import UnknownSchema

    s = settings()
    try:
        return _load_rag(s.home, s.model, s.context, s.engine)
    except (SQLAlchemyError, UnknownSchema) as exc:  # the index, not the model, is to blame
        from ragkv.cache_index.database import brief

        said = brief(exc) if isinstance(exc, SQLAlchemyError) else str(exc)
        st.error(f"The cache index in `{s.home}` could not be read: {literal_md(said)}")
        st.stop()
        raise
    except (ValueError, OSError, RuntimeError) as exc:  # bad/missing model, unusable home
        where = f"`{s.model}`" if s.model else "the default model (fetched into the home folder)"
        st.error(f"Could not load {where}: {literal_md(str(exc))}\n\n"
                 "Start the UI with `ragkv ui --model DIR` "
                 "pointing at a local Llama-family transformers model folder, or run "
                 "`make model` to fetch the default one.")
        st.stop()
        raise  # st.stop() raises; this keeps type checkers and bare calls honest


def engine_lock() -> threading.Lock:
    s = settings()
    return _engine_lock(s.home, s.model, s.context, s.engine)


@dataclass(frozen=True)
class FullTTFT:
    seconds: float
    measured_at: float  # time.time()
    source: str  # "now", "this server" or "query log"


class FullTTFTMemo:
    """Last measured full-prefill TTFT per prompt (question + chunk keys), for all sessions."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._by_prompt: dict[tuple[str, tuple[str, ...]], tuple[float, float]] = {}

    @staticmethod
    def _key(question: str, keys: Sequence[str]) -> tuple[str, tuple[str, ...]]:
        return question.strip(), tuple(keys)

    def put(self, question: str, keys: Sequence[str], seconds: float) -> None:
        with self._lock:
            self._by_prompt[self._key(question, keys)] = (seconds, time.time())

    def get(self, question: str, keys: Sequence[str]) -> FullTTFT | None:
        with self._lock:
            hit = self._by_prompt.get(self._key(question, keys))
        return FullTTFT(hit[0], hit[1], "this server") if hit else None


@st.cache_resource
def full_ttft_memo(home: str) -> FullTTFTMemo:
    return FullTTFTMemo()


def last_full_from_log(rag: RagKV, question: str, n_chunks: int) -> FullTTFT | None:
    """The newest logged full-prefill TTFT for the same question and chunk count, by the same
    engine and model (another model's made the speed-up x143).

    The log keeps no chunk keys, so this assumes retrieval returned the same chunks; the UI
    labels it as coming from the log.
    """
    for q in rag.index.recent_queries(500):
        # a pair's measured full prefill, or a full-prefill answer's own TTFT
        seconds = q["ttft_s"] if q["mode"] == "full" else q["full_ttft_s"]
        if (q["question"].strip() == question.strip() and q["n_chunks"] == n_chunks
                and q.get("engine") == rag.backend.description and seconds is not None):
            # The index stores naive UTC timestamps.
            at = q["created_at"].replace(tzinfo=UTC).timestamp()
            return FullTTFT(float(seconds), at, "query log")
    return None
