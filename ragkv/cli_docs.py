"""``ragkv documents`` and ``ragkv remove``: what the index holds, and taking documents out of
retrieval. Both read the index alone, so neither loads a model."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path, PurePath
from typing import Annotated

import typer
from rich.table import Table
from rich.text import Text

from ragkv.cli_shared import BlobUrl, Home, IndexUrl, cache_errors, console, fail
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
        if not path.exists():
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


def prune(index, folders: Iterable[Path], ingested: set[str]) -> list[str]:
    """Remove the documents named under ``folders`` (as ``ingest`` names the files it finds
    there) that are not in ``ingested``: files deleted, or unreadable now. Returns their
    names."""
    folders = [f for f in folders if f.is_dir()]
    gone = sorted({d.name for d in index.documents()
                   if d.name not in ingested and any(_under(d.name, f) for f in folders)})
    for name in gone:
        index.remove_documents(name)
    return gone


def documents(home: Home = default_home(), index_url: IndexUrl = None,
              blob_url: BlobUrl = None) -> None:
    """List the ingested documents: name, chunks, stored KV."""
    with cache_errors():
        index = _index(home, index_url, blob_url)
        sizes = {d["document_id"]: d for d in index.document_sizes()}
        docs = index.documents()
    t = Table("chunks", "KV MiB", "ingested")
    t.add_column("document", overflow="fold")  # a long path wraps, never cut with an ellipsis
    for d in docs:
        size = sizes.get(d.id)
        t.add_row(str(d.n_chunks), f"{(size['kv_bytes'] if size else 0) / 2**20:.1f}",
                  d.created_at.strftime("%Y-%m-%d %H:%M"), Text(d.name))
    console.print(t)
    console.print(f"{len(docs)} documents")


def _known_as(name: str, known: set[str]) -> str | None:
    """``name`` itself, or the resolved path of a file path typed as ``ingest`` got it."""
    if name in known:
        return name
    try:
        real = str(Path(name).expanduser().resolve())
    except (OSError, RuntimeError, ValueError):
        return None
    return real if real in known else None


def remove(names: Annotated[list[str], typer.Argument(
               help="document names as `ragkv documents` lists them, or the files' paths")],
           home: Home = default_home(), index_url: IndexUrl = None,
           blob_url: BlobUrl = None) -> None:
    """Remove documents from the index and from retrieval.

    All or nothing: an unknown name removes none. Their KV stays in the cache until its
    budgets evict it."""
    with cache_errors():
        index = _index(home, index_url, blob_url)
        known = {d.name for d in index.documents()}
        found = {n: _known_as(n, known) for n in dict.fromkeys(names)}
        unknown = [n for n, k in found.items() if k is None]
        if unknown:
            fail(f"no document named {', '.join(map(repr, unknown))}; `ragkv documents` "
                 "lists them (nothing was removed)")
        for name in dict.fromkeys(found.values()):
            index.remove_documents(name)
            console.print(Text(f"removed {name}"), soft_wrap=True)
        left = len(index.documents())
    console.print(f"{left} documents left")
