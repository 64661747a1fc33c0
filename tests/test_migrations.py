"""Alembic migrations of the cache index: fresh, pre-migration and racing databases all end at
the schema ``models.py`` declares, with no row lost. SQLite here; PostgreSQL as well when
``make test-services`` provides one."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from services_cases import PG_URL, fresh_database
from sqlalchemy import create_engine, inspect, text

from ragkv.cache_index import SCHEMA_VERSION, CacheIndex
from ragkv.cache_index.migrate import (
    UnknownSchema,
    alembic_config,
    current_revision,
    head_revision,
)
from ragkv.cache_index.models import Base

BACKENDS = [
    "sqlite",
    pytest.param(
        "postgresql",
        marks=[
            pytest.mark.services,
            pytest.mark.skipif(not PG_URL, reason="no PostgreSQL (make test-services)"),
        ],
    ),
]


@pytest.fixture(params=BACKENDS)
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'index.sqlite'}"
    else:
        assert PG_URL
        with fresh_database(PG_URL) as url:
            yield url


def _diffs(url: str) -> list[object]:
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            ctx = MigrationContext.configure(conn, opts={"compare_type": True})
            return list(compare_metadata(ctx, Base.metadata))
    finally:
        engine.dispose()


def _revision(url: str) -> str | None:
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            return current_revision(conn)
    finally:
        engine.dispose()


def _run(url: str, fn: str, target: str) -> None:
    engine = create_engine(url)
    try:
        with engine.begin() as conn:
            getattr(command, fn)(alembic_config(connection=conn), target)
    finally:
        engine.dispose()


def test_fresh_database_is_migrated_to_models(db_url: str) -> None:
    CacheIndex(db_url).close()
    assert _revision(db_url) == head_revision()
    assert _diffs(db_url) == []
    index = CacheIndex(db_url)  # reopening at head changes nothing
    assert index.schema_version == SCHEMA_VERSION
    index.close()


def test_migrations_downgrade_to_nothing_and_back(db_url: str) -> None:
    CacheIndex(db_url).close()
    _run(db_url, "downgrade", "base")
    engine = create_engine(db_url)
    with engine.connect() as conn:
        assert set(inspect(conn).get_table_names()) <= {"alembic_version"}
    engine.dispose()
    _run(db_url, "upgrade", "head")
    assert _diffs(db_url) == []


def _seed_schema_1(url: str) -> None:
    """A database exactly as release 1 left it: schema-1 tables from ``create_all`` (which
    revision 0001 reproduces), a ``schema_version`` row and no ``alembic_version``."""
    _run(url, "upgrade", "0001")
    engine = create_engine(url)
    with engine.begin() as conn:
        conn.execute(text("DROP TABLE alembic_version"))
        conn.execute(
            text("INSERT INTO schema_version (id, version, created_at) VALUES (1, 1, :t)"),
            {"t": "2026-01-01 00:00:00"},
        )
        conn.execute(
            text(
                "INSERT INTO kv_entries (key, model_fp, layout, n_tokens, nbytes, blob_name,"
                " checksum, dtype, created_at, last_access_at, hits) VALUES ('k1', 'fp', 'L',"
                " 5, 100, 'k1/k1.safetensors', 'c', 'float16', :t, :t, 7)"
            ),
            {"t": "2026-01-01 00:00:00"},
        )
        conn.execute(
            text(
                "INSERT INTO documents (id, name, source, text_sha256, n_chunks, created_at)"
                " VALUES (1, 'a.md', '', 's', 0, :t)"
            ),
            {"t": "2026-01-01 00:00:00"},
        )
    engine.dispose()


def test_pre_migration_schema_1_database_is_upgraded_without_loss(db_url: str) -> None:
    _seed_schema_1(db_url)
    assert _revision(db_url) is None
    index = CacheIndex(db_url)
    try:
        assert _revision(db_url) == head_revision()
        assert _diffs(db_url) == []
        assert index.schema_version == SCHEMA_VERSION
        entry = index.get_entry("k1")
        assert entry is not None and entry.hits == 7 and entry.nbytes == 100
        # Columns added later are filled with their defaults, not left NULL; the priority as
        # PGDSF scores the entry (8 accesses of 5 tokens in 100 bytes), or every entry from
        # before the migration would be evicted before any stored after it
        assert entry.on_disk is True and entry.on_remote is False
        assert entry.priority == pytest.approx(8 * 5 / 100)
        assert [d.name for d in index.documents()] == ["a.md"]
    finally:
        index.close()


def test_pre_migration_schema_3_database_is_stamped_and_upgraded(tmp_path: Path) -> None:
    # What the release just before migrations made: schema-3 tables, no alembic_version.
    url = f"sqlite:///{tmp_path / 'v3.sqlite'}"
    _run(url, "upgrade", "0003")
    engine = create_engine(url)
    with engine.begin() as conn:
        conn.execute(text("DROP TABLE alembic_version"))
        conn.execute(
            text("INSERT INTO schema_version (id, version, created_at) VALUES (1, 3, :t)"),
            {"t": "2026-01-01 00:00:00"},
        )
        conn.execute(
            text(
                "INSERT INTO queries (created_at, question, mode, n_chunks, hits, misses,"
                " context_tokens, recomputed_tokens, ttft_s, answer)"
                " VALUES (:t, 'q', 'full', 0, 0, 0, 0, 0, 0.1, 'a')"
            ),
            {"t": "2026-01-01 00:00:00"},
        )
    engine.dispose()
    index = CacheIndex(url)
    assert [q["question"] for q in index.recent_queries()] == ["q"]
    assert index.schema_version == SCHEMA_VERSION
    index.close()
    assert _revision(url) == head_revision()
    assert _diffs(url) == []


def test_schema_4_digests_existing_chunks_and_the_entries_they_name(db_url: str) -> None:
    from ragkv.cache_index.models import ids_sha256

    _run(db_url, "upgrade", "0003")
    t = {"t": "2026-01-01 00:00:00"}
    engine = create_engine(db_url)
    with engine.begin() as conn:
        conn.execute(text("INSERT INTO documents (id, name, source, text_sha256, n_chunks,"
                          " created_at) VALUES (1, 'a.md', '', 's', 2, :t)"), t)
        for i, key in enumerate(("k1", "k2")):
            conn.execute(text(
                "INSERT INTO chunks (id, document_id, ordinal, text, token_ids, n_tokens,"
                " cache_key) VALUES (:i, 1, :i, 'x', :ids, 2, :key)"),
                {"i": i + 1, "ids": f"[{i}, 7]", "key": key})
        for key in ("k1", "k9"):  # k9: a twin no chunk names by its cache key
            conn.execute(text(
                "INSERT INTO kv_entries (key, model_fp, layout, n_tokens, nbytes, blob_name,"
                " checksum, dtype, created_at, last_access_at, hits, priority, on_disk,"
                f" on_remote) VALUES ('{key}', 'fp', 'L', 2, 10, 'b', 'c', 'float16', :t, :t,"
                " 0, 0, true, false)"), t)
    engine.dispose()
    index = CacheIndex(db_url)
    try:
        assert _revision(db_url) == head_revision() and _diffs(db_url) == []
        got = {c.id: c for c in index.chunks()}
        assert [c.token_ids for c in got.values()] == [[0, 7], [1, 7]]
        assert index.get_entry("k1").ids_sha256 == ids_sha256([0, 7])
        assert index.get_entry("k9").ids_sha256 is None
        removal = index.remove_documents("a.md")
        assert [e.key for e in removal.entries] == ["k1"]
    finally:
        index.close()


def test_a_newer_releases_database_is_refused_untouched_in_one_line(tmp_path: Path) -> None:
    """A shared index migrated by a newer ragkv: this release cannot know its schema."""
    from typer.testing import CliRunner

    from ragkv.cli import app

    url = f"sqlite:///{tmp_path / 'index.sqlite'}"
    CacheIndex(url).close()
    engine = create_engine(url)
    with engine.begin() as conn:
        conn.execute(text("UPDATE alembic_version SET version_num = '9999'"))
    engine.dispose()
    with pytest.raises(UnknownSchema, match="schema revision 9999.*a newer ragkv made it"):
        CacheIndex(url)
    assert _revision(url) == "9999"
    for args in (["cache", "stats"], ["cache", "verify"], ["documents"]):
        out = CliRunner().invoke(app, [*args, "--home", str(tmp_path)])
        assert out.exit_code == 2 and "a newer ragkv made it" in out.output, (args, out.output)
        assert out.output.count("error:") == 1 and "Traceback" not in out.output


@pytest.mark.parametrize("lost", [0, 4])
def test_an_index_without_alembic_version_has_the_revision_of_its_schema_version(
        tmp_path: Path, lost: int) -> None:
    """Without ``alembic_version`` (a partial dump), every index from schema 3 up was taken
    as revision 0003: a current one failed ("duplicate column"), a newer one was migrated."""
    url = f"sqlite:///{tmp_path / 'index.sqlite'}"
    index = CacheIndex(url)
    index.add_document("a.md", "a.md", "s1")
    index.close()
    engine = create_engine(url)
    with engine.begin() as conn:
        conn.execute(text("DROP TABLE alembic_version"))
        conn.execute(text("UPDATE schema_version SET version = :v"),
                      {"v": SCHEMA_VERSION + lost})
    engine.dispose()
    if lost:
        with pytest.raises(UnknownSchema, match=f"version {SCHEMA_VERSION + lost}"):
            CacheIndex(url)
        assert _revision(url) is None  # refused untouched
        return
    index = CacheIndex(url)
    assert [d.name for d in index.documents()] == ["a.md"]
    index.close()
    assert _revision(url) == f"{SCHEMA_VERSION:04d}"


def test_racing_openers_of_a_fresh_file_all_succeed(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'race.sqlite'}"
    errors: list[BaseException] = []
    start = threading.Barrier(4)

    def open_one() -> None:
        try:
            start.wait()
            CacheIndex(url).close()
        except BaseException as exc:  # collected and asserted on below
            errors.append(exc)

    threads = [threading.Thread(target=open_one) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert _revision(url) == head_revision()
    assert _diffs(url) == []


_OPEN_WHEN_TOLD = """
import sys, time
from pathlib import Path
from ragkv.cache_index import CacheIndex
go = Path(sys.argv[2])
while not go.exists():
    time.sleep(0.005)
CacheIndex(sys.argv[1]).close()
"""


def test_racing_processes_on_a_fresh_file_all_succeed(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'race.sqlite'}"
    go = tmp_path / "go"
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _OPEN_WHEN_TOLD, url, str(go)], stderr=subprocess.PIPE
        )
        for _ in range(3)
    ]
    time.sleep(3.0)  # let all of them finish importing before the start signal
    go.touch()
    for p in procs:
        _, err = p.communicate(timeout=120)
        assert p.returncode == 0, err.decode()
    assert _revision(url) == head_revision()
    assert _diffs(url) == []
