"""``ragkv cache stats | verify | gc``: inspect, check and collect the KV cache, local or
shared (``--index-url`` / ``--blob-url``)."""

from __future__ import annotations

import math
from typing import Annotated

import typer
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from ragkv.cli_shared import (
    BlobUrl,
    Home,
    IndexUrl,
    cache_errors,
    console,
    count,
    fail,
    open_store,
    progress_bar,
    require_cache,
)
from ragkv.config import RagkvConfig, default_home

cache_app = typer.Typer(no_args_is_help=True, help="Inspect the KV cache.")


@cache_app.command("stats")
def cache_stats(home: Home = default_home(), index_url: IndexUrl = None,
                blob_url: BlobUrl = None) -> None:
    """Documents, chunks, KV entries and bytes in the cache index."""
    from ragkv.anchor import ANCHOR_SETTING
    from ragkv.cache_index import BlobStore, CacheIndex

    require_cache(home, index_url, blob_url)
    with cache_errors():
        cfg = RagkvConfig(home=home, index_url=index_url, blob_url=blob_url)
        index = CacheIndex(cfg.resolved_index_url)
        s = index.stats()
        # a store that cannot be listed is an error here (one line), not 0 bytes
        s["blob_bytes"] = BlobStore(cfg.resolved_blob_url, cfg.blob_options).total_bytes()
        anchor = index.setting(ANCHOR_SETTING)
    s["anchor_passage"] = ("neutral (none recorded)" if anchor is None
                           else f"corpus, {len(anchor):,} chars: {anchor[:60]!r}...")
    t = Table("what", "value")
    for key, value in s.items():
        if key.endswith("_bytes") and isinstance(value, int):  # exact, then for a reader
            value = f"{value:,} ({value / 2**20:,.1f} MiB)"
        t.add_row(key, Text(str(value)))
    console.print(t)


Remote = Annotated[str | None, typer.Option(help="fsspec URL of the remote blob tier, if any")]


@cache_app.command("verify")
def cache_verify(home: Home = default_home(), remote: Remote = None,
                 index_url: IndexUrl = None, blob_url: BlobUrl = None,
                 repair: Annotated[bool, typer.Option(help="delete what fails")] = True,
                 grace_s: Annotated[float, typer.Option(
                     help="leave orphan blobs younger than this (puts in flight)")] = 300.0,
                 ) -> None:
    """Read every stored blob: checksum, framing, metadata; remove bad entries and orphans."""
    from ragkv.cache_index import verify

    if not math.isfinite(grace_s) or grace_s < 0:  # NaN would leave no put in flight alone
        fail(f"--grace-s must be a number of seconds >= 0, got {grace_s}")
    require_cache(home, index_url, blob_url)
    with cache_errors():  # an index that cannot be opened: its one line, without a bar
        store = open_store(home, remote_url=remote, index_url=index_url, blob_url=blob_url)
    with cache_errors(), progress_bar() as bar:
        task = bar.add_task("reading blobs", total=None)

        def progress(done: int, total: int) -> None:
            bar.update(task, completed=done, total=total)

        report = verify(store, repair=repair, orphan_grace_s=grace_s, progress=progress)
    for key, tier, reason in report.bad[:50]:
        console.print(f"[red]bad[/red] {tier} {key[:16]}: {escape(reason)}", soft_wrap=True)
    for tier, name in report.orphans[:50]:
        console.print(f"[yellow]orphan[/yellow] {tier} {escape(name)}", soft_wrap=True)
    for key, tier, error in report.unreadable[:50]:
        console.print(f"[yellow]unreadable now[/yellow] {tier} {key[:16]}: {escape(error)}",
                      soft_wrap=True)
    verb = "removed" if repair else "found"
    unreadable = (f"; {count(len(report.unreadable), 'blob')} could not be read now (left "
                  f"as they are)") if report.unreadable else ""
    console.print(f"{count(report.entries, 'entry', 'entries')}, "
                  f"{count(report.blobs_checked, 'blob')} read; {verb} {len(report.bad)} bad, "
                  f"{count(len(report.orphans), 'orphan blob')}{unreadable}")
    if report.unreadable or ((report.bad or report.orphans) and not repair):
        raise typer.Exit(1)


@cache_app.command("gc")
def cache_gc(home: Home = default_home(), remote: Remote = None,
             index_url: IndexUrl = None, blob_url: BlobUrl = None,
             disk_budget_mb: Annotated[float | None, typer.Option(
                 help="local disk budget", min=0)] = None,
             remote_budget_mb: Annotated[float | None, typer.Option(
                 help="remote budget", min=0)] = None,
             ) -> None:
    """Evict lowest-priority entries until each tier fits its budget."""
    if disk_budget_mb is None and remote_budget_mb is None:
        fail("give --disk-budget-mb and/or --remote-budget-mb")
    if remote_budget_mb is not None and remote is None:  # there would be no tier to apply it to
        fail("--remote-budget-mb needs --remote (the remote tier's URL)")
    require_cache(home, index_url, blob_url)
    with cache_errors():
        store = open_store(home, disk_budget_mb, remote_budget_mb, remote, index_url, blob_url)
        reports = store.apply_budgets(strict=True)
    t = Table("tier", "budget MiB", "before MiB", "after MiB", "evicted")
    for r in reports:
        t.add_row(r.tier, f"{(r.budget or 0) / 2**20:.1f}", f"{r.bytes_before / 2**20:.1f}",
                  f"{r.bytes_after / 2**20:.1f}", str(r.evicted))
    console.print(t)
