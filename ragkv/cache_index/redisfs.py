"""A small fsspec filesystem over Redis, so ``redis://host:port/db[/prefix]`` is one more blob URL.

fsspec ships no Redis backend. Blobs are whole values: one ``SET`` writes a blob atomically (a
reader sees the old value or the new one, never half), so BlobStore needs no temp-and-rename
here. Folders do not exist in Redis; like an object store, a folder is any key prefix ending in
``/``. Paths are the Redis key names, always starting with ``/`` so they cannot collide with
keys other programs keep in the same database.

The client fails fast by default (short timeouts, one quick retry): the cache treats an
unreachable store as a miss, and a miss must not cost seconds of retries per chunk.
"""

from __future__ import annotations

import io
import posixpath
import re
from typing import Any
from urllib.parse import unquote, urlsplit

from fsspec.spec import AbstractFileSystem

_GLOB_SPECIAL = re.compile(r"([*?\[\]\\])")
_SCAN_COUNT = 1000


def _glob_escape(text: str) -> str:
    return _GLOB_SPECIAL.sub(r"\\\1", text)


def _split_url(url: str) -> tuple[dict[str, Any], str]:
    """Client arguments and the key prefix of ``redis[s]://[user:pass@]host[:port][/db][/path]``."""
    parts = urlsplit(url)
    segments = [s for s in parts.path.split("/") if s]
    db = 0
    if segments and segments[0].isdigit():
        db = int(segments.pop(0))
    client: dict[str, Any] = {
        "host": parts.hostname or "localhost",
        "port": parts.port or 6379,
        "db": db,
        "ssl": parts.scheme == "rediss",
    }
    if parts.username:
        client["username"] = unquote(parts.username)
    if parts.password:
        client["password"] = unquote(parts.password)
    return client, "/" + "/".join(segments)


class _Writer(io.BytesIO):
    """A write handle that stores its whole content with one SET on a clean close."""

    def __init__(self, fs: RedisFileSystem, path: str) -> None:
        super().__init__()
        self._fs = fs
        self._path = path
        self._failed = False

    def __exit__(self, exc_type: Any, *rest: Any) -> None:
        # An exception mid-write must not publish a partial blob.
        self._failed = exc_type is not None
        self.close()

    def close(self) -> None:
        if not self.closed and not self._failed:
            self._fs.pipe_file(self._path, self.getvalue())
        super().close()


