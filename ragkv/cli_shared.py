"""What every ragkv command shares: options, the console, one-line errors, opening the facade
on the engine a user names, and the tables answers print as."""

from __future__ import annotations

import errno
import math
import os
import socket
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, NoReturn, TypeVar

import typer
from rich.console import Console, Group
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    TextColumn,
    TimeElapsedColumn,
)
from rich.table import Table
from rich.text import Text

console = Console()
#: errors go to stderr, so `ragkv documents > list.txt` still shows one on the terminal
err_console = Console(stderr=True)



def given_path(value: str) -> Path:
    """A path typed on the command line. An empty one (an unset shell variable) is refused:
    as a path it names the working directory, so it would ingest, or prune, whatever is there."""
    if value == "":
        raise typer.BadParameter("an empty path names no file or folder (an unset variable?); "
                                 "give '.' for the working directory")
    return Path(value)


Home = Annotated[Path, typer.Option(parser=given_path, help="ragkv home (model, index, blobs)")]
Model = Annotated[Path | None, typer.Option(
    parser=given_path, help="local Llama-family transformers model dir")]
Engine = Annotated[str, typer.Option(
    help="'hf' (transformers in process), 'vllm' (vLLM in process; the vllm extra) or the URL "
         "of a vLLM server started by `ragkv serve`")]

IndexUrl = Annotated[str | None, typer.Option(
    help="SQLAlchemy URL of a shared cache index (default: SQLite in --home)")]
BlobUrl = Annotated[str | None, typer.Option(
    help="fsspec URL of shared KV blobs, e.g. redis:// or s3:// (default: --home/blobs)")]

Port = Annotated[int, typer.Option(min=1, max=65535, help="TCP port to listen on")]

T = TypeVar("T")

Context = Annotated[str, typer.Option(
    help="precompute chunks 'cold', after the 'prefix', or after it and the 'anchor' passage")]
ReadContext = Annotated[str | None, typer.Option(
    "--context", help="read chunks precomputed 'cold', after the 'prefix', or after it and "
                      "the 'anchor' passage (default: what the cache was last ingested with, "
                      "else anchor)")]
AnchorSource = Annotated[str, typer.Option(
    help="the anchor passage: 'corpus' (picked from the documents at the cache's first "
         "ingestion; for bench, from the cases) or 'builtin' (ragkv's neutral passage)")]


def print_error(msg: str) -> None:
    """``error: msg`` on one line."""
    # soft_wrap: a long message (a path, an exception's text) stays one line when the output
    # is a file or a pipe, where rich would otherwise break it at 80 columns; Text: brackets
    # in the message are text, not rich markup.
    err_console.print(Text.assemble(("error:", "red"), " ", msg), soft_wrap=True)


def fail(msg: str, code: int = 2) -> NoReturn:
    """One line on the console and the exit code (2: the user's input; 1: the engine)."""
    print_error(msg)
    raise typer.Exit(code)


