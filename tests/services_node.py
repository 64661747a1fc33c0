"""One "node" of the multi-node tests, run as its own process: ``python services_node.py JSON``.

The JSON names a role and its arguments; the result is printed as one JSON line. Separate
processes share nothing but the PostgreSQL index and the Redis or S3 blobs, as real nodes do.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

TOPICS = ("assert", "pass")
QUESTION = "What does the assert statement do?"


def _wait(go: str | None) -> None:
    # Start together: every process is imported and connected before the race begins.
    while go and not Path(go).exists():
        time.sleep(0.002)


def race(a: dict[str, Any]) -> dict[str, Any]:
    import torch

    from ragkv.cache_index import BlobStore, CacheIndex, ChunkRecord, KVStore

    store = KVStore(CacheIndex(a["index_url"]), BlobStore(a["blob_url"], a["blob_options"]))
    gen = torch.Generator().manual_seed(0)
    tensors = {"k": torch.randn(2, 2, 4, 8, generator=gen), "v": torch.randn(2, 2, 4, 8)}
    store.index.get_entry("warm-up")  # connect before the start signal
    _wait(a["go"])
    doc_ids = set()
    for i in range(a["n"]):
        doc_id, _ = store.index.add_document(f"doc-{i % 3}", "", f"{i % 3:064x}")
        doc_ids.add(doc_id)
        # Every process ingests the same chunks of the same document at the same moment.
        chunk_ids = store.index.add_chunks(
            doc_id, [ChunkRecord(o, f"t{o}", [1, 2], f"{o:064x}") for o in range(5)]
        )
        store.put(f"{i:064x}", tensors, model_fp="f" * 64, layout="L", n_tokens=4)
    return {"counters": store.counters, "doc_ids": sorted(doc_ids), "chunk_ids": chunk_ids}


def _rag(a: dict[str, Any]) -> Any:
    from ragkv import RagKV, RagkvConfig

    cfg = RagkvConfig(
        home=Path(a["home"]),
        model=Path(a["model"]),
        index_url=a["index_url"],
        blob_url=a["blob_url"],
        blob_options=a["blob_options"],
        chunk_tokens=64,
    )
    return RagKV(cfg)


def _answer(rag: Any) -> dict[str, Any]:
    chunks = [c.token_ids for c in rag.index.chunks()]
    answer = rag.generate(chunks, QUESTION, max_new_tokens=8)
    return {
        "n_chunks": len(chunks),
        "hits": answer.trace.hits,
        "misses": answer.trace.misses,
        "tiers": answer.trace.tiers,
        "tokens": answer.tokens,
    }


def ingest(a: dict[str, Any]) -> dict[str, Any]:
    from pydoc_data.topics import topics

    rag = _rag(a)
    for name in TOPICS:
        rag.ingest_text(f"pydoc:{name}", topics[name])
    return {"puts": rag.backend.store.counters["puts"], **_answer(rag)}


def answer(a: dict[str, Any]) -> dict[str, Any]:
    return _answer(_rag(a))


def main() -> None:
    args = json.loads(sys.argv[1])
    result = {"race": race, "ingest": ingest, "answer": answer}[args["role"]](args)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
