"""Prompt assembly from token ids only (docs/design.md §3.1).

A prompt is ``[template prefix] [chunk 1] [sep] ... [sep] [chunk k] [question suffix]``. The
template is rendered once with sentinels and split into pieces that are tokenized on their own;
chunks keep the ids they were tokenized with at ingestion. Texts are never joined and
re-tokenized, so BPE never merges across a seam and cached KV always matches its tokens.
"""

from __future__ import annotations

import operator
from collections.abc import Sequence
from dataclasses import dataclass, field

from ragkv.chunking import encoded_ids, shown, tokenize_chunk
from ragkv.text_decoding import has_text

_CTX = "\u2063RAGKV_CONTEXT\u2063"
_Q = "\u2063RAGKV_QUESTION\u2063"


@dataclass(frozen=True)
class AssembledPrompt:
    """Token ids of one prompt and where each segment lies.

    chunk_spans: ``[start, end)`` positions of each chunk, in prompt order.
    prefix_len: tokens of the template prefix (positions ``[0, prefix_len)``).
    suffix_start: first position of the question suffix (always computed).
    """

    ids: list[int]
    prefix_len: int
    chunk_spans: list[tuple[int, int]]
    suffix_start: int

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def chunk_tokens(self) -> int:
        return sum(e - s for s, e in self.chunk_spans)

    def uncached_positions(self) -> list[int]:
        """Positions that no cache entry covers: separators and the suffix."""
        covered = [False] * len(self.ids)
        for i in range(self.prefix_len):
            covered[i] = True
        for s, e in self.chunk_spans:
            for i in range(s, e):
                covered[i] = True
        return [i for i, c in enumerate(covered) if not c]


def require_str(value: object, what: str) -> None:
    """A ``TypeError`` naming ``what`` unless ``value`` is a str (text the user hands in), and
    a ``ValueError`` where it holds what no tokenizer reads (a lone surrogate, as a badly
    decoded file or a JSON escape leaves)."""
    if not isinstance(value, str):
        raise TypeError(f"{what} must be a str, got {type(value).__name__}")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError(f"{what} is not valid text: {exc.object[exc.start:exc.end]!r} at "
                         f"character {exc.start} is half of a surrogate pair") from None


def check_question(question: object) -> None:
    """A question is a string with some text: a ``TypeError`` or a ``ValueError`` otherwise."""
    require_str(question, "the question")
    if not has_text(question):  # zero-width characters alone show nothing either
        raise ValueError("the question is empty")