def check_port(host: str, port: int) -> None:
    """Fail (one line, exit 2) unless a server could listen on ``host:port`` now: a port in
    use was a traceback from vLLM after loading the model, and Streamlit's own line with
    exit 1. Each address ``host`` names is bound and released at once, with ``SO_REUSEADDR``
    as servers bind, so a port only lingering after a closed connection counts as free."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        fail(f"cannot listen on {host}:{port}: {exc.strerror}")
    problems = []
    addresses = list(dict.fromkeys((i[0], i[1], i[2], i[4]) for i in infos))
    for family, kind, proto, addr in addresses:
        with socket.socket(family, kind, proto) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind(addr)
            except OSError as exc:
                if exc.errno == errno.EADDRINUSE:
                    fail(f"port {port} on {host} is in use: stop what listens there or pick "
                         "another with --port")
                problems.append(exc.strerror or str(exc))
    if len(problems) == len(addresses):  # not one address of host can be listened on
        fail(f"cannot listen on {host}:{port}: {problems[0] if problems else 'no address'}")


#: storage clients' errors for missing or refused credentials (botocore's, Redis's)
CREDENTIAL_ERRORS = frozenset({"NoCredentialsError", "PartialCredentialsError",
                               "AuthenticationError", "AuthenticationWrongNumberOfArgsError"})


def run_engine(work: Callable[[], T]) -> T:
    """Run ``work``; what a user can fix is one line and exit 2, an engine that stopped
    answering one line and exit 1, never a traceback."""
    from ragkv.engine.base import EngineError

    try:
        return work()
    except EngineError as exc:
        fail(str(exc), code=1)
    except (ValueError, LookupError) as exc:
        fail(str(exc))


def index_failure(exc: Exception) -> str:
    """One line for a cache index that could not be reached or read."""
    from ragkv.cache_index.database import brief

    said = brief(exc)
    # SQLite's words for a write that failed: "could not be read" sent users looking at
    # permissions to read, not at a full disk
    written = any(w in said for w in ("readonly", "disk is full", "disk I/O"))
    return f"the cache index could not be {'written' if written else 'read'}: {said}"


@contextmanager
def cache_errors() -> Iterator[None]:
    """A cache URL or setting that is wrong is one line and exit 2; an index that does not
    answer one line and exit 1; never a traceback."""
    from sqlalchemy.exc import SQLAlchemyError

    try:
        yield
    except ValueError as exc:
        fail(str(exc))
    except SQLAlchemyError as exc:
        fail(index_failure(exc), code=1)
    except OSError as exc:  # a home or blob folder that cannot be created or read
        fail(f"cannot use {exc.filename or 'the cache'}: {exc.strerror or exc}")
    except ImportError as exc:  # a storage URL whose client is an extra not installed
        fail(first_line(exc))
    except typer.Exit:
        raise
    except Exception as exc:  # a storage client's own error (Redis, S3): not an OSError
        if type(exc).__name__ in CREDENTIAL_ERRORS:  # the user's to fix, not the store's
            fail(f"the cache's storage needs credentials it was not given: "
                 f"{type(exc).__name__}: {first_line(exc)}")
        fail(f"the cache's storage failed: {type(exc).__name__}: {first_line(exc)}", code=1)


def writable_file(path: Path, option: str) -> None:
    """Fail in one line unless a file can be written at ``path`` (its folder is made): opened
    for appending, which changes nothing in a file that is there, and a file made for the
    check is removed again (a writable folder could hold a file that is not, or a name too
    long)."""
    try:
        if path.is_dir():
            fail(f"{option} {path} is a folder: name a file")
    except OSError as exc:  # a name too long
        fail(f"{option} {path}: cannot be written ({exc.strerror or exc})")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        fail(f"{option} {path}: cannot make its folder ({exc.strerror or exc})")
    try:
        existed = path.exists()
        with open(path, "ab"):
            pass
        if not existed:
            path.unlink()
    except OSError as exc:
        fail(f"{option} {path}: cannot be written ({exc.strerror or exc})")


def first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


def count(n: int, one: str, many: str | None = None) -> str:
    """``1 document``, ``2 documents``: how the commands count what they did."""
    return f"{n:,} {one if n == 1 else many or one + 's'}"


def require_cache(home: Path, index_url: str | None = None, blob_url: str | None = None) -> None:
    """Commands that read a cache fail in one line on a home holding none (a mistyped
    ``--home`` would otherwise get a new, empty cache made there), before loading a model.
    A cache named by URL (``--index-url`` / ``--blob-url``) is taken as given, except a SQLite
    file that is not there."""
    from ragkv.config import INDEX_FILE, RagkvConfig

    try:
        home = RagkvConfig(home=home).home  # a home that is a file says so first
    except ValueError as exc:
        fail(str(exc))
    named = _sqlite_file(index_url)
    if named is not None and not named.exists():  # a mistyped URL would make an empty index
        fail(f"no ragkv cache index at {named} (from --index-url): nothing was ingested there")
    if named is not None:
        _require_ragkv_tables(named)
    elif index_url is not None:
        _require_reachable(index_url)
    if index_url is not None or blob_url is not None:
        return
    index = home / INDEX_FILE
    if index.is_dir():
        fail(f"the cache index {index} is a folder, not a file: move it away")
    if not index.is_file():
        fail(f"no ragkv cache at {home}: nothing was ingested there "
             f"(`ragkv ingest PATH --home {home}` makes one)")
    require_writable(home)
    _require_ragkv_tables(index)


def _require_reachable(index_url: str) -> None:
    """An index server that does not answer is one line and exit 1 before the model loads
    (the engine, which goes on without an index where it can, logged a warning for each
    part that could not read it first: eight lines)."""
    from sqlalchemy.exc import SQLAlchemyError

    from ragkv.cache_index.database import make_engine

    with cache_errors():  # a bad URL or a missing driver: the command's own one line
        engine = make_engine(index_url)
    try:
        with engine.connect():
            pass
    except SQLAlchemyError as exc:
        fail(index_failure(exc), code=1)
    finally:
        engine.dispose()


def _require_ragkv_tables(path: Path) -> None:
    """A SQLite file holding another app's tables and none of ragkv's is refused: a command
    that reads the cache would add ragkv's schema to it. A file SQLite cannot read is left to
    the command, which says so."""
    import sqlite3
    from contextlib import closing

    try:
        with closing(sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True)) as db:
            tables = sorted(r[0] for r in db.execute(
                "SELECT name FROM sqlite_master WHERE type = 'table'"))
    except sqlite3.Error:
        return
    if tables and "kv_entries" not in tables:
        fail(f"{path} is not a ragkv cache index (it holds the tables "
             f"{', '.join(tables[:5])}{', ...' if len(tables) > 5 else ''}): left as it is")


def require_writable(home: Path) -> None:
    """A home on a read-only mount failed every command, ``ingest`` included, with SQLite's
    "unable to open database file" and exit 1."""
    if home.is_dir() and not os.access(home, os.W_OK):
        fail(f"the cache at {home} is read-only here: SQLite keeps the index's journal beside "
             f"it, so ragkv needs to write there (use a writable copy of the folder)")


def _sqlite_file(index_url: str | None) -> Path | None:
    """The file a SQLite ``index_url`` names; None for other URLs (and in-memory ones)."""
    if not index_url or not index_url.startswith("sqlite"):
        return None
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        database = make_url(index_url).database
    except ArgumentError:
        return None  # said by the command itself, as any bad URL is
    if not database or database == ":memory:" or database.startswith("file:"):
        return None
    return Path(database)


def mebibytes(mb: float | None, option: str) -> int | None:
    """A size option in MB as bytes (None stays None), or a one-line error for a negative,
    infinite or NaN one."""
    if mb is None:
        return None
    if not math.isfinite(mb * 2**20) or mb < 0:  # 1e308 MB is no bytes count either
        fail(f"{option} must be a number of MB >= 0, got {mb}")
    return int(mb * 2**20)


def open_store(home: Path, disk_budget_mb: float | None = None,
               remote_budget_mb: float | None = None, remote_url: str | None = None,
               index_url: str | None = None, blob_url: str | None = None):
    """The cache's ``KVStore`` for a command that loads no model (no memory tier)."""
    from ragkv.cache_index import KVStore
    from ragkv.config import RagkvConfig

    cfg = RagkvConfig(home=home, index_url=index_url, blob_url=blob_url,
                      remote_blob_url=remote_url, memory_budget_bytes=0,
                      disk_budget_bytes=mebibytes(disk_budget_mb, "--disk-budget-mb"),
                      remote_budget_bytes=mebibytes(remote_budget_mb, "--remote-budget-mb"))
    return KVStore.from_config(cfg)


