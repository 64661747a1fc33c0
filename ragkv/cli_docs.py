"""``ragkv ingest``, ``ragkv documents`` and ``ragkv remove``: documents into the index (named
by their resolved paths, an edited file replacing its earlier version), what it holds, and
taking them out of retrieval (the last two read the index alone and load no model)."""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path, PurePath
from typing import Annotated

import typer
from rich.markup import escape
from rich.progress import TextColumn
from rich.table import Table
from rich.text import Text

from ragkv.cli_shared import (
    AnchorSource,
    BlobUrl,
    Context,
    Engine,
    Home,
    IndexUrl,
    Model,
    cache_errors,
    console,
    count,
    fail,
    first_line,
    given_path,
    mebibytes,
    open_rag,
    open_store,
    print_error,
    progress_bar,
    require_cache,
    run_engine,
)
from ragkv.config import RagkvConfig, default_home


def _index(home, index_url, blob_url):
    from ragkv.cache_index import CacheIndex

    cfg = RagkvConfig(home=home, index_url=index_url, blob_url=blob_url)
    return CacheIndex(cfg.resolved_index_url)


def resolve_paths(paths: Iterable[Path]) -> dict[Path, Path]:
    """Each path as typed → resolved (symlinks followed, as the UI names files), so a file is
    one document whatever the working directory, the same one the UI ingests, and two
    projects' ``README.md`` on one cache stay two documents."""
    out: dict[Path, Path] = {}
    for typed in paths:
        path = typed.expanduser()
        try:
            missing = not path.exists() and not path.is_symlink()  # (a link loop: neither)
        except OSError:  # a folder on its way cannot be searched: skipped as unreadable
            missing = False
        if missing:
            fail(f"no such file or folder: {typed}")
        try:
            out[typed] = path.resolve()
        except (OSError, RuntimeError) as exc:  # a symlink loop
            fail(f"cannot resolve {typed}: {exc}")
    return out


def typed_names(resolved: dict[Path, Path], names: Iterable[str]) -> dict[str, str]:
    """For each document name (a resolved path), the name an ingestion before names were
    resolved gave the same file from this working directory, where it differs: an earlier
    version to replace."""
    out: dict[str, str] = {}
    for name in names:
        path = Path(name)
        for typed, real in resolved.items():
            if path == real:
                old = typed
            elif path.is_relative_to(real):
                old = typed / path.relative_to(real)
            else:
                continue
            if str(old) != name:
                out[name] = str(old)
            break
    return out


def _under(name: str, folder: Path) -> bool:
    path = PurePath(name)
    return path.is_relative_to(folder) and ".." not in path.relative_to(folder).parts


def prune_docs(rag, folders: Iterable[Path], ingested: set[str]) -> list[str]:
    """Remove the documents named under ``folders`` (as ``ingest`` names the files it finds
    there) that are not in ``ingested``: files deleted, or unreadable now. A file the walk
    does not take (a hidden one, ingested by its name) stays while it is there. Returns their
    names."""
    from ragkv.documents import walk_finds

    folders = [f for f in folders if f.is_dir()]
    gone = sorted({d.name for d in rag.index.documents()
                   if d.name not in ingested and any(_under(d.name, f) for f in folders)
                   and (any(walk_finds(f, Path(d.name)) for f in folders)
                        or not os.path.lexists(d.name))})
    for name in gone:
        rag.remove_document(name)
    return gone


def documents(home: Home = default_home(), index_url: IndexUrl = None,
              blob_url: BlobUrl = None) -> None:
    """List the ingested documents: name, chunks, stored KV."""
    require_cache(home, index_url, blob_url)
    with cache_errors():
        index = _index(home, index_url, blob_url)
        sizes = {d["document_id"]: d for d in index.document_sizes()}
        docs = index.documents()
    t = Table("chunks", "KV MiB", "ingested (UTC)")  # the index keeps UTC
    t.add_column("document", overflow="fold")  # a long path wraps, never cut with an ellipsis
    for d in docs:
        size = sizes.get(d.id)
        t.add_row(str(d.n_chunks), f"{(size['kv_bytes'] if size else 0) / 2**20:.1f}",
                  d.created_at.strftime("%Y-%m-%d %H:%M"), Text(d.name))
    console.print(t)
    console.print(count(len(docs), "document"))