@dataclass(frozen=True)
class PromptTemplate:
    """The model's chat template cut into token-id pieces around context and question."""

    prefix_ids: tuple[int, ...]
    sep_ids: tuple[int, ...]
    suffix_head: str
    suffix_tail: str
    tokenizer: object = field(repr=False, compare=False, hash=False)

    @classmethod
    def from_tokenizer(cls, tokenizer, system_prompt: str) -> PromptTemplate:
        text = _rendered(tokenizer, system_prompt)
        head, rest = text.split(_CTX)
        mid, tail = rest.split(_Q)
        prefix = _encode(tokenizer, head)
        bos = getattr(tokenizer, "bos_token_id", None)
        adds_bos = bos is not None and encoded_ids(tokenizer("a"))[:1] == [bos]
        if adds_bos and prefix[:1] != [bos]:
            prefix = [bos, *prefix]
        return cls(tuple(prefix), tuple(_encode(tokenizer, "\n\n")), mid, tail, tokenizer)

    def anchor_ids(self, text: str) -> tuple[int, ...]:
        """The anchor passage as it stands before a chunk: its ids and the chunk separator."""
        return (*tokenize_chunk(text.strip(), self.tokenizer), *self.sep_ids)

    def suffix_ids(self, question: str) -> list[int]:
        check_question(question)
        text = self.suffix_head + question.strip()
        if tokenize_chunk(question, self.tokenizer) == _encode(self.tokenizer, question):
            return _encode(self.tokenizer, text + self.suffix_tail)  # as it always was
        # A question that spells a special token: that spelling is text, the template's own
        # closing tokens stay tokens.
        return tokenize_chunk(text, self.tokenizer) + _encode(self.tokenizer, self.suffix_tail)

    def chunk_ids(self, chunk: str | Sequence[int], i: int = 0) -> list[int]:
        """Chunk ``i``'s token ids: its text tokenized on its own (as ingestion does), or the
        ids given, checked to be whole numbers within the tokenizer's vocabulary. A chunk
        that is neither, or has no tokens, is a ``ValueError`` that names it."""
        if isinstance(chunk, bytes | bytearray | memoryview):  # would iterate as byte values
            raise TypeError(f"chunk {i} is {type(chunk).__name__}; decode it to text first "
                            f"(e.g. data.decode('utf-8'))")
        if isinstance(chunk, str):
            require_str(chunk, f"chunk {i}")
            if chunk and not has_text(chunk):  # as a question: blanks alone are no context
                raise ValueError(f"chunk {i} is empty: it holds only whitespace or invisible "
                                 "characters")
            ids = tokenize_chunk(chunk, self.tokenizer)
        else:
            try:
                ids = [operator.index(t) for t in chunk]
            except TypeError:
                raise ValueError(f"chunk {i} must be its text, its token ids or a "
                                 f"RetrievedChunk; got {shown(chunk)}") from None
        if not ids:
            raise ValueError(f"chunk {i} has no tokens")
        vocab = len(self.tokenizer) if hasattr(self.tokenizer, "__len__") else None
        bad = next((t for t in ids if t < 0 or (vocab is not None and t >= vocab)), None)
        if bad is not None:
            raise ValueError(f"chunk {i} holds token id {bad}, outside the tokenizer's "
                             f"vocabulary (0..{'?' if vocab is None else vocab - 1})")
        return ids

    def assemble(self, chunks: Sequence[Sequence[int]], question: str) -> AssembledPrompt:
        ids = list(self.prefix_ids)
        spans: list[tuple[int, int]] = []
        for i, chunk in enumerate(chunks):
            chunk = self.chunk_ids(chunk, i)
            if i:
                ids.extend(self.sep_ids)
            spans.append((len(ids), len(ids) + len(chunk)))
            ids.extend(chunk)
        suffix_start = len(ids)
        ids.extend(self.suffix_ids(question))
        return AssembledPrompt(ids, len(self.prefix_ids), spans, suffix_start)


def _rendered(tokenizer, system_prompt: str) -> str:
    """The prompt in the model's chat format around the two sentinels. The system prompt is a
    system turn; where the template refuses one (Mistral's raise) or leaves it out, it opens
    the user turn instead. Without a chat template: a plain format. A template that renders
    no user turn at all is a ``ValueError`` that says why."""
    user = f"Context:\n{_CTX}\n\nQuestion: {_Q}"
    if not getattr(tokenizer, "chat_template", None):
        return f"{system_prompt}\n\n{user}\nAnswer:"
    folded = f"{system_prompt}\n\n{user}" if system_prompt.strip() else user
    error = None
    for messages in ([{"role": "system", "content": system_prompt},
                      {"role": "user", "content": user}],
                     [{"role": "user", "content": folded}]):
        try:
            text = tokenizer.apply_chat_template(messages, tokenize=False,
                                                 add_generation_prompt=True)
        except Exception as exc:  # the template's own raise_exception, or a template bug
            error = exc
            continue
        if (system_prompt.strip() in text and text.count(_CTX) == 1
                and text.index(_CTX) < text.index(_Q) and text.count(_Q) == 1):
            return text
    raise ValueError("the tokenizer's chat template renders no user turn with the context and "
                     "the question" + (f": {error}" if error else " (it drops or repeats them)"))


def _encode(tokenizer, text: str) -> list[int]:
    """The template's own text: its special tokens are tokens."""
    return encoded_ids(tokenizer(text, add_special_tokens=False))
