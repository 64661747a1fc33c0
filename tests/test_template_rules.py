"""Prompt template rules not covered by SmolLM2's tokenizer (which adds no BOS): the pieces
reassemble the model's own chat format, a BOS the tokenizer adds is in the prefix exactly once,
and no other piece carries special tokens (docs/design.md §3.1)."""

from __future__ import annotations

import copy
import re
from types import SimpleNamespace
from typing import Any

import pytest

from ragkv.prompt import PromptTemplate

SYSTEM = "Answer from the context."
BOS = 1


def _enc(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False).input_ids)


def test_pieces_reassemble_the_models_chat_format(tokenizer):
    """prefix + chunks + separators + suffix decode to the chat template rendered over the
    whole user turn (SmolLM2's real template)."""
    tpl = PromptTemplate.from_tokenizer(tokenizer, SYSTEM)
    chunks = ["First chunk text.", "Second one, with a tail"]
    question = "What is in the chunks?"
    p = tpl.assemble([_enc(tokenizer, c) for c in chunks], question)
    context = "\n\n".join(chunks)
    messages = [{"role": "system", "content": SYSTEM},
                {"role": "user", "content": f"Context:\n{context}\n\nQuestion: {question}"}]
    want = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert tokenizer.decode(p.ids) == want


class CharTokenizer:
    """One id per character (ord); with ``add_special_tokens`` (the default, as in
    transformers) a BOS first, as Llama's tokenizers do."""

    def __init__(self, bos: int | None = BOS, adds_bos: bool = True,
                 template: str | None = None) -> None:
        if bos is not None:
            self.bos_token_id = bos
        self.adds_bos = adds_bos
        if template is not None:
            self.chat_template = template

    def __call__(self, text: str, add_special_tokens: bool = True) -> SimpleNamespace:
        ids = [ord(ch) for ch in text]
        if add_special_tokens and self.adds_bos:
            ids = [self.bos_token_id, *ids]
        return SimpleNamespace(input_ids=ids)

    def apply_chat_template(self, messages, tokenize: bool, add_generation_prompt: bool) -> str:
        assert tokenize is False and add_generation_prompt is True
        text = "".join(f"[{m['role']}]{m['content']}" for m in messages)
        return self.chat_template + text + "[assistant]"


def _ords(text: str) -> list[int]:
    return [ord(ch) for ch in text]


def test_bos_the_tokenizer_adds_is_in_the_prefix_once():
    tok = CharTokenizer()  # no chat template attribute at all: the plain template
    tpl = PromptTemplate.from_tokenizer(tok, SYSTEM)
    head = f"{SYSTEM}\n\nContext:\n"
    assert list(tpl.prefix_ids) == [BOS, *_ords(head)]
    # Separators and the question suffix never carry a BOS: they sit mid-prompt.
    assert list(tpl.sep_ids) == _ords("\n\n")
    assert tpl.suffix_ids("why?") == _ords("\n\nQuestion: why?\nAnswer:")
    p = tpl.assemble([[50, 51], [52]], "why?")
    assert p.ids.count(BOS) == 1 and p.ids[0] == BOS


def test_a_template_that_renders_bos_itself_gets_no_second_one():
    tok = CharTokenizer(template=chr(BOS))  # the chat template text starts with the BOS
    tpl = PromptTemplate.from_tokenizer(tok, SYSTEM)
    assert list(tpl.prefix_ids) == [BOS, *_ords(f"[system]{SYSTEM}[user]Context:\n")]
    assert tpl.suffix_ids("why?") == _ords("\n\nQuestion: why?[assistant]")


def test_no_bos_when_the_tokenizer_adds_none():
    for tok in (CharTokenizer(adds_bos=False), CharTokenizer(bos=None, adds_bos=False)):
        tpl = PromptTemplate.from_tokenizer(tok, SYSTEM)
        assert list(tpl.prefix_ids) == _ords(f"{SYSTEM}\n\nContext:\n")


def test_empty_question_is_refused_by_name():
    tpl = PromptTemplate.from_tokenizer(CharTokenizer(), SYSTEM)
    for blank in (" \n", "\u200b\u200d \ufeff"):  # zero-width characters show nothing
        with pytest.raises(ValueError, match="^the question is empty$"):
            tpl.suffix_ids(blank)
    with pytest.raises(TypeError, match="^the question must be a str, got bytes$"):
        tpl.suffix_ids(b"why?")


class SizedTokenizer(CharTokenizer):
    """A vocabulary of 300 ids, as ``len(tokenizer)`` tells in transformers."""

    def __len__(self) -> int:
        return 300