def open_rag(ctx: typer.Context, home: Path, model: Path | None, context: str = "anchor",
             kv_dtype: str = "float16", engine: str = "hf", index_url: str | None = None,
             blob_url: str | None = None, anchor_source: str = "corpus",
             need_cache: bool = False, **blend):
    """The facade on the engine the user named, or a one-line error; closed when the
    command of ``ctx`` ends. ``need_cache``: the command reads an existing cache
    (:func:`require_cache`, checked before the model loads)."""
    from ragkv.api import RagKV
    from ragkv.config import BlendConfig, RagkvConfig
    from ragkv.engine.base import EngineError

    try:
        cfg = RagkvConfig(home=home, model=model, precompute_context=context,  # type: ignore[arg-type]
                          kv_dtype=kv_dtype, engine=engine,  # type: ignore[arg-type]
                          index_url=index_url, blob_url=blob_url, blend=BlendConfig(**blend),
                          anchor_source=anchor_source)  # type: ignore[arg-type]
    except ValueError as exc:
        fail(str(exc))
    if need_cache:
        require_cache(home, index_url, blob_url)
    elif index_url is None and blob_url is None:
        require_writable(cfg.home)
    try:
        with console.status("loading model and cache index"):
            rag = RagKV(cfg)
    except EngineError as exc:
        fail(str(exc), code=1)
    except (ValueError, FileNotFoundError, RuntimeError) as exc:  # bad model dir, no vLLM
        fail(str(exc))
    except OSError as exc:  # a home (or its blob folder) that cannot be made: under a file...
        fail(f"cannot use {exc.filename or home}: {exc.strerror or exc}")
    # closed when the command ends, however it ends: vLLM in process keeps its engine core in
    # a child process, and an interpreter exit with the facade open waited on it for good
    ctx.call_on_close(rag.close)
    return rag


