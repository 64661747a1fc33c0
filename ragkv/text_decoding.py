"""Bytes of a plain-text file → str: which encoding, and when bytes are not text at all.

* Valid UTF-8 is UTF-8 (a BOM dropped).
* Mostly UTF-8 (more valid multi-byte sequences than stray bytes: a Windows-1252 character
  pasted into a UTF-8 file) stays UTF-8, each stray byte read as Windows-1252; one byte must
  not turn the whole file into another code page.
* Anything else is charset-normalizer's best guess, except that Windows-1252 wins where it
  decodes the bytes about as cleanly (``CP1252_SLACK``): the detector has no evidence to tell
  the single-byte Western code pages apart on short texts and otherwise picks cp1250, cp437
  or cp852 for "crème" or curly quotes.
* That reading (or, for bytes with neither NUL bytes nor a UTF-16 byte-order mark, the
  mostly-UTF-8 one) then competes with the bytes read in each everyday legacy code page
  (:data:`ragkv.text_plausibility.CODE_PAGES`): a reading with fewer oddities for natural
  text (:func:`ragkv.text_plausibility.cost`) replaces it; on a tie it stays. So Polish
  cp1250, Czech and Hungarian ISO-8859-2 and Turkish cp1254 are not read as Windows-1252.
* Decoded text with more than 1 % control characters is "not text" (binary data).
"""

from __future__ import annotations

import codecs
import re

from ragkv.text_plausibility import CODE_PAGES, MAX_COST, cost

# C0 controls except \t \n \v \f \r, DEL, and C1 controls: frequent in decoded binary data,
# rare in real text (a stray form feed or DOS end-of-file mark stays under the threshold).
_CONTROL = re.compile(r"[\x00-\x08\x0e-\x1f\x7f-\x9f]")
_MAX_CONTROL_RATIO = 0.01
#: How much more chaos (charset-normalizer's mess ratio) Windows-1252 may show than the best
#: guess and still be chosen.
CP1252_SLACK = 0.15
# A lead byte and its continuation bytes: a well-formed multi-byte UTF-8 sequence.
_UTF8_MULTI = re.compile(rb"[\xc2-\xdf][\x80-\xbf]|[\xe0-\xef][\x80-\xbf]{2}"
                         rb"|[\xf0-\xf4][\x80-\xbf]{3}")


class NotText(ValueError):
    """The bytes are not text; the message says why."""


def _cp1252_byte(err: UnicodeDecodeError) -> tuple[str, int]:
    bad = err.object[err.start:err.end]
    return bad.decode("cp1252", errors="replace"), err.end


codecs.register_error("ragkv-cp1252", _cp1252_byte)


def has_text(text: str) -> bool:
    """Whether ``text`` shows anything: a character that is neither whitespace nor invisible
    (zero-width spaces and joiners, other format and control characters)."""
    return any(ch.isprintable() and not ch.isspace() for ch in text)


def looks_binary(text: str) -> bool:
    """Whether decoded text holds more than 1 % control characters."""
    return bool(text) and len(_CONTROL.findall(text)) > _MAX_CONTROL_RATIO * len(text)


def decode_text(data: bytes) -> str:
    """``data`` as text by the rules above, or :class:`NotText`."""
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError:
        text = _legacy(data)
    if looks_binary(text):
        raise NotText("not text (binary data)")
    return text


#: bytes of a file each reading is scored on (the one chosen is then decoded whole)
SAMPLE = 64 * 1024


def _legacy(data: bytes) -> str:
    """Bytes that are not UTF-8: the detector's reading, or a code page's that reads more
    plausibly (module docstring). Bytes the detector finds no encoding for stay refused: a
    run of random high bytes reads as plausible Chinese in GB18030."""
    first = _mostly_utf8(data) or _guess(data)  # NotText where the detector finds nothing
    if looks_binary(first) or b"\x00" in data or data.startswith((b"\xff\xfe", b"\xfe\xff")):
        return first  # binary, or UTF-16/32: no single-byte code page reads these
    nonascii = sum(b > 127 for b in data[:SAMPLE])
    best, best_cost = first, cost(first[:SAMPLE], nonascii)
    for page in CODE_PAGES:
        try:  # a multi-byte character may be cut at the sample's end
            text = codecs.getincrementaldecoder(page)("strict").decode(data[:SAMPLE])
        except UnicodeDecodeError:
            continue
        if looks_binary(text):
            continue
        c = cost(text, nonascii)
        if c <= MAX_COST and c < best_cost:
            try:
                best, best_cost = data.decode(page), c
            except UnicodeDecodeError:  # past the sample
                continue
    return best


def _mostly_utf8(data: bytes) -> str | None:
    multi = len(_UTF8_MULTI.findall(data))
    if not multi:
        return None
    text = data.decode("utf-8-sig", errors="replace")
    stray = text.count("\ufffd") - data.decode("utf-8-sig", errors="ignore").count("\ufffd")
    if stray >= multi:
        return None
    return data.decode("utf-8-sig", errors="ragkv-cp1252")


def _guess(data: bytes) -> str:
    from charset_normalizer import from_bytes

    best = from_bytes(data).best()
    if best is None:
        raise NotText("not text (no character encoding fits)")
    if best.encoding != "cp1252":
        western = from_bytes(data, cp_isolation=["cp1252"]).best()
        if western is not None and western.chaos <= best.chaos + CP1252_SLACK:
            best = western
    return str(best)
