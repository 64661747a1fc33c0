"""One cache shared by several nodes through real servers (``make test-services``): PostgreSQL
for the index, Redis or S3 for the blobs. Nodes are separate processes; outages are real (a
Redis server stopped mid-run, a database dropped, a closed port) and must only ever be misses."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from services_cases import (
    PG_URL,
    REDIS_URL,
    S3_ENDPOINT,
    blob_options,
    free_port,
    fresh_blobs,
    fresh_database,
    needs_pg,
    needs_redis,
    needs_s3,
)
from sqlalchemy import create_engine, func, select, text

from ragkv import RagKV, RagkvConfig
from ragkv.cache_index import BlobStore, CacheIndex, KVStore
from ragkv.cache_index.models import Document, KVEntry

pytestmark = [pytest.mark.services, needs_pg]

NODE = Path(__file__).with_name("services_node.py")
FP = "f" * 64


def _node(args: dict[str, Any], timeout: float = 300) -> subprocess.Popen[bytes]:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(
        [sys.executable, str(NODE), json.dumps(args)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
    )


def _result(proc: subprocess.Popen[bytes], timeout: float = 300) -> dict[str, Any]:
    out, err = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, err.decode()[-3000:]
    return json.loads(out.decode().strip().splitlines()[-1])


@pytest.fixture
def pg_url() -> Iterator[str]:
    assert PG_URL
    with fresh_database(PG_URL) as url:
        yield url


def _blob_base(kind: str) -> str:
    if kind == "redis":
        if not REDIS_URL:
            pytest.skip("no Redis (make test-services)")
        return REDIS_URL
    if not S3_ENDPOINT:
        pytest.skip("no S3 server (make test-services)")
    return "s3://ragkv-test/nodes"


def _kv() -> dict[str, torch.Tensor]:
    return {"k": torch.randn(2, 2, 4, 8), "v": torch.randn(2, 2, 4, 8)}


# -- two nodes ---------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["redis", "s3"])
def test_what_one_node_stores_the_other_hits(
    kind: str, pg_url: str, tiny_model: Path, tmp_path: Path
) -> None:
    with fresh_blobs(_blob_base(kind)) as blobs:
        common = {
            "index_url": pg_url,
            "blob_url": blobs.url,
            "blob_options": blob_options(blobs.url),
            "model": str(tiny_model),
        }
        a = _result(_node({**common, "role": "ingest", "home": str(tmp_path / "a")}))
        # Every chunk twice (after the template prefix; after it and the anchor: the default
        # anchor context), plus the two spans they were precomputed after.
        assert a["puts"] == 2 * a["n_chunks"] + 2 and a["n_chunks"] > 1
        assert len(blobs.names()) == a["puts"]
        b = _result(_node({**common, "role": "answer", "home": str(tmp_path / "b")}))
    # Node B computed nothing: every chunk came from the shared store ("disk" is the tier
    # blob_url serves), and its answer is token for token node A's.
    assert b["n_chunks"] == a["n_chunks"]
    assert (b["hits"], b["misses"]) == (b["n_chunks"], 0)
    assert b["tiers"] == ["disk"]
    assert b["tokens"] == a["tokens"]


def test_racing_writers_leave_one_row_per_key(pg_url: str, tmp_path: Path) -> None:
    n, procs = 40, 3
    with fresh_blobs(_blob_base("redis")) as blobs:
        CacheIndex(pg_url).close()  # migrate once; the race is about rows, not DDL
        go = tmp_path / "go"
        args = {
            "role": "race",
            "index_url": pg_url,
            "blob_url": blobs.url,
            "blob_options": {},
            "go": str(go),
            "n": n,
        }
        nodes = [_node(args) for _ in range(procs)]
        time.sleep(4.0)  # all imported and connected
        go.touch()
        results = [_result(p) for p in nodes]
        assert len(blobs.names()) == n
    for r in results:
        assert r["counters"]["put_errors"] == 0 and r["counters"]["puts"] == n
    # Every process got the same document ids: the losers of each insert race found the row.
    assert len({tuple(r["doc_ids"]) for r in results}) == 1
    assert len({tuple(r["chunk_ids"]) for r in results}) == 1
    engine = create_engine(pg_url)
    with engine.connect() as conn:
        assert conn.scalar(select(func.count()).select_from(KVEntry)) == n
        assert conn.scalar(select(func.count()).select_from(Document)) == 3
        assert conn.scalar(text("SELECT count(*) FROM chunks")) == 15
    engine.dispose()


# -- outages are misses ------------------------------------------------------------------------


def _start_redis(port: int, folder: Path) -> subprocess.Popen[bytes]:
    server = shutil.which("redis-server")
    if server is None:
        pytest.skip("redis-server not installed")
    proc = subprocess.Popen(
        [server, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--dir", str(folder)],
        stdout=subprocess.DEVNULL,
    )
    import redis

    client = redis.Redis(port=port, socket_connect_timeout=0.2)
    for _ in range(100):
        try:
            if client.ping():
                return proc
        except redis.ConnectionError:
            time.sleep(0.05)
    proc.kill()
    raise RuntimeError("redis-server did not start")


@needs_redis
def test_redis_stopped_mid_run_is_a_miss_then_recovers(pg_url: str, tmp_path: Path) -> None:
    port = free_port()
    server = _start_redis(port, tmp_path)
    try:
        store = KVStore(CacheIndex(pg_url), BlobStore(f"redis://127.0.0.1:{port}/0/ragkv"))
        kv = _kv()
        assert store.put("a" * 64, kv, model_fp=FP, layout="L", n_tokens=4)
        assert store.get("a" * 64, model_fp=FP, layout="L") is not None
        server.terminate()
        server.wait(10)
        t0 = time.perf_counter()
        assert store.get("a" * 64, model_fp=FP, layout="L") is None
        assert store.put("b" * 64, kv, model_fp=FP, layout="L", n_tokens=4) is False
        assert time.perf_counter() - t0 < 10  # fails fast instead of retrying for long
        # The entry is kept (the outage may be transient), and the store works again as soon
        # as Redis is back, without reopening anything. (No persistence: the blob is gone, so
        # that read is a miss that drops the entry.)
        assert store.index.get_entry("a" * 64) is not None
        server = _start_redis(port, tmp_path)
        assert store.put("b" * 64, kv, model_fp=FP, layout="L", n_tokens=4)
        got = store.get("b" * 64, model_fp=FP, layout="L")
        assert got is not None and torch.equal(got["k"], kv["k"])
        assert store.get("a" * 64, model_fp=FP, layout="L") is None
    finally:
        server.kill()
        server.wait(10)


@pytest.mark.parametrize(
    "url", ["redis://127.0.0.1:{port}/0", "s3://ragkv-nowhere/blobs"], ids=["redis", "s3"]
)
def test_closed_port_blob_store_is_a_miss(
    url: str, pg_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    port = free_port()  # nothing listens there
    options: dict[str, Any] = {}
    if url.startswith("s3"):
        options = {"endpoint_url": f"http://127.0.0.1:{port}", "key": "k", "secret": "s"}
    t0 = time.perf_counter()
    blobs = BlobStore(url.format(port=port), options)  # a store down at start is no error
    store = KVStore(CacheIndex(pg_url), blobs)
    assert store.put("c" * 64, _kv(), model_fp=FP, layout="L", n_tokens=4) is False
    assert store.get("c" * 64, model_fp=FP, layout="L") is None
    assert store.counters["put_errors"] == 1
    # Quick misses with the default client settings, not seconds of retries per call.
    assert time.perf_counter() - t0 < 15
    # ... and for the right reason: the connection, not some other error.
    assert any("connect" in r.getMessage().lower() for r in caplog.records)


def test_postgres_gone_mid_run_is_a_miss(tmp_path: Path) -> None:
    assert PG_URL
    blobs = BlobStore(str(tmp_path / "blobs"))
    with fresh_database(PG_URL) as url:
        store = KVStore(CacheIndex(url), blobs)
        assert store.put("d" * 64, _kv(), model_fp=FP, layout="L", n_tokens=4)
        admin = create_engine(PG_URL, isolation_level="AUTOCOMMIT")
        with admin.connect() as conn:
            name = url.rsplit("/", 1)[-1]
            conn.execute(text(f'DROP DATABASE "{name}" WITH (FORCE)'))
        admin.dispose()
        assert store.get("d" * 64, model_fp=FP, layout="L") is None
        assert store.contains(["d" * 64]) == {"d" * 64: False}
        assert store.put("e" * 64, _kv(), model_fp=FP, layout="L", n_tokens=4) is False


@pytest.mark.parametrize("down", ["blobs", "index", "both"])
def test_query_with_unreachable_shared_stores_is_answered_as_without_cache(
    down: str, tiny_model: Path, tmp_path: Path
) -> None:
    ids = [list(range(100, 140)), list(range(200, 230))]
    healthy = RagKV(RagkvConfig(home=tmp_path / "h", model=tiny_model, memory_budget_bytes=0))
    healthy.generate(ids, "q?", max_new_tokens=6)  # stores the chunks
    expected = healthy.generate(ids, "q?", max_new_tokens=6)
    assert expected.trace.hits == 2
    port = free_port()  # nothing listens there, from the start
    urls: dict[str, Any] = {}
    if down in ("blobs", "both"):
        urls["blob_url"] = f"redis://127.0.0.1:{port}/0"
    if down in ("index", "both"):
        urls["index_url"] = f"postgresql+psycopg://ragkv@127.0.0.1:{port}/ragkv"
    cfg = RagkvConfig(home=tmp_path / "u", model=tiny_model, memory_budget_bytes=0, **urls)
    t0 = time.perf_counter()
    unreachable = RagKV(cfg, engine=healthy.backend.engine)  # starts anyway
    got = unreachable.generate(ids, "q?", max_new_tokens=6)
    assert time.perf_counter() - t0 < 30
    assert got.trace.misses == 2
    assert got.tokens == expected.tokens


@needs_s3
def test_s3_endpoint_from_blob_options_only(pg_url: str) -> None:
    # What a deployment writes: the URL and RagkvConfig.blob_options, nothing else.
    with fresh_blobs("s3://ragkv-test/opts") as blobs:
        cfg_blobs = BlobStore(blobs.url, blob_options(blobs.url))
        store = KVStore(CacheIndex(pg_url), cfg_blobs)
        assert store.put("f" * 64, _kv(), model_fp=FP, layout="L", n_tokens=4)
        entry = store.index.get_entry("f" * 64)
        assert entry is not None and blobs.names() == [entry.blob_name]
        assert entry.blob_name.startswith(f"ff/{'f' * 64}.")


@needs_redis
def test_redis_filesystem_behaves_like_an_object_store() -> None:
    assert REDIS_URL
    with fresh_blobs(REDIS_URL) as blobs:
        fs, root = blobs.fs, blobs.root
        fs.pipe_file(f"{root}/a/one.bin", b"12345")
        with fs.open(f"{root}/a/b/two.bin", "wb") as f:
            f.write(b"xy")
        with pytest.raises(RuntimeError), fs.open(f"{root}/a/torn.bin", "wb") as f:
            f.write(b"half")
            raise RuntimeError("writer died")
        assert not fs.exists(f"{root}/a/torn.bin")  # nothing published by a failed write
        with fs.open(f"{root}/a/one.bin", "rb") as f:
            assert f.read() == b"12345"
        assert fs.cat_file(f"{root}/a/one.bin", start=1, end=3) == b"23"
        assert fs.ls(root, detail=False) == [f"{root}/a"]
        assert fs.ls(f"{root}/a", detail=False) == [f"{root}/a/b", f"{root}/a/one.bin"]
        assert fs.info(f"{root}/a")["type"] == "directory"
        assert fs.info(f"{root}/a/one.bin") == {
            "name": f"{root}/a/one.bin", "size": 5, "type": "file"
        }
        assert fs.find(root) == [f"{root}/a/b/two.bin", f"{root}/a/one.bin"]
        assert fs.find(root, maxdepth=2) == [f"{root}/a/one.bin"]
        assert f"{root}/a/b" in fs.find(root, withdirs=True)
        fs.mv(f"{root}/a/one.bin", f"{root}/c.bin")
        assert fs.cat_file(f"{root}/c.bin") == b"12345"
        with pytest.raises(FileNotFoundError):
            fs.info(f"{root}/a/one.bin")
        with pytest.raises(FileNotFoundError):
            fs.rm_file(f"{root}/a/one.bin")
        with pytest.raises(FileExistsError):
            fs.pipe_file(f"{root}/c.bin", b"z", mode="create")
        fs.rm(f"{root}/a", recursive=True)
        assert fs.find(root) == [f"{root}/c.bin"]


@needs_redis
def test_cache_stats_says_so_when_the_blob_store_cannot_be_listed(pg_url: str,
                                                                   tmp_path: Path) -> None:
    """fsspec's exists() answers False for a store it cannot reach: stats showed 0 blob bytes
    and exited 0, as if every blob were gone. It is one line and exit 1, as for any store
    that does not answer."""
    from typer.testing import CliRunner

    from ragkv.cli import app

    CacheIndex(pg_url).close()
    args = ["cache", "stats", "--home", str(tmp_path), "--index-url", pg_url, "--blob-url"]
    closed = f"redis://127.0.0.1:{free_port()}/0"
    result = CliRunner().invoke(app, [*args, closed])
    assert result.exit_code == 1, result.output
    assert "the cache's storage failed: ConnectionError" in result.output
    assert "blob_bytes" not in result.output
    with fresh_blobs(REDIS_URL) as blobs:  # reachable, nothing written yet: 0, exit 0
        result = CliRunner().invoke(app, [*args, blobs.url])
        assert result.exit_code == 0 and "blob_bytes" in result.output, result.output


@needs_s3
def test_a_missing_bucket_is_never_created(pg_url: str) -> None:
    """Opening the store made its bucket: a mistyped one appeared, even from `cache stats`."""
    import s3fs

    options = blob_options("s3://x")
    admin = s3fs.S3FileSystem(key=options["key"], secret=options["secret"],
                              client_kwargs={"endpoint_url": options["endpoint_url"]})
    typo = f"s3://ragkv-typo-{os.getpid()}/blobs"
    blobs = BlobStore(typo, options)
    assert blobs.total_bytes() == 0 and blobs.names() == []
    store = KVStore(CacheIndex(pg_url), blobs)
    assert store.put("b" * 64, _kv(), model_fp=FP, layout="L", n_tokens=4) is False
    assert store.get("b" * 64, model_fp=FP, layout="L") is None
    admin.invalidate_cache()
    assert not admin.exists(typo.removeprefix("s3://").split("/")[0])


@needs_s3
def test_ingest_tries_the_bucket_before_precomputing(
        pg_url: str, tiny_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A mistyped bucket is one line and exit 2 before the model loads (it was two warnings
    per chunk after the precompute, then exit 1); a good one is left holding only KV."""
    from typer.testing import CliRunner

    from ragkv.cli import app

    options = blob_options("s3://x")
    monkeypatch.setenv("AWS_ENDPOINT_URL", options["endpoint_url"])
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", options["key"])
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", options["secret"])
    doc = tmp_path / "a.md"
    doc.write_text("The assert statement checks a condition.\n" * 20)
    args = ["ingest", str(doc), "--model", str(tiny_model), "--index-url", pg_url, "--blob-url"]
    typo = f"s3://ragkv-typo-{os.getpid()}/blobs"
    result = CliRunner().invoke(app, [*args, typo])
    assert result.exit_code == 2, result.output
    assert result.output.startswith(f"error: cannot store KV under {typo}: "), result.output
    with fresh_blobs("s3://ragkv-test/probe") as blobs:
        result = CliRunner().invoke(app, [*args, blobs.url])
        assert result.exit_code == 0, result.output
        engine = create_engine(pg_url)
        with engine.connect() as conn:
            stored = set(conn.scalars(select(KVEntry.blob_name)))
        engine.dispose()
        assert stored and set(blobs.names()) == stored  # the write check left nothing