def _known_as(name: str, known: set[str]) -> str | None:
    """``name`` itself, or the path ``ingest`` named the file typed as ``name`` by: its folder
    resolved (a link found inside an ingested folder keeps its own name), else the file's
    resolved path (a file or link named itself)."""
    if name in known:
        return name
    path = Path(name).expanduser()
    try:
        candidates = (path.parent.resolve() / path.name, path.resolve())
    except (OSError, RuntimeError, ValueError):
        return None
    return next((str(c) for c in candidates if str(c) in known), None)


def _legacy_digester(home: Path, model: Path | None, index_url: str | None,
                     blob_url: str | None):
    """The facade whose keys name the KV a cache made before schema 4 stored without its
    ids' digest (the model loads only for such a cache), or None where it cannot load: that
    KV then stays, as it did, and the budgets' eviction reclaims it."""
    from ragkv.api import RagKV
    from ragkv.config import RagkvConfig

    try:
        return RagKV(RagkvConfig(home=home, model=model, index_url=index_url,
                                 blob_url=blob_url))
    except Exception as exc:  # noqa: BLE001 - the removal goes on without it
        console.print(Text(f"warning: the KV this cache stored before schema 4 stays (the "
                           f"model could not load to name it: {first_line(exc)})"),
                      soft_wrap=True)
        return None


def remove(names: Annotated[list[str], typer.Argument(
               help="document names as `ragkv documents` lists them, or the files' paths")],
           home: Home = default_home(), index_url: IndexUrl = None,
           blob_url: BlobUrl = None, model: Model = None) -> None:
    """Remove documents from the index and from retrieval, with their chunks' KV (``--model``:
    the model a cache made before schema 4 was built with, which names its older KV).

    All or nothing: an unknown name removes none. KV that a chunk of another document shares
    stays."""
    require_cache(home, index_url, blob_url)
    with cache_errors():
        store = open_store(home, index_url=index_url, blob_url=blob_url)
        index = store.index
        known = {d.name for d in index.documents()}
        found = {n: _known_as(n, known) for n in dict.fromkeys(names)}
        unknown = [n for n, k in found.items() if k is None]
        if unknown:
            fail(f"no document named {', '.join(map(repr, unknown))}; `ragkv documents` "
                 "lists them (nothing was removed)")
        kept = 0  # bytes whose rows went but whose blobs could not be deleted
        legacy = (_legacy_digester(home, model, index_url, blob_url)
                  if index.undigested_entries() else None)
        for name in dict.fromkeys(found.values()):
            if legacy is not None:
                legacy._digest_legacy_entries(name, None)
            removal = store.remove_documents(name)
            stuck = sum(e.nbytes for e in removal.undeleted)
            freed = sum(e.nbytes for e in removal.entries) - stuck
            kept += stuck
            console.print(Text(f"removed {name} (KV freed: {freed / 2**20:.1f} MiB"
                               + (f"; not deleted: {stuck / 2**20:.1f} MiB" if stuck else "")
                               + ")"), soft_wrap=True)
        left = len(index.documents())
    if legacy is not None:
        legacy.close()
    console.print(f"{count(left, 'document')} left")
    if kept:  # the documents are gone; their KV's bytes stay until the blob store takes deletes
        print_error(f"{kept / 2**20:.1f} MiB of KV could not be deleted (the warnings above "
                    "say why); `ragkv cache verify` removes it once the blob store allows")
        raise typer.Exit(1)


