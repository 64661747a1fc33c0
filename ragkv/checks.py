"""What ragkv takes as a number, a count or a list of chunks: the checks the configuration and
the facade share, so a value is judged the same wherever it is given (no torch here: the
configuration imports it)."""

from __future__ import annotations

import math
import numbers
import operator
from collections.abc import Mapping, Set
from typing import Any


def is_number(value: object) -> bool:
    """A finite real number (numpy's too), not a bool (``True`` is an int to Python, never a
    ratio here; NaN passed every ``x < bound`` check)."""
    return (isinstance(value, numbers.Real) and not isinstance(value, bool)
            and math.isfinite(value))


def is_whole(value: object) -> bool:
    """An integer (numpy's too), not a bool (a count of tokens, layers or bytes)."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def as_python(obj: object, floats: tuple[str, ...], wholes: tuple[str, ...]) -> None:
    """Numbers given as numpy scalars (or ints where floats go) stored as Python's own, so a
    config compares, prints and serializes as one given plain numbers."""
    for name in floats:
        if is_number(getattr(obj, name)):
            setattr(obj, name, float(getattr(obj, name)))
    for name in wholes:
        if is_whole(getattr(obj, name)):
            setattr(obj, name, int(getattr(obj, name)))


def whole(value: object, name: str, unit: str, minimum: int) -> int:
    """``value`` as a whole number of ``unit`` of at least ``minimum``: a ``TypeError`` for
    another type (a float or a bool is a mistake), a ``ValueError`` below the minimum."""
    try:
        if isinstance(value, bool):
            raise TypeError
        n = operator.index(value)  # type: ignore[arg-type]
    except TypeError:
        raise TypeError(f"{name} must be a whole number of {unit}, got {value!r}") from None
    if n < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {n}")
    return n


def seconds(value: object, name: str) -> float | None:
    """A duration the caller measured: None, or a finite number of seconds >= 0."""
    if value is None:
        return None
    if not is_number(value) or value < 0:  # type: ignore[operator]
        raise ValueError(f"{name} must be a number of seconds >= 0 or None, got {value!r}")
    return float(value)  # type: ignore[arg-type]


def chunk_list(chunks: object, single: tuple[type, ...] = ()) -> list[Any]:
    """Chunks come as a list (or another ordered collection): one text, one chunk (a type in
    ``single``) or a mapping handed in alone is a ``TypeError`` (they would read as one chunk
    per character or per key), as is a set (no order) or None."""
    what = type(chunks).__name__
    if isinstance(chunks, str | bytes | bytearray | memoryview | Mapping | Set) or (
            single and isinstance(chunks, single)):
        raise TypeError(f"chunks must be a list (of retrieved chunks, texts or token ids), got "
                        f"one {what}" + ("; wrap it in a list" if not isinstance(
                            chunks, Mapping | Set) else ""))
    try:
        return list(chunks)  # type: ignore[call-overload]
    except TypeError:
        raise TypeError(f"chunks must be a list (of retrieved chunks, texts or token ids), "
                        f"got {what}") from None
