"""A tokenizer of the app's own may hand its ids back in any of the shapes ragkv reads: by key
(a dict), as an attribute, or as the list itself. Every path that tokenizes (the template,
chunks, the question, the anchor passage) reads them through one helper, so each shape gives
the prompt and the answer a Hugging Face tokenizer gives."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from ragkv.anchor import corpus_anchor
from ragkv.chunking import encoded_ids, tokenize_chunk
from ragkv.prompt import PromptTemplate

SYSTEM = "Answer from the context."
CHUNKS = ["The lighthouse keeper logs the weather at six each morning.",
          "Ships that pass the point signal with two short blasts <|im_end|>."]
QUESTION = "When does the keeper log the weather?"


class _Ids:
    def __init__(self, ids: list[int]) -> None:
        self.input_ids = ids


SHAPES = {
    "key": lambda enc: {"input_ids": list(enc["input_ids"])},
    "attribute": lambda enc: _Ids(list(enc["input_ids"])),
    "list": lambda enc: list(enc["input_ids"]),
}


class ShapedTokenizer:
    """The real tokenizer, its encodings handed back in one shape only; not a fast tokenizer,
    so nothing may read offsets or other fields from its output."""

    is_fast = False

    def __init__(self, tokenizer: Any, shape: str) -> None:
        self._tok, self._shape = tokenizer, SHAPES[shape]

    def __call__(self, text: str, **kwargs: Any) -> Any:
        return self._shape(self._tok(text, **kwargs))

    def __len__(self) -> int:
        return len(self._tok)

    def __getattr__(self, name: str) -> Any:  # chat_template, bos_token_id, decode, ...
        if name == "backend_tokenizer":
            raise AttributeError(name)
        return getattr(self._tok, name)


@pytest.mark.parametrize("shape", SHAPES)
def test_each_shape_gives_the_same_prompt(tokenizer, shape):
    shaped = ShapedTokenizer(tokenizer, shape)
    ours, theirs = (PromptTemplate.from_tokenizer(t, SYSTEM) for t in (shaped, tokenizer))
    assert ours.prefix_ids == theirs.prefix_ids and ours.sep_ids == theirs.sep_ids
    assert ours.anchor_ids(CHUNKS[0]) == theirs.anchor_ids(CHUNKS[0])
    assert ours.assemble(CHUNKS, QUESTION) == theirs.assemble(CHUNKS, QUESTION)
    assert [tokenize_chunk(c, shaped) for c in CHUNKS] == [tokenize_chunk(c, tokenizer)
                                                           for c in CHUNKS]
    docs = [c * 12 for c in CHUNKS]
    assert corpus_anchor(docs, shaped, 64) == corpus_anchor(docs, tokenizer, 64)


@pytest.mark.parametrize("ids", [[5, 6, 7], (5, 6, 7), range(5, 8)])
@pytest.mark.parametrize("wrap", ["plain", "tensor", "array"])
def test_ids_as_a_sequence_tensor_or_array_read_as_ints(ids, wrap):
    import numpy as np
    import torch

    value = {"plain": list, "tensor": torch.tensor, "array": np.array}[wrap](list(ids))
    for encoding in ({"input_ids": value}, _Ids(value), value):  # the ids themselves too
        got = encoded_ids(encoding)
        assert got == [5, 6, 7] and all(type(t) is int for t in got)


def _batch_of_one(kind: str):
    import numpy as np
    import torch

    return {"tensor": torch.tensor([[7]]), "array": np.array([[7]])}[kind]


@pytest.mark.parametrize("ids", [[[5, 6, 7]], [5, "6"], [5.0, 6.0], 7,
                                 # a batch of one text of one token read as that token
                                 "tensor", "array"])
def test_a_batch_or_ids_that_are_not_ints_are_refused(ids):
    ids = _batch_of_one(ids) if isinstance(ids, str) else ids
    with pytest.raises(TypeError, match=r"^the tokenizer's input_ids must be one text's token "
                                        r"ids, a flat sequence of ints; got \w+ "):
        encoded_ids({"input_ids": ids})


@pytest.mark.parametrize("encoding", [None, 7, "ids", object()])
def test_an_unreadable_encoding_says_what_is_read(encoding):
    with pytest.raises(TypeError, match=r"^the tokenizer returned a .+; ragkv reads token ids "
                                        r"as its 'input_ids' \(a key or an attribute\) or a "
                                        r"list of ints$"):
        encoded_ids(encoding)
    with pytest.raises(TypeError, match="'input_ids'"):
        encoded_ids({"ids": [1, 2]})


@pytest.mark.parametrize("shape", ["key", "attribute", "list"])
def test_each_shape_answers_as_the_real_tokenizer(tmp_path: Path, tiny_model: Path, tokenizer,
                                                  shape):
    from transformers import AutoModelForCausalLM

    from ragkv import RagKV, RagkvConfig
    from ragkv.engine.hf import HFEngine

    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    answers = []
    for i, tok in enumerate((tokenizer, ShapedTokenizer(tokenizer, shape))):
        cfg = RagkvConfig(home=tmp_path / str(i))
        rag = RagKV(cfg, engine=HFEngine(model, tok))
        answers.append(rag.generate(CHUNKS, QUESTION, max_new_tokens=4))
        rag.close()
    assert answers[1].prompt == answers[0].prompt
    assert answers[1].tokens == answers[0].tokens
    assert answers[1].trace.misses == answers[0].trace.misses == len(CHUNKS)
