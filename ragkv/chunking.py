"""Split documents into token-bounded chunks whose KV caches are computed once and reused.

Chunks are cut only between tokens of the whole-document tokenization (so a cut never lands in
the middle of a word piece), preferring a blank line, then a line break, then a sentence end
(CJK full stops too), then any whitespace or CJK comma, and never inside a character a
combining mark, joiner, variation selector or flag pair builds, where any other place will do.
Each chunk's ``token_ids`` are the chunk text tokenized on its own, because that is exactly
what gets prefilled and cached: a cached chunk must not depend on its neighbours.
"""

from __future__ import annotations

import functools
import hashlib
import json
import operator
import re
import unicodedata
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

# Boundary ranks: higher is a better place to cut; _INSIDE only where no other place is left.
_INSIDE, _NONE, _WORD, _SENTENCE, _LINE, _PARAGRAPH = -1, 0, 1, 2, 3, 4
_WS_RUN = re.compile(r"\s+")
# Scripts that put no space between sentences: a full stop (and the closing quotes or
# brackets after it) ends one; a comma is as good as a space between words.
_CJK_SENTENCE = re.compile("[\u3002\uff01\uff1f\uff1b\uff0e\u0964\u0965][\u300d\u300f\uff09"
                           "\u201d\u2019\u300b\u3011]*")
_CJK_PAUSE = re.compile("[\uff0c\u3001\uff1a]")
_NON_ASCII = re.compile(r"[^\x00-\x7f]")
# A remainder this much over the target is kept whole rather than leaving a tiny last chunk.
_TAIL_SLACK = 1.1
#: How far past ``chunk_tokens`` a chunk may run: the last one up to the tail slack, and a
#: chunk tokenized alone a few tokens more than it counted in the whole text.
CHUNK_SPREAD = 1.25
# Cuts are only considered after this fraction of the target (counted in whole-text tokens).
_MIN_FRACTION = 0.5
#: A text longer than this many characters is chunked one segment at a time: tokenizing it
#: whole with offsets held ~180 bytes a character (a 4 MiB text grew the process by 750 MB, a
#: 19 MB one by ~4 GB). Every document shorter than this is chunked exactly as a whole.
SEGMENT_CHARS = 2**20
_SEGMENT_BREAKS = ("\n\n", "\n", ". ", "\u3002", " ")


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


def encode_text(tokenizer: Any, text: str, **kwargs: Any) -> Any:
    """The tokenizer's encoding of content (a document's text, a question), in which a
    special token's spelling is plain text: a page that mentions ``<|im_end|>`` or
    ``<filename>`` must not end the user's turn or open a file in the prompt. On text without
    such a spelling it is the plain encoding, id for id."""
    try:
        return tokenizer(text, add_special_tokens=False, split_special_tokens=True, **kwargs)
    except TypeError:  # a tokenizer of the app's own, with no special-token parsing to turn off
        return tokenizer(text, add_special_tokens=False, **kwargs)


def encoded_ids(encoding: Any) -> list[int]:
    """The token ids in what a tokenizer returned for one text. A Hugging Face tokenizer's
    encoding gives them both as ``encoding["input_ids"]`` and as ``encoding.input_ids``; a
    tokenizer of the app's own may give either, or the list of ids itself; a list, a 1-D tensor
    or an array of ints. Anything else is a ``TypeError`` that says what ragkv reads."""
    if isinstance(encoding, Mapping):
        ids = encoding.get("input_ids")
    elif isinstance(encoding, (list, tuple)) or hasattr(encoding, "ndim"):  # (tensor, array)
        ids = encoding
    else:
        ids = getattr(encoding, "input_ids", None)
    if ids is None:
        raise TypeError(f"the tokenizer returned a {type(encoding).__name__}; ragkv reads "
                        "token ids as its 'input_ids' (a key or an attribute) or a list of ints")
    try:  # ints from a list, a 1-D tensor or array alike; a batch of texts' ids is refused
        if getattr(ids, "ndim", 1) != 1:  # (a [1, n] tensor's row would pass as one int)
            raise TypeError
        return [operator.index(t) for t in ids]
    except TypeError:
        raise TypeError("the tokenizer's input_ids must be one text's token ids, a flat "
                        f"sequence of ints; got {shown(ids)}") from None


def shown(value: object) -> str:
    """A short description of a value handed in by mistake: its type and the start of it."""
    text = repr(value)
    return f"{type(value).__name__} {text[:40]}{'...' if len(text) > 40 else ''}"


