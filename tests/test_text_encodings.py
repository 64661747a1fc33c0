"""Documents in everyday legacy code pages are read as their own text, as plain text and as
HTML that declares no charset (``ragkv/text_decoding.py``, ``ragkv/text_plausibility.py``)."""

from __future__ import annotations

import random

import pytest
from encoding_cases import SAMPLES

from ragkv.documents import load_bytes
from ragkv.text_decoding import NotText, decode_text
from ragkv.text_plausibility import cost

CASES = [pytest.param(page, text, id=f"{lang}-{page}-{kind}")
         for lang, (pages, sentence, paragraph) in SAMPLES.items()
         for page in pages
         for kind, text in (("sentence", sentence), ("paragraph", paragraph))]


@pytest.fixture
def bs4():
    """HTML needs the docs extra (beautifulsoup4); without it these tests are skipped."""
    return pytest.importorskip("bs4")


def html(text: str, charset: str = "") -> bytes:
    meta = f'<meta charset="{charset}">' if charset else ""
    return f"<html><head>{meta}<title>t</title></head><body><p>{text}</p></body></html>"


@pytest.mark.parametrize(("page", "text"), CASES)
def test_text_in_a_legacy_code_page_reads_as_itself(page, text):
    assert decode_text(text.encode(page)) == text
    assert load_bytes("doc.txt", text.encode(page)).text == text


@pytest.mark.parametrize(("page", "text"), CASES)
def test_html_without_a_charset_reads_as_the_same_page_in_utf8(page, text, bs4):
    want = load_bytes("doc.html", html(text, "utf-8").encode()).text
    assert text in want
    assert load_bytes("doc.html", html(text).encode(page)).text == want


@pytest.mark.parametrize("text", [t for _, s, p in SAMPLES.values() for t in (s, p)])
def test_utf8_and_utf16_stay_as_they_were(text):
    assert decode_text(text.encode()) == text
    assert decode_text(text.encode("utf-8-sig")) == text
    assert decode_text(text.encode("utf-16")) == text


def test_a_reading_with_letters_of_one_alphabet_costs_less_than_its_mojibake():
    polish = "Spotkanie zarządu odbędzie się w piątek."
    data = polish.encode("cp1250")
    nonascii = sum(b > 127 for b in data)
    assert cost(polish, nonascii) == 0
    # Windows-1252's reading: letters of no one alphabet, a symbol between two letters
    assert cost(data.decode("cp1252"), nonascii) > 0.5
    # KOI8-R read as cp1251 flips case inside words
    russian = "Поезд прибывает на вокзал."
    assert cost(russian, 1) == 0
    assert cost(russian.encode("koi8_r").decode("cp1251"), 1) > 0


@pytest.mark.parametrize("data", [bytes(range(128, 256)) * 4, bytes(range(256)) * 4,
                                  random.Random(1).randbytes(300)])
def test_bytes_the_detector_finds_no_encoding_for_stay_refused(data):
    """Read as KOI8-R they are box drawing and Cyrillic, as GB18030 random Chinese: no
    reading replaces the detector's refusal."""
    with pytest.raises(NotText):
        decode_text(data)


def test_random_high_bytes_stay_refused():
    rng = random.Random(1)
    for _ in range(100):
        with pytest.raises(NotText):
            decode_text(bytes(rng.randrange(128, 256) for _ in range(300)))
