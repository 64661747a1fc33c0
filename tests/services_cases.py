"""Where the shared-cache tests find their servers: test-only configuration from the environment.

``scripts/services.sh`` (``make test-services``) starts PostgreSQL, Redis and an S3-compatible
server and sets these; without them the cache suites run on SQLite files and local folders.

* ``RAGKV_TEST_INDEX_URL`` / ``RAGKV_TEST_BLOB_URL``: run the cache suites on these backends
  (each test gets a fresh database / a fresh key prefix under them);
* ``RAGKV_TEST_PG_URL``, ``RAGKV_TEST_REDIS_URL``, ``RAGKV_TEST_S3_ENDPOINT``: the servers
  themselves, for the tests marked ``services``.
"""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

from ragkv.cache_index import BlobStore

INDEX_URL = os.environ.get("RAGKV_TEST_INDEX_URL")
BLOB_URL = os.environ.get("RAGKV_TEST_BLOB_URL")
PG_URL = os.environ.get("RAGKV_TEST_PG_URL")
REDIS_URL = os.environ.get("RAGKV_TEST_REDIS_URL")
S3_ENDPOINT = os.environ.get("RAGKV_TEST_S3_ENDPOINT")

needs_pg = pytest.mark.skipif(not PG_URL, reason="no PostgreSQL (make test-services)")
needs_redis = pytest.mark.skipif(not REDIS_URL, reason="no Redis (make test-services)")
needs_s3 = pytest.mark.skipif(not S3_ENDPOINT, reason="no S3 server (make test-services)")


def blob_options(url: str) -> dict[str, Any]:
    """Storage options for a test blob URL: the local S3 server takes any credentials."""
    if url.startswith("s3://") and S3_ENDPOINT:
        return {"endpoint_url": S3_ENDPOINT, "key": "testing", "secret": "testing"}
    return {}


@contextlib.contextmanager
def fresh_database(base_url: str) -> Iterator[str]:
    """A new, empty PostgreSQL database beside ``base_url``'s; dropped afterwards."""
    url = make_url(base_url)
    name = f"ragkv_t_{uuid.uuid4().hex[:16]}"
    admin = create_engine(url, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{name}"'))
        yield url.set(database=name).render_as_string(hide_password=False)
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


@contextlib.contextmanager
def fresh_blobs(base_url: str) -> Iterator[BlobStore]:
    """A BlobStore under a new prefix of ``base_url``; its blobs are removed afterwards."""
    url = f"{base_url.rstrip('/')}/t-{uuid.uuid4().hex[:12]}"
    store = BlobStore(url, blob_options(url))
    try:
        yield store
    finally:
        with contextlib.suppress(FileNotFoundError):
            store.fs.rm(store.root, recursive=True)


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
