"""Shared-store URLs without servers: parsing, and a missing driver names the extra to install.
The same code against real PostgreSQL, Redis and S3 servers is in ``test_services.py``."""

from __future__ import annotations

import sys
import uuid

import pytest
import torch

from ragkv.cache_index import BlobStore, CacheIndex, KVStore
from ragkv.cache_index.redisfs import RedisFileSystem, _split_url


def test_redis_url_parts() -> None:
    client, prefix = _split_url("redis://user:p%40ss@cache.local:6380/3/ragkv/blobs")
    assert client == {
        "host": "cache.local",
        "port": 6380,
        "db": 3,
        "ssl": False,
        "username": "user",
        "password": "p@ss",
    }
    assert prefix == "/ragkv/blobs"
    client, prefix = _split_url("rediss://cache")
    assert client == {"host": "cache", "port": 6379, "db": 0, "ssl": True} and prefix == "/"


def test_redis_paths_are_keys_with_one_leading_slash() -> None:
    strip = RedisFileSystem._strip_protocol
    assert strip("redis://h:1/0") == "/"
    assert strip("redis://h:1/0/a/b/") == "/a/b"
    assert strip("/a/b/c.bin") == strip("a/b/c.bin") == "/a/b/c.bin"
    assert strip("/a/./b/../c") == "/a/c"


@pytest.mark.parametrize(
    ("module", "make", "extra"),
    [
        ("psycopg", lambda: CacheIndex("postgresql+psycopg://u@127.0.0.1:1/db"), "postgres"),
        ("redis", lambda: BlobStore(f"redis://127.0.0.1:1/0/{uuid.uuid4().hex}"), "redis"),
        ("s3fs", lambda: BlobStore(f"s3://bucket-{uuid.uuid4().hex}/p"), "s3"),
    ],
    ids=["postgres", "redis", "s3"],
)
def test_missing_driver_names_the_extra(
    monkeypatch: pytest.MonkeyPatch, module: str, make, extra: str
) -> None:
    monkeypatch.setitem(sys.modules, module, None)  # what an uninstalled package looks like
    with pytest.raises(ImportError, match=rf"pip install 'ragkv\[{extra}\]'"):
        make()


def test_redis_closed_port_is_a_miss_without_servers() -> None:
    pytest.importorskip("redis")
    index = CacheIndex("sqlite://")
    store = KVStore(index, BlobStore(f"redis://127.0.0.1:1/0/{uuid.uuid4().hex}"))
    kv = {"k": torch.zeros(1, 1, 2, 4), "v": torch.zeros(1, 1, 2, 4)}
    assert store.put("a" * 64, kv, model_fp="f" * 64, layout="L", n_tokens=2) is False
    assert store.get("a" * 64, model_fp="f" * 64, layout="L") is None
    index.close()
