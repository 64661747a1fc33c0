"""Everyday misuse of the facade in Python: a closed facade, arguments of the wrong kind,
settings given in another spelling. Each was accepted and failed later deep inside (or not at
all) before; each is now one clear error, or taken as meant."""

from __future__ import annotations

from pathlib import Path

import pytest
from api_cases import (  # noqa: F401 - fixtures are used by name
    QUESTION,
    _one_thread,
    engine,
    rag,
    seed,
    three_chunks,
)

from ragkv.api import RagKV
from ragkv.config import BlendConfig


def test_a_closed_facade_is_closed(rag):
    """close() left the index open (its SQLite handles too) and the facade answering."""
    index = rag.index
    derived = rag.with_config(precompute_context="cold")
    assert derived.index is index  # nothing new opened for a derived facade
    derived.close()  # shares its parent's engine and index: they stay open
    assert rag.retrieve(QUESTION, k=1)
    with pytest.raises(RuntimeError, match="this RagKV was closed"):
        derived.retrieve(QUESTION, k=1)
    closed = []
    index.close = lambda: closed.append(True)  # the real one runs at the fixture's teardown
    with rag:
        pass
    assert closed == [True]
    rag.close()  # twice is no error
    for call in (lambda: rag.retrieve(QUESTION), lambda: rag.ingest_text("d", "text"),
                 lambda: rag.generate(["text"], QUESTION), lambda: rag.precompute("text"),
                 lambda: rag.with_config(precompute_context="cold"),
                 lambda: rag.remove_document("d"), lambda: derived.choose_anchor(["a"])):
        with pytest.raises(RuntimeError, match="this RagKV was closed; open a new one"):
            call()


def test_with_config_compares_what_the_values_mean(rag):
    """The same home as a str, or the same model as a Path, read as a change and were refused."""
    same = rag.with_config(home=str(rag.config.home), precompute_context="cold")
    assert same.config.home == rag.config.home and same.backend is rag.backend
    with pytest.raises(ValueError, match="home is fixed"):
        rag.with_config(home=str(rag.config.home / "other"))


@pytest.mark.parametrize(("blend", "error", "says"), [
    (0.5, TypeError, "blend must be a BlendConfig .* got float"),
    ("hkvd", TypeError, "blend must be a BlendConfig .* got str"),
    ({"ratio": 2.0}, ValueError, "ratio must be within"),
])
def test_a_blend_that_is_no_blend_config_is_named(rag, blend, error, says):
    """It failed with "'float' object has no attribute 'ratio'" inside the engine."""
    chunks = three_chunks(rag)
    with pytest.raises(error, match=says):
        rag.generate(chunks, QUESTION, blend=blend, max_new_tokens=1)
    with pytest.raises(error, match=says):
        rag.generate(chunks, QUESTION, mode="full", blend=blend, max_new_tokens=1)


def test_a_blend_may_come_as_a_mapping(rag):
    chunks = three_chunks(rag)
    a = rag.generate(chunks, QUESTION, blend={"ratio": 1.0}, max_new_tokens=2, log_query=False)
    b = rag.generate(chunks, QUESTION, blend=BlendConfig(ratio=1.0), max_new_tokens=2,
                     log_query=False)
    assert a.tokens == b.tokens and a.trace.ratio == b.trace.ratio == 1.0


@pytest.mark.parametrize(("chunks", "says"), [
    (None, "chunks must be a list .* got NoneType"),
    ({"a": 1}, "chunks must be a list .* got one dict"),
    ({"text"}, "chunks must be a list .* got one set"),
    (7, "chunks must be a list .* got int"),
])
def test_chunks_that_are_no_list_are_named(rag, chunks, says):
    """None read as no chunks (precompute_many) or "'NoneType' object is not iterable"; a dict
    as its keys."""
    with pytest.raises(TypeError, match=says):
        rag.generate(chunks, QUESTION, max_new_tokens=1)
    with pytest.raises(TypeError, match=says):
        rag.precompute_many(chunks)


def test_counts_and_seconds_are_checked(rag):
    import numpy as np

    chunks = three_chunks(rag)
    assert len(rag.retrieve(QUESTION, k=np.int64(2))) == 2  # numpy's ints, as max_new_tokens
    with pytest.raises(ValueError, match="k must be >= 1"):
        rag.retrieve(QUESTION, k=0)
    for name, value in (("full_ttft_s", "x"), ("retrieval_s", -1.0),
                        ("full_ttft_s", float("nan"))):
        # "x" was taken, and the query log's row dropped with a warning
        with pytest.raises(ValueError, match=f"{name} must be a number of seconds >= 0"):
            rag.generate(chunks, QUESTION, max_new_tokens=1, **{name: value})