def test_chunk_ids_take_text_or_ids_within_the_vocabulary():
    tpl = PromptTemplate.from_tokenizer(SizedTokenizer(), SYSTEM)
    assert tpl.chunk_ids("ab") == _ords("ab")  # tokenized on its own: no BOS
    assert tpl.chunk_ids([0, 299], 3) == [0, 299]
    for bad, says in (([300], "chunk 2 holds token id 300, outside the tokenizer's vocabulary "
                               "(0..299)"),
                      ([5, -1], "chunk 2 holds token id -1, outside")):
        with pytest.raises(ValueError, match=f"^{re.escape(says)}"):
            tpl.chunk_ids(bad, 2)
    # a tokenizer that does not tell its size: only negative ids are known to be wrong
    plain = PromptTemplate.from_tokenizer(CharTokenizer(), SYSTEM)
    assert plain.chunk_ids([10**6]) == [10**6]
    # blanks alone are no context (they tokenized as such and filled the prompt)
    for blank in (" \n\t ", "\u200b"):
        with pytest.raises(ValueError, match="^chunk 1 is empty: it holds only whitespace or "
                                             "invisible characters$"):
            tpl.chunk_ids(blank, 1)
    with pytest.raises(ValueError, match="^chunk 1 has no tokens$"):
        tpl.chunk_ids("", 1)
    assert tpl.chunk_ids(" a ") == _ords(" a ")
    with pytest.raises(ValueError, match=r"^chunk 0 holds token id -3, .* \(0\.\.\?\)$"):
        plain.chunk_ids([-3])


def test_text_no_tokenizer_reads_and_bytes_are_refused_by_name():
    tpl = PromptTemplate.from_tokenizer(SizedTokenizer(), SYSTEM)
    for data in (b"ab", bytearray(b"ab"), memoryview(b"ab")):  # would read as byte values
        with pytest.raises(TypeError) as err:
            tpl.chunk_ids(data, 1)
        assert str(err.value) == (f"chunk 1 is {type(data).__name__}; decode it to text first "
                                  "(e.g. data.decode('utf-8'))")
    with pytest.raises(ValueError) as err:
        tpl.chunk_ids("ok\ud800", 4)
    assert str(err.value) == ("chunk 4 is not valid text: '\\ud800' at character 2 is half of "
                              "a surrogate pair")
    with pytest.raises(ValueError, match=r"^the question is not valid text: '\\udc80' at "
                                         r"character 0 is half"):
        tpl.suffix_ids("\udc80why?")
    plain = PromptTemplate.from_tokenizer(CharTokenizer(), SYSTEM)
    assert plain.chunk_ids("é\U0001f600") == _ords("é\U0001f600")  # whole pairs are text


@pytest.mark.parametrize(("chunk", "shown"), [
    (42, "int 42"),
    ([0.5] * 8, f"list {[0.5] * 8!r}"),  # a repr of exactly 40 characters, whole
    ([0.5] * 7 + [10.5], f"list {repr([0.5] * 7 + [10.5])[:40]}..."),  # 41: cut
    ([0.5] * 9, f"list {repr([0.5] * 9)[:40]}..."),
])
def test_a_chunk_of_the_wrong_kind_is_named_in_short(chunk, shown):
    tpl = PromptTemplate.from_tokenizer(SizedTokenizer(), SYSTEM)
    with pytest.raises(ValueError) as err:
        tpl.chunk_ids(chunk)
    assert str(err.value) == ("chunk 0 must be its text, its token ids or a RetrievedChunk; "
                              f"got {shown}")


# A system turn refused (Mistral's template raises), left out, or no turn rendered at all.
REFUSES_SYSTEM = (
    "{{ bos_token }}{% for m in messages %}"
    "{% if (m['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant') }}"
    "{% endif %}{% if m['role'] == 'user' %}{{ '[INST] ' + m['content'] + ' [/INST]' }}"
    "{% endif %}{% endfor %}")
DROPS_SYSTEM = ("{% for m in messages %}{% if m['role'] == 'user' %}<|user|>{{ m['content'] }}\n"
                "{% endif %}{% endfor %}<|assistant|>")


@pytest.mark.parametrize("template", [REFUSES_SYSTEM, DROPS_SYSTEM])
def test_a_template_without_a_system_turn_opens_the_user_turn_with_it(tokenizer, template):
    tok = copy.copy(tokenizer)
    tok.chat_template = template
    tpl = PromptTemplate.from_tokenizer(tok, SYSTEM)
    chunks = ["First chunk text.", "Second one, with a tail"]
    question = "What is in the chunks?"
    p = tpl.assemble([_enc(tok, c) for c in chunks], question)
    context = "\n\n".join(chunks)
    user = f"{SYSTEM}\n\nContext:\n{context}\n\nQuestion: {question}"
    want = tok.apply_chat_template([{"role": "user", "content": user}], tokenize=False,
                                   add_generation_prompt=True)
    assert tok.decode(p.ids) == want
    assert SYSTEM in tok.decode(tpl.prefix_ids)


def test_no_system_prompt_leaves_the_user_turn_as_it_is(tokenizer):
    tok = copy.copy(tokenizer)
    tok.chat_template = REFUSES_SYSTEM
    for system in ("", " \n"):
        tpl = PromptTemplate.from_tokenizer(tok, system)
        assert tok.decode(tpl.prefix_ids) == tok.bos_token + "[INST] Context:\n"


def test_a_template_that_renders_no_user_turn_is_a_clear_error(tokenizer):
    tok = copy.copy(tokenizer)
    tok.chat_template = "{{ raise_exception('this model takes no chat') }}"
    with pytest.raises(ValueError, match=r"^the tokenizer's chat template renders no user turn "
                                         r"with the context and the question: this model takes "
                                         r"no chat$"):
        PromptTemplate.from_tokenizer(tok, SYSTEM)
    tok.chat_template = "<|user|>Hello<|assistant|>"  # renders, but no content of ours
    with pytest.raises(ValueError, match=r"\(it drops or repeats them\)$"):
        PromptTemplate.from_tokenizer(tok, SYSTEM)