def ingest(ctx: typer.Context, paths: Annotated[list[Path], typer.Argument(parser=given_path)],
           home: Home = default_home(), model: Model = None,
           context: Context = "anchor", anchor_source: AnchorSource = "corpus",
           engine: Engine = "hf", index_url: IndexUrl = None, blob_url: BlobUrl = None,
           strict: Annotated[bool, typer.Option(help="stop at the first unreadable file")] = False,
           max_mb: Annotated[float, typer.Option(help="skip files larger than this")] = 20.0,
           prune: Annotated[bool, typer.Option(
               help="remove the documents under the given folders that this run did not "
                    "ingest (files deleted or unreadable since)")] = False,
           ) -> None:
    """Ingest files or folders (.txt .md .rst .html .pdf): chunk, embed, precompute, store KV.
    Files that cannot be read are skipped with the reason; the good ones go in."""
    from ragkv.documents import (
        SUPPORTED_SUFFIXES,
        DocumentError,
        load_documents,
        prefer_unchanged,
    )
    from ragkv.ingest import drop_duplicates, stored_texts

    resolved = resolve_paths(paths)  # documents are named by their resolved paths
    try:
        report = load_documents(list(resolved.values()),
                                max_bytes=mebibytes(max_mb, "--max-mb") or 0, strict=strict)
    except (FileNotFoundError, DocumentError) as exc:
        fail(str(exc))
    report = _long_names_skipped(report)
    if not report.documents and not prune:
        for s in report.skipped:
            print_skipped(s)
        fail(f"no readable {'/'.join(SUPPORTED_SUFFIXES)} files found")
    if not engine.startswith(("http://", "https://")):  # a server stores through its own
        require_blob_writes(blob_url)
    rag = open_rag(ctx, home, model, context, engine=engine, index_url=index_url, blob_url=blob_url,
                   anchor_source=anchor_source)
    with cache_errors():  # of files with one text, the one the index holds it under stays
        report = prefer_unchanged(report, stored_texts(rag))
    for s in report.skipped:
        print_skipped(s)

    def tidy() -> None:  # after the new versions are in, before the totals are printed
        with cache_errors():
            for name, first in drop_duplicates(rag, report.skipped):
                console.print(Text(f"removed the earlier version of {name}: it now holds the "
                                   f"same text as {first}"), soft_wrap=True)
        if prune:
            folders = [p for p in resolved.values() if p.is_dir()]
            with cache_errors():
                found = ({d.name for d in report.documents}  # and duplicates: still there
                         | {s.path for s in report.skipped if s.duplicate_of is not None})
                gone = prune_docs(rag, folders, found)
            for name in gone:
                console.print(Text(f"pruned {name}"), soft_wrap=True)
            console.print(Text(f"pruned {count(len(gone), 'document')} this run did not ingest "
                               f"under " + ", ".join(map(str, folders))), soft_wrap=True)

    if report.documents:
        earlier = typed_names(resolved, [d.name for d in report.documents])
        totals = run_engine(lambda: ingest_docs(rag, [(d.name, d.text) for d in report.documents],
                                                 len(report.skipped), earlier, then=tidy))
        if totals.unstored:
            raise typer.Exit(1)
    else:
        tidy()


def require_blob_writes(blob_url: str | None) -> None:
    """Ingestion stores every chunk's KV: an object store it cannot write (no credentials, no
    bucket) is said in one line before the model loads, not in two warnings per chunk after
    the precompute. One empty blob is written and deleted; local folders say it themselves."""
    if blob_url is None or "://" not in blob_url or blob_url.startswith("file://"):
        return
    import uuid

    from ragkv.cache_index.blobs import BlobStore

    with cache_errors():
        store = BlobStore(blob_url)
        probe = f"ragkv-write-check-{uuid.uuid4().hex}"
        try:
            store.put(probe, b"")
        except OSError as exc:  # no such bucket, no right to write: the URL is the user's
            fail(f"cannot store KV under {blob_url}: {exc.strerror or exc}")
        store.delete(probe)


