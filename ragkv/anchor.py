"""The anchor: a fixed, neutral passage chunks can be precomputed after (``precompute_context=
"anchor"``).

A chunk prefilled right after the template prefix has KV unlike the KV it has deep inside a
prompt: its first tokens attend almost only to the prefix. Prefilled after a few hundred tokens
of any text, its KV comes much closer (docs/benchmarks.md, *Precomputing chunks after
context*: a random document as context did as well as the chunk's own neighbours), so the blend
has less to repair.
The passage is written for ragkv, states no facts a question could ask about, and is the same
for every corpus, so one entry per chunk serves every prompt. Changing it changes every
anchor key (the key digests its token ids).

A passage of the user's own corpus does better still (a random document of the same set as
context beat the neutral passage on both public sets): :func:`corpus_anchor` picks the corpus's
most typical text, and with ``anchor_source="corpus"`` the first ingestion into a cache records
it in the index, so every process on that cache precomputes and reads chunks after it.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Sequence
from typing import Any

from ragkv.chunking import tokenize_chunk

#: the index setting that records a cache's corpus anchor
ANCHOR_SETTING = "anchor_text"
#: tokens of corpus text a corpus anchor holds (the neutral passage has 433)
CORPUS_ANCHOR_TOKENS = 512
#: a corpus with fewer tokens than this keeps the neutral passage
MIN_CORPUS_ANCHOR_TOKENS = 64
_WORD = re.compile(r"[^\W_]+", re.UNICODE)

ANCHOR_TEXT = (
    'This page is part of a general collection of notes, reference material and short '
    'essays. The collection covers many subjects: history, science, engineering, law, the '
    'arts, daily life and the use of tools and software. Each page is written to be read on'
    ' its own, and each section begins where the previous one ends, so a reader may start '
    'anywhere and still follow the text.'
    "\n\n"
    'The notes follow a plain style. Sentences state one thing at a time. Terms are '
    'explained when they first appear, and examples are given where an idea is easier to '
    'see in use than to describe. Lists are used for steps that must happen in order, and '
    'tables for values that are compared side by side. Quotations keep their original '
    'wording, and the source of each is named in the text that introduces it.'
    "\n\n"
    'Some sections are long and some are short. A section may describe an event, explain '
    'how a procedure works, define a set of related terms, or argue for one reading of a '
    'question against another. Where the material has changed over time, the notes say '
    'which version they describe. Dates, names and numbers are written out in full so that '
    'they can be found again by a search.'
    "\n\n"
    'The collection is meant for readers who want a clear account of a topic without having'
    ' to consult many separate works. It does not replace the original documents, the '
    'manuals of a product, or the advice of an expert, and readers who need certainty about'
    ' a detail should check it against the primary source. Corrections are made when errors'
    ' are found, and the text is revised as new material becomes available.'
    "\n\n"
    'Readers often use the collection to answer a specific question. The best way to do so '
    'is to read the relevant passage carefully, note what it says and what it leaves out, '
    'and compare it with the passages around it. A passage can be accurate in what it '
    'states and still be incomplete, and two passages written at different times may '
    'describe the same matter in different terms. When a question asks for a single fact, '
    'the answer is usually stated directly in one sentence of the text.'
    "\n\n"
    'The next section continues the collection.'
)


def corpus_anchor(texts: Sequence[str], tokenizer: Any,
                  tokens: int = CORPUS_ANCHOR_TOKENS) -> str | None:
    """A passage of ``texts`` to precompute chunks after: the text most like the corpus as a
    whole (cosine of its TF-IDF words to their mean), cut to ``tokens`` tokens, followed by the
    next most typical while it is shorter. None when the corpus has under
    :data:`MIN_CORPUS_ANCHOR_TOKENS` tokens. Deterministic: the same texts give the same
    passage, so processes that choose from the same corpus agree."""
    docs = [t.strip() for t in dict.fromkeys(texts) if t and t.strip()]
    if not docs:
        return None
    bags = [Counter(w.lower() for w in _WORD.findall(t)) for t in docs]
    df = Counter(w for b in bags for w in b)
    n = len(docs)
    vecs = []
    for b in bags:
        v = {w: c * math.log((1 + n) / (1 + df[w])) + c * 1e-3 for w, c in b.items()}
        norm = math.sqrt(sum(x * x for x in v.values())) or 1.0
        vecs.append({w: x / norm for w, x in v.items()})
    mean: Counter = Counter()
    for v in vecs:
        mean.update(v)

    def typicality(i: int) -> float:
        return sum(x * mean[w] for w, x in vecs[i].items())

    order = sorted(range(n), key=lambda i: (-typicality(i), i))
    parts: list[str] = []
    left = tokens
    for i in order:
        head = docs[i][: left * 16]  # a long document is not tokenized whole for 512 tokens
        ids = tokenize_chunk(head, tokenizer)
        if len(ids) > left:  # cut at the last whole word inside the budget
            text = tokenizer.decode(ids[:left], skip_special_tokens=True)
            text = text[: text.rfind(" ")] if " " in text else text
        else:
            text = head
        if text.strip():
            parts.append(text.strip())
            left -= min(len(ids), left)
        if left <= 0:
            break
    passage = "\n\n".join(parts)
    used = tokens - left
    return passage if used >= MIN_CORPUS_ANCHOR_TOKENS else None
