"""What a question gets back: the stream of an answer's text as it is decoded, and the
:class:`Answer` it leaves (text, tokens, trace, prompt, first-token distribution)."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from ragkv.chunking import RetrievedChunk
from ragkv.engine.base import Backend, Generation, NextToken
from ragkv.prompt import AssembledPrompt
from ragkv.trace import QueryTrace


class Facade(Protocol):
    """What a stream reads of the facade that made it (:class:`ragkv.api.RagKV`)."""

    backend: Backend
    tokenizer: Any

    def _log(self, question: str, trace: QueryTrace, text: str) -> None: ...


@dataclass
class Answer:
    text: str
    tokens: list[int]
    trace: QueryTrace
    prompt: AssembledPrompt
    first: NextToken  # the first token's distribution (top-k; full logits in process)
    generation: Generation | None = None  # kept only when asked for (bench scoring)

    def score(self, target: Sequence[int]) -> list[NextToken]:
        """Teacher-forced next-token distributions on this answer's prefill (``keep=True``)."""
        if self.generation is None:
            raise RuntimeError("ask with keep_kv=True to score an answer")
        return self.generation.score(target)


class TokenStream:
    """Text pieces of an answer as they are decoded; ``answer`` is set once exhausted.

    The prefill (and so the TTFT in the trace) has already happened when this is returned.
    """

    def __init__(self, rag: Facade, question: str, prompt: AssembledPrompt,
                 gen: Generation, keep: bool, log_query: bool,
                 chunks: Sequence[RetrievedChunk] = ()) -> None:
        self._rag, self.question, self.prompt = rag, question, prompt
        self._gen, self._keep, self._log = gen, keep, log_query
        self.trace: QueryTrace = gen.trace
        #: the chunks the prompt holds, in its order (the ones handed in, as given, less those
        #: left out for the window, ``trace.left_out``): an answer's sources
        self.chunks = list(chunks)
        self.answer: Answer | None = None

    def _tokens(self) -> Iterator[int]:
        yield self._gen.first_token
        if self._gen.first_token not in self._rag.backend.eos_token_ids:
            yield from self._gen.rest()

    def __iter__(self) -> Iterator[str]:
        """The pieces join to ``answer.text``: the answer's leading and trailing whitespace is
        left out, and whitespace inside it is held until the text after it comes (streamed
        as decoded, they began "\n\n" or a space where the answer does not)."""
        if self.answer is not None:  # drained already: an exhausted stream yields nothing
            return
        held, started = "", False
        for piece in self._pieces():
            if not started:
                piece = piece.lstrip()
                started = bool(piece)
            text = piece.rstrip()
            if text:
                yield held + text
                held = piece[len(text):]
            else:
                held += piece

    def _pieces(self) -> Iterator[str]:
        eos = self._rag.backend.eos_token_ids
        decode = self._rag.tokenizer.decode
        tokens: list[int] = []
        shown = ""
        try:
            for tok in self._tokens():
                tokens.append(tok)
                if tok in eos:
                    continue
                text = decode([t for t in tokens if t not in eos], skip_special_tokens=True)
                if len(text) > len(shown) and not text.endswith("\ufffd"):  # whole chars only
                    yield text[len(shown):]
                    shown = text
        finally:
            if not self._keep:
                self._gen.close()
        text = decode([t for t in tokens if t not in eos], skip_special_tokens=True)
        if len(text) > len(shown):
            yield text[len(shown):]
        if self._log:
            self._rag._log(self.question, self.trace, text)
        self.answer = Answer(text.strip(), tokens, self.trace, self.prompt, self._gen.first,
                             self._gen if self._keep else None)
