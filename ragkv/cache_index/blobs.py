"""Blob storage for KV tensors and their safetensors encoding.

Blobs go through fsspec so the store can be a local folder, S3 (``s3fs``) or Redis
(:mod:`.redisfs`) by URL alone, without touching callers. safetensors is used because loading
it cannot execute code (unlike pickle) and its header is plain JSON we can validate before
trusting any offsets.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import posixpath
import struct
import uuid
from pathlib import Path
from typing import Any

import fsspec
import torch
import xxhash
from fsspec.implementations.local import LocalFileSystem
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

log = logging.getLogger("ragkv.cache")

_TMP_PREFIX = ".tmp-"
# Stores where one whole-object write is already atomic (a reader sees the old object or the
# new one): writing there directly saves the temp copy and a non-atomic copy-then-delete "mv".
_ATOMIC_PUT_PROTOCOLS = {"redis", "rediss", "s3", "s3a", "gs", "gcs", "az", "abfs", "memory"}

#: object stores: prefixes, not folders; their buckets are the deployment's to create
_OBJECT_STORES = {"s3", "s3a", "gs", "gcs", "az", "abfs", "abfss"}
_EXTRAS = {"s3": "s3", "s3a": "s3", "redis": "redis", "rediss": "redis"}
# botocore's defaults retry an unreachable endpoint for several seconds per call (over 20 s to
# open a store); a cache is better off with a quick miss. Options a caller gives replace these.
_S3_FAST_FAIL: dict[str, Any] = {
    "config_kwargs": {
        "connect_timeout": 2,
        "read_timeout": 20,
        "retries": {"max_attempts": 2, "mode": "standard"},
    }
}
_DEFAULT_OPTIONS: dict[str, dict[str, Any]] = {"s3": _S3_FAST_FAIL, "s3a": _S3_FAST_FAIL}

# The Redis backend is ours (fsspec has none); registered by name so it is imported, with its
# redis client, only when a redis:// URL is used.
for _proto in ("redis", "rediss"):
    with contextlib.suppress(ValueError):  # someone else's registration wins
        fsspec.register_implementation(
            _proto,
            "ragkv.cache_index.redisfs.RedisFileSystem",
            errtxt="Redis blob URLs need the redis client: pip install 'ragkv[redis]'",
        )
_SAFETENSORS_ITEMSIZE = {
    "BOOL": 1,
    "U8": 1,
    "I8": 1,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
    "I16": 2,
    "U16": 2,
    "F16": 2,
    "BF16": 2,
    "I32": 4,
    "U32": 4,
    "F32": 4,
    "I64": 8,
    "U64": 8,
    "F64": 8,
}
# A header bigger than this is a corrupt length field, not a real header.
_MAX_HEADER = 100 * 1024 * 1024


class BlobStore:
    """Named byte blobs under one root, written atomically.

    ``options`` are fsspec storage options (an S3 endpoint and credentials, Redis timeouts).
    """

    def __init__(self, url: str, options: dict[str, Any] | None = None) -> None:
        self.url = url
        if "://" in url:
            scheme = url.split("://", 1)[0]
            if scheme not in fsspec.available_protocols() and scheme not in fsspec.registry:
                raise ValueError(f"blob URL {url!r}: unknown storage {scheme}:// (give a "
                                 f"folder, or a file://, s3:// or redis:// URL)")
            try:
                self.fs, root = fsspec.core.url_to_fs(
                    url, **{**_DEFAULT_OPTIONS.get(scheme, {}), **(options or {})}
                )
            except ImportError as exc:
                extra = _EXTRAS.get(scheme)
                if extra is None:
                    raise
                raise ImportError(f"{scheme}:// blob URLs need "
                                  f"pip install 'ragkv[{extra}]' ({exc})") from exc
        else:
            self.fs = LocalFileSystem()
            root = str(Path(url).expanduser().resolve())
        self.root = root.rstrip("/") or "/"
        self._local = isinstance(self.fs, LocalFileSystem)
        protocols = self.fs.protocol
        protocols = {protocols} if isinstance(protocols, str) else set(protocols)
        self._atomic_put = bool(protocols & _ATOMIC_PUT_PROTOCOLS)
        if protocols & _OBJECT_STORES:
            # No folders to make, and a bucket is never created: a mistyped one would be, by
            # any command that opens the store (`cache stats` too). Puts to it fail (logged).
            return
        try:
            self.fs.makedirs(self.root, exist_ok=True)
        except Exception as exc:
            if self._local:
                raise
            # A remote store that is down now may be back for the next put; until then every
            # read is a miss, which KVStore already handles.
            log.warning("blob store %s unreachable at start: %s", url, exc)

    def _path(self, name: str) -> str:
        norm = posixpath.normpath(name)
        # Names come from cache keys, but a path escaping the root would be a silent overwrite
        # of someone else's file, so refuse it outright.
        if not name or norm.startswith(("/", "..")) or norm == "." or "\\" in name:
            raise ValueError(f"invalid blob name: {name!r}")
        return f"{self.root.rstrip('/')}/{norm}"

    def put(self, name: str, data: bytes) -> None:
        """Write to a temp name beside the target, then rename: readers see all or nothing."""
        path = self._path(name)
        parent, base = posixpath.split(path)
        if self._atomic_put:
            self.fs.pipe_file(path, bytes(data))
            return
        tmp = f"{parent}/{_TMP_PREFIX}{base}.{uuid.uuid4().hex}"
        self.fs.makedirs(parent, exist_ok=True)
        try:
            if self._local:
                with open(tmp, "wb") as f:
                    f.write(data)
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(tmp, path)
            else:
                self.fs.pipe_file(tmp, bytes(data))
                self.fs.mv(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                self.fs.rm_file(tmp)
            raise

    def get(self, name: str) -> bytes:
        """The blob's bytes; ``FileNotFoundError`` if there is none."""
        path = self._path(name)
        try:
            return bytes(self.fs.cat_file(path))
        except IsADirectoryError as exc:
            raise FileNotFoundError(path) from exc

    def _fresh(self) -> None:
        # Remote filesystems cache listings; another node's writes must be seen.
        if not self._local:
            self.fs.invalidate_cache()

    def exists(self, name: str) -> bool:
        self._fresh()
        return bool(self.fs.isfile(self._path(name)))

    def delete(self, name: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.fs.rm_file(self._path(name))

    def names(self) -> list[str]:
        """All blob names (relative, ``/``-separated), temp files of in-flight puts excluded;
        a store that cannot be listed raises (fsspec's ``exists`` answered False for it)."""
        out = []
        for path in self.find():
            rel = posixpath.relpath(path, self.root)
            if not posixpath.basename(rel).startswith(_TMP_PREFIX):
                out.append(rel)
        return sorted(out)

    def total_bytes(self) -> int:
        """Bytes of every file under the root; raises where the store cannot be listed."""
        found = self.find(detail=True)
        return sum(int(info.get("size") or 0) for info in found.values())

    def find(self, *, detail: bool = False):
        """Every file under the root (temp files too), as fsspec's ``find`` lists them."""
        self._fresh()
        try:
            return self.fs.find(self.root, detail=detail)
        except FileNotFoundError:  # nothing written yet
            return {} if detail else []


def checksum(data: bytes) -> str:
    """``xxh3:<128-bit hex>`` of ``data``. It guards against truncation, flipped bits and torn
    writes, not against an adversary, and runs at memory speed (sha256 took most of a disk
    hit's time). Entries written before it carry a bare sha256 hex."""
    return "xxh3:" + xxhash.xxh3_128_hexdigest(data)


def checksum_matches(data: bytes, recorded: str) -> bool:
    if recorded.startswith("xxh3:"):
        return checksum(data) == recorded
    return hashlib.sha256(data).hexdigest() == recorded


def encode_kv(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> tuple[bytes, str]:
    """safetensors bytes (``safetensors.torch.save``) and their :func:`checksum`."""
    bad = [k for k, v in metadata.items() if not isinstance(k, str) or not isinstance(v, str)]
    if bad:
        raise TypeError(f"safetensors metadata must be str -> str; offending keys: {bad}")
    if not tensors:
        raise ValueError("nothing to encode: no tensors")
    data = _canonical(st_save(_standalone(tensors), metadata=dict(metadata)))
    return data, checksum(data)


def _canonical(data: bytes) -> bytes:
    """The same blob with its JSON header's keys sorted. safetensors writes the metadata map in
    a hash order chosen per process, so two processes storing the same KV produced different
    bytes: racing writers of one key could leave one's blob under the other's checksum."""
    (n,) = struct.unpack("<Q", data[:8])
    canon = json.dumps(json.loads(data[8:8 + n]), sort_keys=True, separators=(",", ":"),
                       ensure_ascii=False).encode()
    if len(canon) > n:  # not for the header safetensors wrote; keep its bytes then
        return data
    buf = bytearray(data)
    buf[8:8 + n] = canon.ljust(n)  # safetensors pads its header with spaces too
    return bytes(buf)


def _standalone(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """CPU tensors safetensors accepts: it refuses non-contiguous tensors and tensors sharing
    storage, and KV slices of one cache are often both. Copies only when needed, since a
    chunk's KV can be large."""
    out: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for name, t in tensors.items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name!r} is not a tensor")
        t = t.detach().to("cpu")
        storage = t.untyped_storage()
        if not t.is_contiguous() or storage.nbytes() != t.nbytes or storage.data_ptr() in seen:
            t = t.contiguous().clone()
            storage = t.untyped_storage()
        if t.numel():
            seen.add(storage.data_ptr())
        out[name] = t
    return out


def _validate_header(data: bytes) -> dict[str, str]:
    """Check the safetensors framing ourselves so malformed input becomes a ValueError instead
    of whatever (possibly a Rust panic) the loader would raise; returns the metadata."""
    if len(data) < 8:
        raise ValueError("safetensors data shorter than its length prefix")
    (n,) = struct.unpack("<Q", data[:8])
    if n > _MAX_HEADER or 8 + n > len(data):
        raise ValueError("safetensors header length out of range")
    try:
        header = json.loads(data[8 : 8 + n].decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        # (RecursionError: nesting deeper than the parser goes is no header either)
        raise ValueError(f"safetensors header is not JSON: {exc}") from exc
    if not isinstance(header, dict):
        raise ValueError("safetensors header is not an object")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
    ):
        raise ValueError("safetensors metadata is not a str -> str mapping")
    body = len(data) - 8 - n
    end_max = 0
    for name, info in header.items():
        try:
            itemsize = _SAFETENSORS_ITEMSIZE[info["dtype"]]
            shape = [int(d) for d in info["shape"]]
            start, end = (int(o) for o in info["data_offsets"])
        except (KeyError, TypeError, ValueError, OverflowError) as exc:  # (int(1e400))
            raise ValueError(f"bad safetensors entry for {name!r}") from exc
        numel = 1
        for d in shape:
            if d < 0:
                raise ValueError(f"negative dimension in {name!r}")
            numel *= d
        if not 0 <= start <= end <= body or end - start != numel * itemsize:
            raise ValueError(f"tensor {name!r} does not fit the data section")
        end_max = max(end_max, end)
    if end_max != body:
        raise ValueError("safetensors data section length does not match its tensors")
    return dict(metadata)


def decode_kv(data: bytes) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors (CPU) and metadata; raises ValueError on anything malformed."""
    metadata = _validate_header(bytes(data))
    try:
        tensors = st_load(bytes(data))
    except Exception as exc:
        raise ValueError(f"cannot decode safetensors data: {exc}") from exc
    return tensors, metadata
