"""Split documents into token-bounded chunks whose KV caches are computed once and reused.

Chunks are cut only between tokens of the whole-document tokenization (so a cut never lands in
the middle of a word piece), preferring a blank line, then a line break, then a sentence end,
then any whitespace. Each chunk's ``token_ids`` are the chunk text tokenized on its own, because
that is exactly what gets prefilled and cached: a cached chunk must not depend on its neighbours.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

# Boundary ranks: higher is a better place to cut.
_NONE, _WORD, _SENTENCE, _LINE, _PARAGRAPH = 0, 1, 2, 3, 4
_WS_RUN = re.compile(r"\s+")
# A remainder this much over the target is kept whole rather than leaving a tiny last chunk.
_TAIL_SLACK = 1.1
# Cuts are only considered after this fraction of the target (counted in whole-text tokens).
_MIN_FRACTION = 0.5


@dataclass
class TextChunk:
    """One chunk: ``text == source[start:end]`` (character offsets into the source text)."""

    text: str
    token_ids: list[int]
    start: int
    end: int


@dataclass
class RetrievedChunk:
    """A chunk as a retriever hands it out: text, token ids and its cache key."""

    token_ids: list[int]
    key: str
    text: str = ""
    chunk_id: int | None = None
    document: str | None = None
    score: float | None = None


def tokenize_chunk(text: str, tokenizer: Any) -> list[int]:
    """Token ids of ``text`` on its own, without BOS/EOS: the ids a chunk is cached under."""
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _boundary_ranks(text: str) -> list[int]:
    """Rank of cutting at each character position (0..len), from the whitespace around it."""
    ranks = [_NONE] * (len(text) + 1)
    for m in _WS_RUN.finditer(text):
        run = m.group()
        newlines = run.count("\n")
        if newlines >= 2:
            rank = _PARAGRAPH
        elif newlines == 1:
            rank = _LINE
        elif m.start() > 0 and text[m.start() - 1] in ".!?;:":
            rank = _SENTENCE
        else:
            rank = _WORD
        # Inside a run with a line break, cut at or before the last newline so the next chunk
        # keeps the indentation of its first line; further right counts as a plain word break.
        last_cut = m.start() + run.rfind("\n") + 1 if newlines else m.end()
        for pos in range(m.start(), m.end() + 1):
            ranks[pos] = max(ranks[pos], rank if pos <= last_cut else _WORD)
    return ranks


def _strip_blank_lines(text: str, start: int, end: int) -> tuple[int, int]:
    """Shrink ``[start, end)`` past leading whitespace-only lines and trailing whitespace.

    Leading spaces of the first real line are kept when the chunk starts at a line start
    (indentation matters in code and lists); mid-line, the space before a word is dropped.
    """
    while start < end:
        newline = text.find("\n", start, end)
        if newline == -1 or text[start:newline].strip():
            break
        start = newline + 1
    if start > 0 and text[start - 1] != "\n":
        while start < end and text[start] in " \t":
            start += 1
    while end > start and text[end - 1].isspace():
        end -= 1
    if not text[start:end].strip():
        return start, start
    return start, end


def _pick_cut(
    pos: int, n: int, chunk_tokens: int, offsets: list[tuple[int, int]], ranks: list[int]
) -> int:
    """Index of the first token of the next chunk, given the current chunk starts at ``pos``."""
    lo = pos + max(1, int(chunk_tokens * _MIN_FRACTION))
    hi = min(n - 1, pos + chunk_tokens)
    best_j, best_rank = -1, -1
    for j in range(lo, hi + 1):
        a_j, b_prev = offsets[j][0], offsets[j - 1][1]
        if a_j < b_prev:  # overlapping offsets: both tokens are pieces of one character
            continue
        rank = max(ranks[a_j], ranks[b_prev])
        if rank >= best_rank:  # ties go to the later cut: bigger chunks, fewer of them
            best_j, best_rank = j, rank
    if best_j == -1:  # only overlapping pieces in the window: cut at the first clean place
        best_j = next((j for j in range(hi + 1, n) if offsets[j][0] >= offsets[j - 1][1]), n)
    return best_j


def chunk_text(text: str, tokenizer: Any, chunk_tokens: int = 512) -> list[TextChunk]:
    """Split ``text`` into chunks of about ``chunk_tokens`` tokens (at most ~1.25x that)."""
    if chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be positive, got {chunk_tokens}")
    if not getattr(tokenizer, "is_fast", False):
        raise TypeError("chunk_text needs a fast (Rust) tokenizer: it relies on offset mappings")
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True, verbose=False)
    offsets = [(int(a), int(b)) for a, b in enc["offset_mapping"]]
    n = len(offsets)
    if n == 0:
        return []
    ranks = _boundary_ranks(text)

    spans: list[tuple[int, int]] = []
    pos = 0
    while pos < n:
        if n - pos <= int(chunk_tokens * _TAIL_SLACK):
            cut = n
        else:
            cut = _pick_cut(pos, n, chunk_tokens, offsets, ranks)
        spans.append((offsets[pos][0], offsets[cut - 1][1]))
        pos = cut

    chunks: list[TextChunk] = []
    for raw_start, raw_end in spans:
        start, end = _strip_blank_lines(text, raw_start, raw_end)
        if start >= end:
            continue
        piece = text[start:end]
        chunks.append(TextChunk(piece, tokenize_chunk(piece, tokenizer), start, end))
    return chunks