def test_choose_anchor_takes_a_list_of_texts(rag):
    """One string read as one text per character (and chose nothing); ints failed inside."""
    with pytest.raises(TypeError, match="texts must be a list of the corpus's texts, got str"):
        rag.choose_anchor("one long text " * 50)
    with pytest.raises(TypeError, match="texts must be a list .* got NoneType"):
        rag.choose_anchor(None)
    with pytest.raises(TypeError, match="text 1 must be a str, got int"):
        rag.choose_anchor(["a", 2])


def test_a_drained_stream_yields_nothing_again(rag):
    """A second pass raised "this generation was closed" (or, with keep_kv, decoded the whole
    answer again)."""
    chunks = three_chunks(rag)
    for keep in (False, True):
        stream = rag.stream(chunks, QUESTION, max_new_tokens=3, keep_kv=keep, log_query=False)
        first = list(stream)
        assert "".join(first) == stream.answer.text
        assert list(stream) == []


def test_chunks_longer_than_the_window_are_refused_before_ingesting(rag):
    """chunk_tokens over the window precomputed and stored chunks no prompt could hold."""
    big = rag.with_config(chunk_tokens=rag.backend.max_model_len)
    documents = rag.index.stats()["documents"]
    with pytest.raises(ValueError, match=f"chunk_tokens {rag.backend.max_model_len} makes "
                                         "chunks too long for a prompt in the model's window"):
        big.ingest_text("big", "word " * 100)
    assert rag.index.stats()["documents"] == documents


def test_the_longest_chunks_ingestion_takes_fit_a_prompt(rag):
    """chunk_tokens just under the window was taken, but a document's last chunk may run 10%
    past it: that chunk fit no prompt, and every query retrieving it failed."""
    window = rag.backend.max_model_len
    with pytest.raises(ValueError, match=r"use at most \d+") as info:
        rag.with_config(chunk_tokens=window - 8).ingest_text("big", "word " * 10)
    most = int(str(info.value).rsplit("use at most ", 1)[1].split()[0])
    assert most < window / 1.2
    with pytest.raises(ValueError, match=f"chunk_tokens {most + 1} makes chunks too long"):
        rag.with_config(chunk_tokens=most + 1).ingest_text("big", "word " * 10)
    long = rag.with_config(chunk_tokens=most)
    long.ingest_text("long", "word " * int(most * 2.08))  # its last chunk runs over most
    ours = [c for c in long.retrieve("word word", k=16) if set(c.text.split()) == {"word"}]
    assert len(ours) == 2 and max(len(c.token_ids) for c in ours) > most
    tail = max(ours, key=lambda c: len(c.token_ids))
    answer = long.generate([tail], "Which word?", log_query=False)  # the default answer budget
    assert answer.trace.left_out == []


def test_ingest_text_checks_its_source_and_progress(rag):
    """A Path as source failed in the index driver; a non-callable progress failed after the
    document was recorded, leaving it with no chunks."""
    documents = rag.index.stats()["documents"]
    with pytest.raises(TypeError, match="the document's source must be a str, got PosixPath"):
        rag.ingest_text("a.md", "Some text.", source=Path("a.md"))
    with pytest.raises(TypeError, match="progress must be a function of .* got bool"):
        rag.ingest_text("a.md", "Some text.", progress=True)
    assert rag.index.stats()["documents"] == documents


def test_load_documents_takes_one_path_alone(tmp_path: Path):
    """A single path string was split into one path per character."""
    from ragkv.documents import load_documents

    (tmp_path / "notes.md").write_text("Some notes.\n")
    for given in (str(tmp_path / "notes.md"), tmp_path / "notes.md"):
        assert [d.name for d in load_documents(given).documents] == [
            str((tmp_path / "notes.md").resolve())]


def test_config_must_be_a_ragkv_config():
    with pytest.raises(TypeError, match="config must be a RagkvConfig, got dict"):
        RagKV({"chunk_tokens": 64})


def test_names_longer_than_the_index_keeps_are_refused_on_every_database(rag):
    """SQLite ignores the name column's length and PostgreSQL enforces it: a 600-character
    name went in on one and failed in the database driver on the other."""
    documents = rag.index.stats()["documents"]
    with pytest.raises(ValueError, match="the document's name is 600 characters; the cache "
                                         "index keeps at most 512"):
        rag.ingest_text("n" * 600, "Some text.")
    with pytest.raises(ValueError, match="the document's source is 2,100 characters"):
        rag.ingest_text("a.md", "Some text.", source="s" * 2100)
    assert rag.index.stats()["documents"] == documents
