"""Retrieval with the bundled MiniLM embedder and FAISS, plus model-folder validation."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from ragkv.connectors.retrieval import (
    Embedder,
    FaissRetriever,
    build_retriever,
    vector_from_bytes,
    vector_to_bytes,
)
from ragkv.model_fetch import (
    SUPPORTED_ARCHITECTURES,
    UnsupportedModelError,
    check_model_dir,
    resolve_model,
)

TEXTS = [
    "The cat curled up on the warm windowsill and purred all afternoon.",
    "Python's asyncio event loop schedules coroutines and runs their callbacks.",
    "The central bank raised interest rates and the stock market fell sharply.",
]
IDS = [101, 7, 4242]


@pytest.fixture(scope="module")
def embedder() -> Embedder:
    return Embedder()


@pytest.fixture(scope="module")
def vectors(embedder: Embedder) -> np.ndarray:
    return embedder.embed(TEXTS)


def test_embeddings_are_normalised_float32(embedder: Embedder, vectors: np.ndarray) -> None:
    assert embedder.dim == 384
    assert vectors.dtype == np.float32
    assert vectors.shape == (3, embedder.dim)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    assert embedder.embed([]).shape == (0, embedder.dim)


@pytest.mark.parametrize(
    ("query", "expected"),
    [
        ("Which animal was sleeping in the sun?", 101),
        ("How does async code get scheduled in Python?", 7),
        ("What happened to share prices after the rate hike?", 4242),
    ],
)
def test_search_returns_the_right_text(
    embedder: Embedder, vectors: np.ndarray, query: str, expected: int
) -> None:
    retriever = FaissRetriever(embedder.dim)
    retriever.add(IDS, vectors)
    assert len(retriever) == 3
    hits = retriever.search(embedder.embed([query])[0], k=3)
    assert [i for i, _ in hits][0] == expected
    assert sorted(i for i, _ in hits) == sorted(IDS)
    scores = [s for _, s in hits]
    assert scores == sorted(scores, reverse=True)
    assert all(-1.0 - 1e-5 <= s <= 1.0 + 1e-5 for s in scores)


def test_the_whole_of_a_long_chunk_counts_in_its_embedding(embedder: Embedder) -> None:
    """MiniLM reads 256 word pieces; a chunk holds up to ~560 LLM tokens. What its second
    half says must reach retrieval (it scored as if absent), and a short text embeds as the
    model embeds it."""
    from pydoc_data.topics import topics

    filler = topics["assert"][:1400].strip()
    fact = "The secret launch code of the Zephyr project is 4417, kept by Admiral Okonkwo."
    with_fact, without = filler + "\n\n" + fact, filler + "\n\nNothing else to add."
    assert len(embedder._windows(with_fact)) == 2
    vecs = embedder.embed([with_fact, without, TEXTS[0]])
    np.testing.assert_allclose(np.linalg.norm(vecs, axis=1), 1.0, atol=1e-5)
    query = embedder.embed(["What is the secret launch code of the Zephyr project?"])[0]
    assert vecs[0] @ query > vecs[1] @ query + 0.05
    alone = embedder._model.encode([TEXTS[0]], normalize_embeddings=True)[0]
    np.testing.assert_allclose(vecs[2], alone, atol=1e-5)


def test_a_korean_chunk_is_read_whole(embedder: Embedder) -> None:
    """A chunk within 254 characters was embedded in one go, on the guess that a word piece
    holds a character; a Hangul syllable is 2-3 word pieces, so the model cut a default-size
    Korean chunk at about half and retrieval never saw the rest."""
    head = "대한민국의 수도는 서울특별시이며 인구는 약 천만 명이다 " * 5
    cats, volcanoes = (head + " 고양이는 작은 육식성 포유류로 사람과 함께 오래 살아왔다",
                       head + " 화산은 지각의 틈으로 마그마가 분출하여 생긴 산이다 용암")
    assert len(cats) < 254 and len(embedder._windows(cats)) == 2
    a, b = embedder.embed([cats, volcanoes])
    question = embedder.embed(["고양이는 작은 육식성 포유류"])[0]
    assert float(a @ b) < 0.999 and float(question @ a) > float(question @ b)


def test_build_retriever_from_bytes(embedder: Embedder, vectors: np.ndarray) -> None:
    blobs = [vector_to_bytes(v) for v in vectors]
    assert all(len(b) == 4 * embedder.dim for b in blobs)
    np.testing.assert_array_equal(vector_from_bytes(blobs[1]), vectors[1])
    retriever = build_retriever(IDS, blobs)
    assert len(retriever) == 3
    for vec, expected in zip(vectors, IDS, strict=True):
        [(best, score)] = retriever.search(vec, k=1)
        assert best == expected
        assert score == pytest.approx(1.0, abs=1e-5)


def test_k_larger_than_index_and_empty_index(vectors: np.ndarray) -> None:
    empty = build_retriever([], [])
    assert len(empty) == 0
    assert empty.search(vectors[0], k=5) == []
    retriever = FaissRetriever(vectors.shape[1])
    retriever.add(IDS[:2], vectors[:2])
    assert len(retriever.search(vectors[2], k=10)) == 2
    assert retriever.remove([IDS[0]]) == 1
    assert [i for i, _ in retriever.search(vectors[0], k=10)] == [IDS[1]]


def test_add_rejects_wrong_shapes(vectors: np.ndarray) -> None:
    retriever = FaissRetriever(vectors.shape[1])
    with pytest.raises(ValueError):
        retriever.add([1, 2], vectors)
    with pytest.raises(ValueError):
        retriever.add([1], np.zeros((1, 10), dtype=np.float32))


def test_check_model_dir_rejects_unsupported_architecture(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(
        json.dumps({"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"})
    )
    with pytest.raises(UnsupportedModelError) as info:
        check_model_dir(tmp_path)
    message = str(info.value)
    assert "GPT2LMHeadModel" in message
    for family in ("Llama", "Mistral", "Qwen2", "SmolLM"):
        assert family in message
    assert isinstance(info.value, ValueError)
    with pytest.raises(UnsupportedModelError):
        resolve_model(tmp_path, tmp_path)


def test_check_model_dir_without_config(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="config.json"):
        check_model_dir(tmp_path)


def test_supported_model_dirs(tmp_path: Path, smol_path: Path) -> None:
    check_model_dir(smol_path)
    for arch in SUPPORTED_ARCHITECTURES:
        folder = tmp_path / arch
        folder.mkdir()
        (folder / "config.json").write_text(json.dumps({"architectures": [arch]}))
        check_model_dir(folder)
        assert resolve_model(folder, tmp_path) == folder
