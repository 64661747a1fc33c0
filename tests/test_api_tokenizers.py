"""One corpus, one tokenizer: chunk rows hold token ids, which are text only to the tokenizer
that made them. A model with another tokenizer on the same home retrieves the chunks' text
tokenized by its own, and cannot add chunks of its ids to that corpus."""

from __future__ import annotations

import copy

import pytest
from api_cases import (  # noqa: F401 - fixtures are used by name
    _docs,
    _one_thread,
    engine,
    make_config,
    rag,
    seed,
)
from tokenizers import normalizers
from typer.testing import CliRunner

from ragkv.anchor import ANCHOR_SETTING
from ragkv.api import RagKV
from ragkv.cache_index.corpus import TOKENIZER_SETTING, ForeignTokenizer
from ragkv.chunking import tokenize_chunk, tokenizer_identity
from ragkv.cli import app
from ragkv.engine.hf import HFEngine

QUESTION = "What does the assert statement do?"


@pytest.fixture(scope="module")
def lowercasing(engine) -> HFEngine:
    """The same weights behind a tokenizer that lowercases first: other ids for most text."""
    tok = copy.deepcopy(engine.tokenizer)
    tok.backend_tokenizer.normalizer = normalizers.Lowercase()
    assert tokenizer_identity(tok) != tokenizer_identity(engine.tokenizer)
    return HFEngine(engine.model, tok)


def test_the_identity_is_the_tokenizers_definition(engine):
    tok = engine.tokenizer
    assert tokenizer_identity(copy.deepcopy(tok)) == tokenizer_identity(tok)


def test_another_tokenizer_retrieves_the_text_tokenized_by_its_own(rag, lowercasing):
    other = RagKV(rag.config, engine=lowercasing)
    try:
        mine, theirs = rag.retrieve(QUESTION, 3), other.retrieve(QUESTION, 3)
        assert [c.text for c in mine] == [c.text for c in theirs]
        for c in theirs:
            assert c.token_ids == tokenize_chunk(c.text, lowercasing.tokenizer)
            assert c.key == other.key_for(c.token_ids)
        assert any(a.token_ids != b.token_ids for a, b in zip(mine, theirs, strict=True))
        for c in mine:  # the corpus's own tokenizer reads its stored ids
            assert c.token_ids == tokenize_chunk(c.text, rag.tokenizer)
        answer = other.generate(theirs, QUESTION, mode="blend", max_new_tokens=3)
        assert answer.trace.error is None and answer.trace.misses == len(theirs)
    finally:
        other.index.close()


def test_another_tokenizer_cannot_add_to_the_corpus_until_it_is_emptied(rag, lowercasing):
    other = RagKV(rag.config, engine=lowercasing)
    try:
        before = rag.index.stats()
        for name, text in (("doc:new", "The raise statement raises."),
                           ("doc:pass", _docs()["doc:pass"])):  # even one it holds already
            with pytest.raises(ForeignTokenizer, match="another model's tokenizer"):
                other.ingest_text(name, text)
        assert rag.index.stats() == before
        for name in ("doc:assert", "doc:pass"):
            rag.remove_document(name)
        assert rag.index.setting(TOKENIZER_SETTING) is None  # forgotten with the last chunk
        other.ingest_text("doc:new", "The raise statement raises.")
        assert rag.index.setting(TOKENIZER_SETTING) == other.tokenizer_identity
        with pytest.raises(ForeignTokenizer):
            rag.ingest_text("doc:pass", _docs()["doc:pass"])
    finally:
        other.index.close()


def test_the_cli_refuses_in_one_line(tmp_path, tiny_model, lowercasing):
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "a.md").write_text("The Assert Statement checks a condition. " * 30)
    home = tmp_path / "home"
    other = RagKV(make_config(home), engine=lowercasing)
    other.ingest_text("doc:x", "Another Model's Text.")
    other.index.close()
    out = CliRunner().invoke(app, ["ingest", str(docs), "--home", str(home),
                                   "--model", str(tiny_model)])
    assert out.exit_code == 2 and "another model's tokenizer" in out.output, out.output
    assert "Traceback" not in out.output
    other = RagKV(make_config(home), engine=lowercasing)
    assert other.index.setting(ANCHOR_SETTING) is None  # no passage picked for it either
    other.index.close()