def tokenizer_identity(tokenizer: Any) -> str:
    """SHA-256 of what a text's token ids depend on: a fast tokenizer's whole definition
    (normalizer, pre-tokenizer, vocabulary, merges, added tokens), else its vocabulary. Two
    tokenizers with one identity give every text the same ids."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        payload = backend.to_str()
    else:
        vocab = tokenizer.get_vocab() if hasattr(tokenizer, "get_vocab") else {}
        payload = json.dumps([type(tokenizer).__name__, sorted(vocab.items())])
    return hashlib.sha256(payload.encode()).hexdigest()


def tokenize_chunk(text: str, tokenizer: Any) -> list[int]:
    """Token ids of ``text`` on its own, without BOS/EOS, a special token's spelling read as
    text: the ids a chunk is cached under (and a question's or the anchor passage's)."""
    return encoded_ids(encode_text(tokenizer, text))


@functools.cache
def _byte_values() -> dict[str, int]:
    """GPT-2's byte-level alphabet: the character that stands for each byte in a token."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("\xa1"), ord("\xac") + 1),
                 *range(ord("\xae"), ord("\xff") + 1)]
    others = [b for b in range(256) if b not in printable]
    return {**{chr(b): b for b in printable}, **{chr(256 + i): b for i, b in enumerate(others)}}


def _offsets(text: str, tokenizer: Any, enc: Any) -> list[tuple[int, int]]:
    """Character offsets of the tokens of ``text``, corrected where a byte-level tokenizer
    dropped bytes its vocabulary lacks (SmolLM2 has no token for some control bytes): it then
    reports the offsets of the later tokens of the same word too early. Each token is a byte
    string there, and the text's bytes are the tokens' bytes in order with the dropped ones
    between them, so the true offsets are found by walking both."""
    reported = [(int(a), int(b)) for a, b in enc["offset_mapping"]]
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if type(getattr(backend, "decoder", None)).__name__ != "ByteLevel":
        return reported
    tokens = tokenizer.convert_ids_to_tokens(encoded_ids(enc))
    data = text.encode()
    if sum(map(len, tokens)) == len(data):  # nothing dropped: the offsets are right
        return reported
    table = _byte_values()
    char_of = [i for i, ch in enumerate(text) for _ in ch.encode()] + [len(text)]
    fixed, at = [], 0
    for token in tokens:
        if any(ch not in table for ch in token):  # not a byte string (an added token)
            return reported
        piece = bytes(table[ch] for ch in token)
        span = _walk(data, piece, at)
        if span is None:  # not the text's bytes in order: keep what the tokenizer said
            return reported
        found, at = span
        fixed.append((char_of[found], char_of[at - 1] + 1 if piece else char_of[found]))
    return fixed


def _walk(data: bytes, piece: bytes, at: int) -> tuple[int, int] | None:
    """Where ``piece`` lies in ``data`` from ``at``: ``(first byte, one past the last)``, its
    bytes in order with dropped bytes allowed between them (one token can span a control byte
    the vocabulary lacks, as " ." does in " \x06."); None if they are not there."""
    first = at
    for i, byte in enumerate(piece):
        at = data.find(byte, at)
        if at < 0:
            return None
        first = at if i == 0 else first
        at += 1
    return first, at


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
    if _NON_ASCII.search(text) is None:
        return ranks
    for m in _CJK_SENTENCE.finditer(text):
        ranks[m.end()] = max(ranks[m.end()], _SENTENCE)
    for m in _CJK_PAUSE.finditer(text):
        ranks[m.end()] = max(ranks[m.end()], _WORD)
    for m in _NON_ASCII.finditer(text):
        i = m.start()
        if i > 0 and _joins(text, i):
            ranks[i] = _INSIDE
        if i + 1 < len(text) and _joins(text, i + 1):
            ranks[i + 1] = _INSIDE
    return ranks


def _regional(ch: str) -> bool:
    return "\U0001f1e6" <= ch <= "\U0001f1ff"


def _joins(text: str, i: int) -> bool:
    """Whether ``text[i - 1]`` and ``text[i]`` belong to one user-perceived character."""
    prev, ch = text[i - 1], text[i]
    if (unicodedata.category(ch).startswith("M") or "\u200d" in (prev, ch)
            or "\ufe00" <= ch <= "\ufe0f" or "\U000e0100" <= ch <= "\U000e01ef"
            or "\U0001f3fb" <= ch <= "\U0001f3ff" or "\U000e0020" <= ch <= "\U000e007f"):
        return True
    if _regional(prev) and _regional(ch):  # flags are pairs: joined after an odd count
        run = 0
        while i - 1 - run >= 0 and _regional(text[i - 1 - run]):
            run += 1
        return run % 2 == 1
    return False


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


def _gap_cut(offsets: list[tuple[int, int]], ranks: list[int], j: int) -> tuple[int, int]:
    """Where to cut before token ``j``, and how good a place it is: ``(position, rank)``.

    Characters no token covers (whitespace some tokenizers skip, bytes a byte-level vocabulary
    lacks) lie between ``offsets[j - 1][1]`` and ``offsets[j][0]``; the cut takes the best rank
    in that gap, the later of equals, so they go with a neighbour and never get lost. Offsets
    that overlap (pieces of one character, or offsets a tokenizer misreported after bytes it
    dropped) leave no gap: the cut is at the start the tokenizer reports.
    """
    a, b = offsets[j][0], offsets[j - 1][1]
    if a <= b:
        return a, ranks[a] if a == b else _NONE
    best = max(range(b, a + 1), key=lambda p: (ranks[p], p))
    return best, ranks[best]


