"""Chunking against the real SmolLM2 tokenizer: bounded sizes, exact offsets, clean cuts."""

from __future__ import annotations

import re
import unicodedata
from typing import Any

import pytest

from ragkv.chunking import CHUNK_SPREAD, TextChunk, chunk_text, tokenize_chunk


def _paragraphs(n: int) -> str:
    return "\n\n".join(
        f"Paragraph {i} explains how the cache index stores chunk {i}. It keeps the token ids, "
        f"the model fingerprint and the blob location, so a later query can reuse it."
        for i in range(n)
    )


CODE = '''
def fetch(url: str) -> bytes:
    """Download ``url``."""
    with open(url, "rb") as fh:
        return fh.read()


class Cache:
    def get(self, key):
        return self._data.get(key)
'''

MIXED = (
    "\n\n\n  "
    + _paragraphs(12)
    + "\n\n"
    + CODE * 6
    + "\n"
    + " ".join(f"word{i}" for i in range(400))  # one long line: only word boundaries
    + "\n\nUnicode: caf\u00e9 na\u00efve \u65e5\u672c\u8a9e\u306e\u30c6\u30ad\u30b9\u30c8 "
    + "\U0001f600\U0001f680\U0001f9e0 " * 40
    + "\n"
    + "x" * 3000  # no whitespace at all: cuts must fall between tokens
    + "\n\n   \n"
)


def _nonspace(text: str) -> str:
    return re.sub(r"\s+", "", text)


def _check(source: str, chunks: list[TextChunk], tokenizer: Any, chunk_tokens: int) -> None:
    assert chunks, "non-empty text must give chunks"
    enc = tokenizer(source, add_special_tokens=False, return_offsets_mapping=True, verbose=False)
    offsets = [(a, b) for a, b in enc["offset_mapping"] if b > a]
    prev_end = 0
    for chunk in chunks:
        assert chunk.text == source[chunk.start : chunk.end]
        assert chunk.text.strip(), "whitespace-only chunks are dropped"
        assert chunk.text == chunk.text.rstrip()
        assert chunk.start >= prev_end, "chunks are ordered and disjoint"
        assert len(chunk.token_ids) <= CHUNK_SPREAD * chunk_tokens
        assert chunk.token_ids == tokenize_chunk(chunk.text, tokenizer)
        assert chunk.token_ids == tokenizer(chunk.text, add_special_tokens=False)["input_ids"]
        prev_end = chunk.end
    assert _nonspace("".join(c.text for c in chunks)) == _nonspace(source)
    for left, right in zip(chunks, chunks[1:], strict=False):
        for a, b in offsets:  # no token of the whole text has characters in two chunks
            assert not (a < left.end and b > right.start), (a, b, left.end, right.start)


@pytest.mark.parametrize("chunk_tokens", [16, 64, 200, 512])
def test_mixed_document(tokenizer: Any, chunk_tokens: int) -> None:
    chunks = chunk_text(MIXED, tokenizer, chunk_tokens)
    _check(MIXED, chunks, tokenizer, chunk_tokens)
    total = len(tokenize_chunk(MIXED, tokenizer))
    # Chunks are at least about half the target, so their number stays bounded.
    assert len(chunks) <= total / (chunk_tokens * 0.4) + 2


def test_prefers_paragraph_breaks(tokenizer: Any) -> None:
    source = _paragraphs(20)
    chunks = chunk_text(source, tokenizer, 100)
    _check(source, chunks, tokenizer, 100)
    assert len(chunks) > 3
    for chunk in chunks[:-1]:
        assert source[chunk.end : chunk.end + 2] == "\n\n"
    for chunk in chunks:
        assert chunk.text.startswith("Paragraph ")


def test_prefers_line_breaks_and_keeps_indentation(tokenizer: Any) -> None:
    source = CODE.strip("\n").replace("\n\n", "\n") * 10
    chunks = chunk_text(source, tokenizer, 48)
    _check(source, chunks, tokenizer, 48)
    for chunk in chunks:
        assert chunk.start == 0 or source[chunk.start - 1] == "\n"
    assert any(c.text.startswith("    ") for c in chunks), "indented first lines stay indented"


def test_short_text_is_one_stripped_chunk(tokenizer: Any) -> None:
    source = "\n\n  Hello there.\n   \n"
    (chunk,) = chunk_text(source, tokenizer, 64)
    assert chunk.text == "  Hello there."
    assert (chunk.start, chunk.end) == (2, 16)


@pytest.mark.parametrize("source", ["", "   ", "\n\n\t\n"])
def test_blank_text_gives_no_chunks(tokenizer: Any, source: str) -> None:
    assert chunk_text(source, tokenizer, 64) == []