def progress_bar(*extra: ProgressColumn) -> Progress:
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TimeElapsedColumn(), *extra, console=console, transient=False)


def answers_table(answers: Sequence) -> Group:
    """Figures of each answer (TTFT, hits, recompute, speed-up vs full), the answers side by
    side, and the sources they were given."""
    t = Table("mode", "chunks", "hits", "context tok", "recomputed tok", "TTFT s", "speed-up")
    full = next((a.trace.ttft_s for a in answers if a.trace.mode == "full"), None)
    for a in answers:
        tr = a.trace
        up = f"x{full / tr.ttft_s:.1f}" if full else "-"
        t.add_row(tr.mode, str(len(tr.chunks)), f"{tr.hits}/{len(tr.chunks)}",
                  str(tr.context_tokens), str(tr.recomputed_tokens), f"{tr.ttft_s:.2f}", up)
    titles = {"full": "full prefill"}
    side = Table(*[titles.get(a.trace.mode, f"ragkv {a.trace.mode}") for a in answers],
                 show_lines=True)
    # Text, not markup: a model writes brackets (``list[int]``) that rich would eat or choke on
    side.add_row(*[Text(a.text or "(empty answer)") for a in answers])
    src = Table("#", "source", "tokens", "cache", caption=answers[-1].trace.engine)
    for i, c in enumerate(answers[-1].trace.chunks, 1):
        cache = "hit" if c.hit else "miss" if c.hit is False else "-"
        doc = c.document or c.key[:12]
        src.add_row(str(i), Text(doc if len(doc) <= 40 else "..." + doc[-37:]), str(c.n_tokens),
                    f"{cache} ({c.tier})" if c.tier else cache)
    notes = [f"[yellow]{a.trace.mode}: {escape(str(a.trace.error))}[/yellow]" for a in answers
             if a.trace.error]
    left = answers[-1].trace.left_out
    if left:
        names = ", ".join(c.document or c.key[:12] for c in left)
        notes.append(f"[yellow]left out {len(left)} retrieved chunk(s) that did not fit the "
                     f"model's window: {escape(names)}[/yellow]")
    return Group(t, side, src, *notes)