class RedisFileSystem(AbstractFileSystem):
    """Blobs as Redis string values; ``storage_options`` go to ``redis.Redis``."""

    protocol = ("redis", "rediss")
    root_marker = "/"

    def __init__(
        self,
        host: str = "localhost",
        port: int = 6379,
        db: int = 0,
        ssl: bool = False,
        **client_options: Any,
    ) -> None:
        super().__init__(host=host, port=port, db=db, ssl=ssl, **client_options)
        try:
            import redis
            from redis.backoff import ExponentialBackoff
            from redis.retry import Retry
        except ImportError as exc:
            raise ImportError(
                "Redis blob URLs need the redis client: pip install 'ragkv[redis]'"
            ) from exc
        options: dict[str, Any] = {
            "socket_connect_timeout": 2.0,
            "socket_timeout": 10.0,
            # One quick retry covers a pooled connection the server dropped (a restart).
            "retry": Retry(ExponentialBackoff(cap=0.2, base=0.05), 1),
        }
        options.update(client_options)
        self.client = redis.Redis(host=host, port=port, db=db, ssl=ssl, **options)

    # -- URL handling --------------------------------------------------------------------------

    @classmethod
    def _strip_protocol(cls, path: Any) -> Any:
        if isinstance(path, list):
            return [cls._strip_protocol(p) for p in path]
        path = str(path)
        if path.startswith(("redis://", "rediss://")):
            path = _split_url(path)[1]
        path = "/" + path.strip("/")
        return posixpath.normpath(path) if path != "/" else path

    @staticmethod
    def _get_kwargs_from_urls(path: str) -> dict[str, Any]:
        return _split_url(path)[0] if path.startswith(("redis://", "rediss://")) else {}

    # -- files ---------------------------------------------------------------------------------

    def cat_file(
        self, path: str, start: int | None = None, end: int | None = None, **kwargs: Any
    ) -> bytes:
        key = self._strip_protocol(path)
        data = self.client.get(key)
        if data is None:
            raise FileNotFoundError(key)
        return bytes(data)[start:end]

    def pipe_file(self, path: str, value: bytes, mode: str = "overwrite", **kwargs: Any) -> None:
        key = self._strip_protocol(path)
        if mode == "create":
            if not self.client.set(key, bytes(value), nx=True):
                raise FileExistsError(key)
        else:
            self.client.set(key, bytes(value))

    def _open(self, path: str, mode: str = "rb", **kwargs: Any) -> Any:
        if "r" in mode:
            return io.BytesIO(self.cat_file(path))
        if "w" in mode:
            return _Writer(self, self._strip_protocol(path))
        raise ValueError(f"unsupported mode for Redis blobs: {mode!r}")

    def rm_file(self, path: str) -> None:
        key = self._strip_protocol(path)
        if not self.client.delete(key):
            raise FileNotFoundError(key)

    def _rm(self, path: str) -> None:
        self.rm_file(path)

    def rm(self, path: Any, recursive: bool = False, maxdepth: int | None = None) -> None:
        paths = path if isinstance(path, list) else [path]
        keys: list[str] = []
        for p in paths:
            key = self._strip_protocol(p)
            keys.append(key)
            if recursive:
                keys.extend(self.find(key))
        if keys:
            self.client.delete(*keys)

    def mv(self, path1: str, path2: str, recursive: bool = False, **kwargs: Any) -> None:
        # RENAME is atomic, unlike the generic copy-then-delete.
        try:
            self.client.rename(self._strip_protocol(path1), self._strip_protocol(path2))
        except Exception as exc:
            if "no such key" in str(exc).lower():
                raise FileNotFoundError(path1) from exc
            raise

    # -- folders (implicit) --------------------------------------------------------------------

    def makedirs(self, path: str, exist_ok: bool = False) -> None:
        pass

    def mkdir(self, path: str, create_parents: bool = True, **kwargs: Any) -> None:
        pass

    def rmdir(self, path: str) -> None:
        pass

    def _keys_under(self, path: str) -> list[str]:
        prefix = path.rstrip("/") + "/"
        match = _glob_escape(prefix) + "*"
        return sorted(
            k.decode() if isinstance(k, bytes) else k
            for k in self.client.scan_iter(match=match, count=_SCAN_COUNT)
        )

    def _file_infos(self, keys: list[str]) -> dict[str, dict[str, Any]]:
        pipe = self.client.pipeline(transaction=False)
        for key in keys:
            pipe.strlen(key)
        return {
            key: {"name": key, "size": int(size), "type": "file"}
            for key, size in zip(keys, pipe.execute(), strict=True)
        }

    def info(self, path: str, **kwargs: Any) -> dict[str, Any]:
        key = self._strip_protocol(path)
        if key != "/" and self.client.exists(key):
            return self._file_infos([key])[key]
        if key == "/" or next(iter(self._keys_under(key)), None) is not None:
            return {"name": key, "size": 0, "type": "directory"}
        raise FileNotFoundError(key)

    def isfile(self, path: str) -> bool:
        key = self._strip_protocol(path)
        return key != "/" and bool(self.client.exists(key))

    def ls(self, path: str, detail: bool = True, **kwargs: Any) -> Any:
        key = self._strip_protocol(path)
        base = key.rstrip("/")
        files: list[str] = []
        dirs: set[str] = set()
        for k in self._keys_under(key):
            head, sep, _ = k[len(base) + 1 :].partition("/")
            if sep:
                dirs.add(f"{base}/{head}")
            else:
                files.append(k)
        if not files and not dirs:
            if self.isfile(key):
                files = [key]
            elif key != "/":
                raise FileNotFoundError(key)
        entries = [{"name": d, "size": 0, "type": "directory"} for d in sorted(dirs)]
        entries += list(self._file_infos(files).values())
        return entries if detail else [e["name"] for e in entries]

    def find(
        self,
        path: str,
        maxdepth: int | None = None,
        withdirs: bool = False,
        detail: bool = False,
        **kwargs: Any,
    ) -> Any:
        # One SCAN over the prefix instead of fsspec's folder-by-folder walk.
        key = self._strip_protocol(path)
        base = key.rstrip("/")
        keys = self._keys_under(key)
        if maxdepth is not None:
            keys = [k for k in keys if k[len(base) + 1 :].count("/") < maxdepth]
        if self.isfile(key):
            keys.insert(0, key)
        infos = self._file_infos(keys)
        if withdirs:
            for k in keys:
                parent = posixpath.dirname(k)
                while len(parent) > len(base):
                    infos.setdefault(parent, {"name": parent, "size": 0, "type": "directory"})
                    parent = posixpath.dirname(parent)
        names = sorted(infos)
        return {n: infos[n] for n in names} if detail else names