def _pick_cut(
    pos: int, n: int, chunk_tokens: int, offsets: list[tuple[int, int]], ranks: list[int]
) -> int:
    """Index of the first token of the next chunk, given the current chunk starts at ``pos``."""
    lo = pos + max(1, int(chunk_tokens * _MIN_FRACTION))
    hi = min(n - 1, pos + chunk_tokens)
    best_j, best_rank = -1, -1
    for j in range(lo, hi + 1):
        if offsets[j][0] < offsets[j - 1][1]:  # overlapping: both are pieces of one character
            continue
        rank = _gap_cut(offsets, ranks, j)[1]
        if rank >= best_rank:  # ties go to the later cut: bigger chunks, fewer of them
            best_j, best_rank = j, rank
    if best_j == -1:  # only overlapping pieces in the window: cut at the first clean place
        best_j = next((j for j in range(hi + 1, n) if offsets[j][0] >= offsets[j - 1][1]), n)
    return best_j


def _cut_positions(text: str, offsets: list[tuple[int, int]], chunk_tokens: int) -> list[int]:
    """Character positions ``0 = c0 <= c1 <= ... = len(text)`` that partition ``text``.

    Cuts are chosen between tokens of the whole-text tokenization; the pieces between them
    cover every character, so nothing the offsets fail to cover (or misplace) is ever lost.
    """
    ranks = _boundary_ranks(text)
    n = len(offsets)
    cuts = [0]
    pos = 0
    while n - pos > int(chunk_tokens * _TAIL_SLACK):
        pos = _pick_cut(pos, n, chunk_tokens, offsets, ranks)
        if pos >= n:
            break
        # Never before the last cut, even where offsets a tokenizer misreported go backwards.
        cuts.append(max(cuts[-1], _gap_cut(offsets, ranks, pos)[0]))
    cuts.append(len(text))
    return cuts


def chunk_text(text: str, tokenizer: Any, chunk_tokens: int = 512,
               progress: Callable[[int, int], None] | None = None) -> list[TextChunk]:
    """Split ``text`` into chunks of about ``chunk_tokens`` tokens (at most about
    :data:`CHUNK_SPREAD` times that).

    Every character except surrounding whitespace is in exactly one chunk. A piece the
    tokenizer has no token for (only characters it drops, like control bytes its vocabulary
    lacks) joins the chunk before it (or after it, at the start); a text with no token at all
    gives no chunk, like a blank one. A text over :data:`SEGMENT_CHARS` is chunked one
    segment at a time (:func:`segments`); ``progress`` is called after each with (characters
    done, characters in all).
    """
    if chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be positive, got {chunk_tokens}")
    if not getattr(tokenizer, "is_fast", False):
        raise TypeError("chunk_text needs a fast (Rust) tokenizer: it relies on offset mappings")
    chunks: list[TextChunk] = []
    for a, b in segments(text):
        chunks += [TextChunk(c.text, c.token_ids, c.start + a, c.end + a)
                   for c in _chunk_segment(text[a:b], tokenizer, chunk_tokens)]
        if progress:
            progress(b, len(text))
    return chunks


def segments(text: str, size: int | None = None) -> list[tuple[int, int]]:
    """``[start, end)`` spans that partition ``text``, each at most ``size`` characters
    (:data:`SEGMENT_CHARS`): one span where the text fits, else spans cut after the last
    paragraph break in each span's second half (else a line break, a sentence end, a space),
    which is where a chunk would end anyway."""
    size = size or SEGMENT_CHARS
    spans, start = [], 0
    while len(text) - start > size:
        end, floor = start + size, start + size // 2
        cut = next((at + len(sep) for sep in _SEGMENT_BREAKS
                    if (at := text.rfind(sep, floor, end)) != -1), end)
        spans.append((start, cut))
        start = cut
    return [*spans, (start, len(text))]


def _chunk_segment(text: str, tokenizer: Any, chunk_tokens: int) -> list[TextChunk]:
    enc = encode_text(tokenizer, text, return_offsets_mapping=True, verbose=False)
    offsets = _offsets(text, tokenizer, enc)
    if not offsets:
        return []
    cuts = _cut_positions(text, offsets, chunk_tokens)

    chunks: list[TextChunk] = []
    carried: int | None = None  # start of a leading piece that had no token of its own
    for raw_start, raw_end in zip(cuts, cuts[1:], strict=False):
        start, end = _strip_blank_lines(text, raw_start, raw_end)
        if start >= end:
            continue
        if carried is not None:
            start, carried = carried, None
        ids = tokenize_chunk(text[start:end], tokenizer)
        if not ids and chunks:  # nothing the tokenizer keeps: it joins the chunk before
            start = chunks.pop().start
            ids = tokenize_chunk(text[start:end], tokenizer)
        if not ids:  # no chunk before it: it joins the next one
            carried = start
            continue
        chunks.append(TextChunk(text[start:end], ids, start, end))
    return chunks
