"""How plausibly a decoding of legacy (non-UTF-8) bytes reads as natural text.

charset-normalizer tells code pages apart by how messy each decoding looks, and for the
single-byte code pages of Central Europe and Turkey several decodings look equally clean:
Polish cp1250 often came out as Windows-1252 (``siê``), Czech ISO-8859-2, Hungarian and
Turkish text nearly always did. A reader knows better: the non-ASCII letters of one text come
from one language's alphabet (or one script), a symbol does not sit between two letters
(``Wroc³aw``), case does not flip from lower to upper inside a word (KOI8-R read as cp1251),
and Latin, Cyrillic and Greek letters do not mix inside a word. :func:`cost` counts such
oddities per non-ASCII byte; :mod:`ragkv.text_decoding` reads the bytes in each of
:data:`CODE_PAGES` besides its own guess and keeps the least odd reading.
"""

from __future__ import annotations

import unicodedata

#: the everyday legacy code pages a document may be in, besides the detector's guess
CODE_PAGES = ("cp1252", "cp1250", "iso8859_2", "cp1251", "koi8_r", "cp1253", "iso8859_7",
              "cp1254", "iso8859_15", "shift_jis", "euc_jp", "gb18030", "big5", "euc_kr")
#: a reading other than the detector's may cost at most this per non-ASCII byte
MAX_COST = 0.5

# The lowercase non-ASCII letters of languages written in Latin script.
_ALPHABETS = tuple(frozenset(a) for a in (
    "àâæçéèêëîïôœùûüÿ", "äöüß", "áéíñóúü", "áâãàçéêíóôõú", "àèéìíîòóùú", "àçèéíïòóúü",
    "éëïóöü", "æøåé", "åäöé", "äöåšž", "áðéíóúýþæö", "äöõüšž", "ąćęłńóśźż",
    "áčďéěíňóřšťúůýž", "áäčďéíĺľňóôŕšťúýž", "áéíóöőúüű", "ăâîșțşţ", "čćđšž", "čšž", "çë",
    "çğıöşüâîû", "ąčęėįšųūž", "āčēģīķļņšūž"))
# The scripts one text in a non-Latin language writes its letters in.
_SCRIPT_SETS = (frozenset({"cyrillic"}), frozenset({"greek"}), frozenset({"kana", "han"}),
                frozenset({"han"}), frozenset({"hangul", "han"}))
_APOSTROPHES = frozenset("'’‘´`")
_COMMON_SYMBOLS = frozenset("€£¥¢°§©®™±×÷µ¬¦№")

# per occurrence
_UNREADABLE = 10.0  # control, unassigned, private-use or surrogate: not in any real text
_WEDGED_SYMBOL = 3.0  # "Wroc³aw"
_MIXED_SCRIPTS = 3.0  # "Mьюteri": cp1254 read as cp1251
_CASE_FLIP = 2.0  # "пЯИБЕР": KOI8-R read as cp1251
_JAMO = 3.0  # Hangul compatibility jamo: EUC-JP kana read as EUC-KR
_CURRENCY_SIGN = 1.0  # "¤" is where ISO-8859-15 has "€"
_RARE_SYMBOL = 0.5  # box drawing and the like
_FOREIGN_LETTER = 1.0  # a letter outside the text's main alphabet or script


def _script(ch: str) -> str | None:
    o = ord(ch)
    if 0x0400 <= o <= 0x04FF:
        return "cyrillic"
    if 0x0370 <= o <= 0x03FF or 0x1F00 <= o <= 0x1FFF:
        return "greek"
    if 0x3040 <= o <= 0x30FF:
        return "kana"
    if 0xAC00 <= o <= 0xD7A3:
        return "hangul"
    if 0x4E00 <= o <= 0x9FFF or 0x3400 <= o <= 0x4DBF:
        return "han"
    return None


def _family(ch: str) -> str:
    s = _script(ch)
    return s if s in ("cyrillic", "greek") else "latin" if ord(ch) < 0x0250 else "other"


def _wedged(text: str, i: int, prev: str) -> bool:
    """Whether the symbol at ``i`` sits between two letters (CJK punctuation may)."""
    o = ord(text[i])
    return (prev.isalpha() and i + 1 < len(text) and text[i + 1].isalpha()
            and text[i] not in _APOSTROPHES
            and not (0x3000 <= o <= 0x303F or 0xFF00 <= o <= 0xFFEF))


def cost(text: str, nonascii_bytes: int) -> float:
    """Oddities of ``text`` per non-ASCII byte of the bytes it was decoded from (lower reads
    more like natural text; 0 for a reading with nothing odd)."""
    pen = 0.0
    letters: list[str] = []
    prev = ""
    for i, ch in enumerate(text):
        o = ord(ch)
        if o < 128:
            prev = ch
            continue
        cat = unicodedata.category(ch)
        if cat in ("Cc", "Cn", "Co", "Cs") or ch == "\ufffd":
            pen += _UNREADABLE
        elif cat[0] == "L":
            letters.append(ch)
            if prev.isalpha() and prev.islower() and ch.isupper():
                pen += _CASE_FLIP
            if prev.isalpha() and _family(prev) != _family(ch):
                pen += _MIXED_SCRIPTS
        elif cat[0] in "SPN" and _wedged(text, i, prev):
            pen += _WEDGED_SYMBOL
        if 0x3130 <= o <= 0x318F:
            pen += _JAMO
        if ch == "¤":
            pen += _CURRENCY_SIGN
        elif cat[0] == "S" and ch not in _COMMON_SYMBOLS:
            pen += _RARE_SYMBOL
        prev = ch
    lower = [c.lower() for c in letters]
    scripts = [_script(c) for c in letters]
    main = max([sum(c in alphabet for c in lower) for alphabet in _ALPHABETS]
               + [sum(s in allowed for s in scripts) for allowed in _SCRIPT_SETS])
    pen += _FOREIGN_LETTER * (len(letters) - main)
    return pen / max(1, nonascii_bytes)