def _long_names_skipped(report):
    """Files whose path is longer than a document name the index keeps, skipped with why."""
    from ragkv.cache_index.models import NAME_CHARS
    from ragkv.documents import LoadReport, Skipped

    long = [d for d in report.documents if len(d.name) > NAME_CHARS]
    return LoadReport([d for d in report.documents if len(d.name) <= NAME_CHARS],
                      report.skipped + [Skipped(d.name, f"its path is {len(d.name):,} characters; "
                                                f"the cache index keeps names of at most "
                                                f"{NAME_CHARS}") for d in long])


def print_skipped(s) -> None:
    console.print(f"[yellow]skipped[/yellow] {escape(str(s.path))}: {escape(s.reason)}",
                  soft_wrap=True)


def ingest_docs(rag, docs: list[tuple[str, str]], skipped: int = 0,
                 earlier: dict[str, str] | None = None,
                 then: Callable[[], None] | None = None) -> IngestTotals:
    """Ingest ``(name, text)`` pairs with a progress bar; ``earlier`` maps a name to the one
    the same file had before (an earlier version, removed once the new one is in); ``then``
    runs before the totals are printed (what the command removes after ingesting, so that
    they count it)."""
    computed = tokens = replaced = superseded = unstored = 0
    busy = 0.0  # seconds spent ingesting documents whose chunks needed computing
    from ragkv.ingest import progress_text, require_own_tokenizer

    require_own_tokenizer(rag)  # before a passage is picked for a corpus it cannot add to
    rag.choose_anchor([text for _, text in docs])  # from all of them, not the first alone
    with progress_bar(TextColumn("{task.fields[rate]}")) as bar:
        task = bar.add_task("ingesting", total=len(docs), rate="")
        for name, text in docs:
            bar.update(task, description=f"ingesting {name[-40:]}")
            t0 = time.perf_counter()

            def chunks_done(stage: str, done: int, total: int, name: str = name) -> None:
                # a long document is most of a run: its stages show it moving
                bar.update(task, description=f"{name[-40:]}: {progress_text(stage, done, total)}")

            res = rag.ingest_text(name, text, progress=chunks_done)
            if res.precomputed_tokens:
                busy += time.perf_counter() - t0
            computed += res.precomputed
            replaced += res.replaced
            superseded += res.superseded
            unstored += res.unstored
            if earlier and name in earlier:
                replaced += rag._remove_documents(earlier[name]).documents
            tokens += res.precomputed_tokens
            bar.update(task, advance=1, rate=_rate(tokens, busy))
    if then is not None:
        then()
    s = rag.index.stats()
    console.print(f"{count(s['documents'], 'document')}, {count(s['chunks'], 'chunk')}, "
                  f"{count(s['kv_entries'], 'KV entry', 'KV entries')} "
                  f"({s['kv_bytes'] / 2**20:.0f} MiB); computed now: {computed}"
                  + (f" ({tokens:,} tokens, {_rate(tokens, busy)})" if tokens else "")
                  + (f"; earlier versions replaced: {replaced}" if replaced else "")
                  + (f"; replaced meanwhile by a later version from another process: "
                     f"{superseded}" if superseded else "")
                  + (f"; files skipped: {skipped}" if skipped else ""))
    if unstored:  # the blob store refused them: full, or not writable (the warnings say)
        print_error(f"the KV of {count(unstored, 'chunk')} could not be stored (the warnings "
                    f"above say why); their queries compute it, and ingesting again stores it")
    return IngestTotals(computed, unstored)


@dataclass(frozen=True)
class IngestTotals:
    computed: int  # chunks whose KV was computed and stored
    unstored: int  # chunks whose KV was computed but could not be stored


def _rate(tokens: int, seconds: float) -> str:
    """Precompute throughput as shown: chunking and embedding time included."""
    return f"{tokens / seconds:,.0f} tokens/s" if tokens and seconds > 0 else ""
