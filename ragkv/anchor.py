"""The anchor: a fixed, neutral passage chunks can be precomputed after (``precompute_context=
"anchor"``).

A chunk prefilled right after the template prefix has KV unlike the KV it has deep inside a
prompt: its first tokens attend almost only to the prefix. Prefilled after a few hundred tokens
of any text, its KV comes much closer (README, *Precomputing chunks after context*: a random
document as context did as well as the chunk's own neighbours), so the blend has less to repair.
The passage is written for ragkv, states no facts a question could ask about, and is the same
for every corpus, so one entry per chunk serves every prompt. Changing it changes every
anchor key (the key digests its token ids).
"""

from __future__ import annotations

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