def test_tokenize_chunk_has_no_special_tokens(tokenizer: Any) -> None:
    ids = tokenize_chunk("Hello world", tokenizer)
    assert ids == tokenizer("Hello world", add_special_tokens=False)["input_ids"]
    assert tokenizer.bos_token_id not in ids


def test_rejects_bad_size(tokenizer: Any) -> None:
    with pytest.raises(ValueError):
        chunk_text("text", tokenizer, 0)


def test_a_long_text_is_tokenized_one_segment_at_a_time(tokenizer: Any, monkeypatch) -> None:
    """A 19 MB document grew the process by ~4 GB: it was tokenized whole, with offsets. Its
    segments now go to the tokenizer one at a time, each cut at a paragraph break, and the
    chunks still cover the text as a whole text's do."""
    from ragkv import chunking

    source = _paragraphs(20) + "\n\n" + CODE * 8 + " ".join(f"word{i}" for i in range(400))
    seen: list[int] = []
    real = chunking.encode_text
    monkeypatch.setattr(chunking, "encode_text",
                        lambda tok, text, **kw: seen.append(len(text)) or real(tok, text, **kw))
    monkeypatch.setattr(chunking, "SEGMENT_CHARS", 1500)
    done: list[tuple[int, int]] = []
    chunks = chunk_text(source, tokenizer, 64, progress=lambda *moved: done.append(moved))
    assert max(n for n in seen if n > 600) <= 1500 < len(source)
    _check(source, chunks, tokenizer, 64)
    spans = chunking.segments(source)
    assert [b for _, b in spans] == [b for b, _ in done] and done[-1] == (len(source),) * 2
    assert all(source[b - 2:b] in ("\n\n", "\n") or source[b - 1] == " " for _, b in spans[:-1])


@pytest.mark.parametrize("source", [MIXED, _paragraphs(40), "x" * 5000])
def test_segments_partition_the_text(source: str) -> None:
    from ragkv.chunking import segments

    spans = segments(source, 1000)
    assert spans[0][0] == 0 and spans[-1][1] == len(source)
    assert all(b == c for (_, b), (c, _) in zip(spans, spans[1:], strict=False))
    assert all(500 <= b - a <= 1000 for a, b in spans[:-1])
    assert segments(source, len(source)) == [(0, len(source))]


@pytest.mark.parametrize("text,stop", [
    ("".join(f"这是第{i}个句子，它描述了缓存的工作原理。" for i in range(120)), "。"),
    ("".join(f"これは{i}番目の文です。キャッシュの仕組みを説明します。" for i in range(90)), "。"),
    ("".join(f"「第{i}の文です。」次も続きます！" for i in range(120)), ("」", "！")),
])
def test_text_without_spaces_is_cut_at_its_sentence_ends(tokenizer: Any, text: str,
                                                         stop: str) -> None:
    chunks = chunk_text(text, tokenizer, 64)
    _check(text, chunks, tokenizer, 64)
    assert len(chunks) > 5 and all(c.text.endswith(stop) for c in chunks[:-1])


def _starts_inside_a_character(text: str, chunk: TextChunk) -> bool:
    first = text[chunk.start]
    regional = sum(1 for ch in text[:chunk.start] if "\U0001f1e6" <= ch <= "\U0001f1ff")
    return (unicodedata.category(first).startswith("M") or first in "\u200d\ufe0f"
            or "\U0001f3fb" <= first <= "\U0001f3ff"
            or ("\U0001f1e6" <= first <= "\U0001f1ff" and regional % 2 == 1))


@pytest.mark.parametrize("text", [
    unicodedata.normalize("NFD", "éèêëàâäôöûüç " * 200),  # accents as combining marks
    unicodedata.normalize("NFD", "é" * 1500),  # one long word of them
    "\U0001f1e9\U0001f1ea\U0001f1eb\U0001f1f7\U0001f1ef\U0001f1f5" * 300,  # flags: pairs
    "".join(["👍🏽 ", "❤️ ", "👩‍💻 "][i % 3] for i in range(600)),  # modifier, selector, ZWJ
    "นี่คือประโยคที่ซึ่งอธิบายการทำงานของแคช " * 60,  # Thai: marks above and below
])
def test_no_cut_inside_a_character(tokenizer: Any, text: str) -> None:
    chunks = chunk_text(text, tokenizer, 32)
    _check(text, chunks, tokenizer, 32)
    assert len(chunks) > 5
    assert [c.text[:3] for c in chunks if _starts_inside_a_character(text, c)] == []
