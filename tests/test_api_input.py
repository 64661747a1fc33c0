"""What the facade takes and what it refuses: chunks as retrieved chunks, texts or token ids;
everyday mistakes (one text for a list, bytes, text in a chunk's ids, a bad answer length,
settings the engine was built with) are one clear error before any work."""

from __future__ import annotations

import pytest
from api_cases import (  # noqa: F401 - fixtures are used by name
    MAX_NEW,
    QUESTION,
    _one_thread,
    engine,
    rag,
    seed,
    three_chunks,
)

from ragkv.chunking import RetrievedChunk


def test_wrong_types_are_clear_errors(rag):
    """What a caller gets wrong is named before any work: never an AttributeError from inside,
    never a string iterated as one chunk per character."""
    documents = rag.index.stats()["documents"]
    with pytest.raises(TypeError, match="document 'doc' must be a str, got bytes"):
        rag.ingest_text("doc", b"some bytes")
    with pytest.raises(TypeError, match="document 'doc' must be a str, got NoneType"):
        rag.ingest_text("doc", None)
    with pytest.raises(TypeError, match="the document's name must be a str"):
        rag.ingest_text(7, "text")
    with pytest.raises(TypeError, match="the question must be a str, got NoneType"):
        rag.retrieve(None)
    with pytest.raises(ValueError, match="the question is empty"):
        rag.retrieve("  ")
    with pytest.raises(TypeError, match="k must be a whole number"):
        rag.retrieve(QUESTION, k=2.5)
    with pytest.raises(TypeError, match="got one str; wrap it in a list"):
        rag.generate("one chunk's text", QUESTION, max_new_tokens=1)
    with pytest.raises(TypeError, match="the question must be a str, got int"):
        rag.generate([], 42, max_new_tokens=1)
    # the same mistakes through precompute, which stored one entry per character of a text
    entries = rag.index.stats()["kv_entries"]
    with pytest.raises(TypeError, match="got one str; wrap it in a list"):
        rag.precompute_many("one chunk's text")
    with pytest.raises(TypeError, match="chunk 0 is bytes; decode it to text first"):
        rag.generate([b"text read in binary mode"], QUESTION, max_new_tokens=1)
    with pytest.raises(TypeError, match="chunk 0 is bytearray"):
        rag.precompute_many([bytearray(b"text")])
    with pytest.raises(TypeError, match="token_ids are the chunk's ids, got text"):
        rag.generate([RetrievedChunk("Some text.", "")], QUESTION, max_new_tokens=1)
    with pytest.raises(ValueError, match=r"chunk 1 is not valid text: '\\ud800' at character 1"):
        rag.generate(["fine", "a\ud800b"], QUESTION, max_new_tokens=1)
    with pytest.raises(ValueError, match="the question is not valid text"):
        rag.generate(["fine"], "why\udc80?", max_new_tokens=1)
    with pytest.raises(TypeError, match="max_new_tokens must be a whole number"):
        rag.generate(["fine"], QUESTION, max_new_tokens=2.5)
    with pytest.raises(TypeError, match="max_new_tokens must be a whole number"):
        rag.generate(["fine"], QUESTION, max_new_tokens=None)
    assert rag.index.stats()["kv_entries"] == entries
    assert rag.index.stats()["documents"] == documents


def test_precompute_takes_what_generate_takes(rag):
    chunks = three_chunks(rag)
    assert rag.precompute_many(chunks) == [False] * 3  # ingested: stored already
    assert rag.precompute_many([c.text for c in chunks]) == [False] * 3


def test_settings_the_engine_was_built_with_cannot_change_under_it(rag):
    for change in (dict(system_prompt="Answer in French."), dict(kv_dtype="int8"),
                   dict(home=rag.config.home / "other")):
        with pytest.raises(ValueError, match=f"{next(iter(change))} is fixed when the engine"):
            rag.with_config(**change)
    other = rag.with_config(precompute_context="prefix", system_prompt=rag.config.system_prompt)
    assert other.config.precompute_context == "prefix" and other.backend is rag.backend


@pytest.mark.parametrize(("chunk", "says"), [
    ([10**9], "token id 1000000000, outside the tokenizer's vocabulary"),
    ([5, -1], "token id -1, outside"),
    ([1.5, 2.0], "must be its text, its token ids or a RetrievedChunk"),
    ([], "has no tokens"),
    (42, "must be its text"),
])
def test_a_chunk_that_is_not_token_ids_is_a_clear_error(rag, chunk, says):
    with pytest.raises(ValueError, match="chunk 0 ") as err:
        rag.generate([chunk], QUESTION, max_new_tokens=1)
    assert says in str(err.value)
    with pytest.raises(ValueError, match=says.replace("(", r"\(")):
        rag.precompute_many([chunk])
