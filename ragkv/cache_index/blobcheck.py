"""The one check every read (:mod:`.store`) and every ``verify`` (:mod:`.integrity`) applies
to a blob before trusting it.

A blob is good when its bytes hash to the checksum the index recorded (xxh3-128: truncation,
flipped bits and a half-written file all fail it), its safetensors framing is sound, its
metadata names this key, model and layout (a blob copied under another key's name fails
here), and, for int8 entries, its payload and scales fit together.
"""

from __future__ import annotations

import torch

from ragkv.cache_index.blobs import checksum_matches, decode_kv
from ragkv.cache_index.codec import decode_tensors
from ragkv.cache_index.models import EntryInfo


def open_blob(data: bytes, entry: EntryInfo, *, model_fp: str | None = None,
              layout: str | None = None) -> dict[str, torch.Tensor]:
    """The tensors (decoded, ready to use) of a blob read for ``entry``; ValueError says why
    the blob is unusable."""
    if not checksum_matches(data, entry.checksum):
        raise ValueError(f"checksum mismatch ({len(data)} of {entry.nbytes} bytes)")
    tensors, meta = decode_kv(data)
    expected = {"key": entry.key, "model_fp": model_fp or entry.model_fp,
                "layout": layout or entry.layout}
    wrong = {k: meta.get(k) for k, v in expected.items() if meta.get(k) != v}
    if wrong:
        raise ValueError(f"blob metadata does not match: {wrong}")
    return decode_tensors(tensors, meta)
