"""Argument types the benchmark scripts share: a count below one or an ``--out`` that cannot be
written is argparse's one line and exit 2 before any work, not a traceback after the run (or a
JSON of ratios measured over nothing)."""

from __future__ import annotations

import argparse
from pathlib import Path


def count(text: str) -> int:
    """A whole number >= 1 (cases, chunks, repeats, prompts)."""
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {n}")
    return n


def out_file(text: str) -> Path:
    """A file the results can be written to; its folder is made now."""
    path = Path(text).expanduser()
    if path.is_dir():
        raise argparse.ArgumentTypeError(f"{path} is a folder: name a file")
    made = not path.exists()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("a"):  # appending changes nothing in a file that is there
            pass
        if made:  # a run that fails leaves no empty results file behind
            path.unlink()
    except OSError as exc:
        raise argparse.ArgumentTypeError(f"cannot write {path}: {exc.strerror or exc}") from None
    return path
