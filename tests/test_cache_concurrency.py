"""Real processes on one SQLite file and one blob folder: concurrent writers of the same and
different entries, and a writer killed with SIGKILL mid-write."""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import time
from pathlib import Path

from sqlalchemy import func, select
from storage_cases import FP, LAYOUT, consistent, key, kv, make_store

from ragkv.cache_index import verify
from ragkv.cache_index.models import Document, KVEntry

SHARED = 12  # keys every worker writes
OWN = 6  # keys only one worker writes


def _ingest_worker(root: str, worker: int, start) -> None:
    import torch

    torch.set_num_threads(1)
    store = make_store(Path(root), memory=None)
    start.wait()
    for i in range(SHARED + OWN):
        k = i if i < SHARED else 1000 * (worker + 1) + i
        # Deterministic content per key, as the same chunk under the same model gives.
        assert store.put(key(k), kv(n_tokens=16, seed=k), model_fp=FP, layout=LAYOUT,
                         n_tokens=16)
        store.index.add_document("shared.md", "", "1" * 64)
        store.index.add_document(f"own-{worker}.md", "", "2" * 64)
        assert store.get(key(k), model_fp=FP, layout=LAYOUT) is not None


def _reported(worker, root: str, i: int, start, errors) -> None:
    """``worker(root, i, start)`` in a spawned process; what it raises goes to the parent."""
    try:
        worker(root, i, start)
    except BaseException as exc:  # noqa: BLE001 - reported to the parent
        errors.put(f"worker {i}: {exc!r}")
        raise


def _run_at_once(worker, root: Path, n: int = 4) -> None:
    """``n`` spawned processes run ``worker(root, i, start)`` from one start signal; every
    one must exit cleanly."""
    ctx = mp.get_context("spawn")
    make_store(root).index.close()  # schema first, as ingestion's first open would
    start, errors = ctx.Event(), ctx.Queue()
    procs = [ctx.Process(target=_reported, args=(worker, str(root), w, start, errors))
             for w in range(n)]
    for p in procs:
        p.start()
    start.set()
    for p in procs:
        p.join(120)
    failures = [errors.get() for _ in range(errors.qsize())] if not errors.empty() else []
    assert [p.exitcode for p in procs] == [0] * n, failures


def test_four_processes_ingesting_at_once(tmp_path):
    _run_at_once(_ingest_worker, tmp_path)
    store = make_store(tmp_path)
    with store.index.transaction() as s:
        assert s.scalar(select(func.count(KVEntry.key))) == SHARED + 4 * OWN
        assert s.scalar(select(func.count(Document.id))) == 5  # shared.md once, own-* x4
    report = verify(store, orphan_grace_s=0)
    assert report.clean, (report.bad, report.orphans)
    assert not [n for n in os.listdir(store.blobs.root) if n.startswith(".tmp")]
    consistent(store)


ROUNDS = 5  # versions of one document each worker ingests


def _version_worker(root: str, worker: int, start) -> None:
    from ragkv.cache_index import CacheIndex
    from ragkv.cache_index.corpus import DocumentGone
    from ragkv.cache_index.models import ChunkRecord

    index = CacheIndex(f"sqlite:///{Path(root) / 'index.sqlite'}")
    start.wait()
    for r in range(ROUNDS):  # ingestion's order: the version and its chunks, then older ones
        tag = f"{worker}-{r}"
        doc_id, created = index.add_document("doc.md", "", tag.ljust(64, "0"))
        assert created
        try:
            index.add_chunks(doc_id, [ChunkRecord(i, f"{tag}/{i}", [i], key(i))
                                      for i in range(3)])
        except DocumentGone:  # a later version went in meanwhile: ingestion stops here
            continue
        index.remove_documents("doc.md", before_id=doc_id)


def test_processes_ingesting_versions_of_one_document_leave_the_latest(tmp_path):
    _run_at_once(_version_worker, tmp_path)
    index = make_store(tmp_path).index
    [doc] = index.documents()  # one version: never two, never none
    with index.transaction() as s:
        tag = s.scalar(select(Document.text_sha256).where(Document.id == doc.id)).rstrip("0")
    chunks = index.chunks()  # the survivor's own three, nothing of a removed version
    assert [c.text for c in chunks] == [f"{tag}/{i}" for i in range(3)]
    assert index.corpus_version() is not None


def _rechunk_worker(root: str, worker: int, start) -> None:
    from ragkv.cache_index import CacheIndex
    from ragkv.cache_index.models import Chunk, ChunkRecord

    index = CacheIndex(f"sqlite:///{Path(root) / 'index.sqlite'}")
    n = 2 + worker  # each process chunks the same document into its own number of chunks
    start.wait()
    for _ in range(ROUNDS * 4):
        doc_id, _ = index.add_document("doc.md", "", "1" * 64)  # one text: one document
        index.add_chunks(doc_id, [ChunkRecord(i, f"{worker}/{i}", [worker, i], key(i))
                                  for i in range(n)])
        with index.transaction() as s:  # one statement: one snapshot of rows and count
            rows = s.execute(select(Chunk.text, Document.n_chunks)
                             .join(Document, Chunk.document_id == Document.id)
                             .where(Document.id == doc_id).order_by(Chunk.ordinal)).all()
        writer = rows[0].text.split("/")[0]
        whole = [f"{writer}/{i}" for i in range(2 + int(writer))]
        assert [t for t, _ in rows] == whole and rows[0].n_chunks == len(whole), rows


def test_processes_chunking_one_document_differently_leave_one_chunking_whole(tmp_path):
    _run_at_once(_rechunk_worker, tmp_path)
    index = make_store(tmp_path).index
    [doc] = index.documents()
    texts = [c.text for c in index.chunks()]
    writer = int(texts[0].split("/")[0])
    assert texts == [f"{writer}/{i}" for i in range(2 + writer)] and doc.n_chunks == len(texts)


def _writer_forever(root: str, ready) -> None:
    import torch

    torch.set_num_threads(1)
    store = make_store(Path(root), memory=None)
    big = kv(n_tokens=4096, seed=0, heads=8, dim=64)  # ~16 MB a blob: writes take a while
    i = 0
    while True:
        store.put(key(i % 50), big, model_fp=FP, layout=LAYOUT, n_tokens=4096)
        i += 1
        if i == 2:
            ready.set()


def test_kill_9_mid_write_leaves_no_torn_entry(tmp_path):
    ctx = mp.get_context("spawn")
    for delay in (0.0, 0.13, 0.29):
        ready = ctx.Event()
        p = ctx.Process(target=_writer_forever, args=(str(tmp_path), ready))
        p.start()
        assert ready.wait(60)
        time.sleep(delay)
        os.kill(p.pid, signal.SIGKILL)
        p.join(10)
        assert p.exitcode == -signal.SIGKILL
    store = make_store(tmp_path)
    n = store.index.stats()["kv_entries"]
    assert n >= 2
    for i in range(50):  # every visible entry reads whole; none is torn
        if store.index.get_entry(key(i)) is not None:
            assert store.get(key(i), model_fp=FP, layout=LAYOUT) is not None, i
    assert store.counters["corrupt"] == 0
    report = verify(store, orphan_grace_s=0)
    assert not report.bad  # at most orphans / temp files of the killed put, now removed
    assert verify(store, orphan_grace_s=0).clean
    assert store.put(key(77), kv(), model_fp=FP, layout=LAYOUT, n_tokens=5)
    assert store.get(key(77), model_fp=FP, layout=LAYOUT) is not None
    consistent(store)
