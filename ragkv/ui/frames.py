"""Data shaping for the UI pages: plain functions from ragkv objects to pandas frames.

No Streamlit here, so the figures the pages chart can be tested on their own.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

if TYPE_CHECKING:
    from ragkv.cache_index import CacheIndex
    from ragkv.trace import QueryTrace

#: The persistent tier an entry is reported under when it is on local disk.
DEFAULT_TIER = "disk"


#: ASCII punctuation that Markdown (or Streamlit's additions to it: ``$`` math, ``:emoji:``
#: and ``:color[...]``) may read as syntax; a backslash before any of them shows it as is
_MARKDOWN_SYNTAX = re.compile(r"([\\`*_{}\[\]()<>#+\-.!|~$:])")


def literal_md(text: str) -> str:
    """``text`` (a question, a document name, an error) as Markdown that shows it character
    for character inside a page's formatted line: a question about ``*args`` or
    ``__init__`` would otherwise turn partly italic or bold, one about ``$x$`` into math."""
    return _MARKDOWN_SYNTAX.sub(r"\\\1", text)


class AnswerMarkdown:
    """A model's answer as Markdown, fed as it streams: its lists, emphasis and code shown
    formatted, as chat interfaces show them, but ``$`` as itself outside code, since Streamlit
    reads ``$...$`` as math and an answer quoting amounts or shell variables means dollars.
    Inside code (a backtick span or a fenced block) a backslash would show, so none is added.

    Each ``$``'s fate depends only on the text before it, so the pieces ``feed`` returns
    concatenate to :func:`answer_md` of the whole (a run of backticks or tildes at a piece's
    end is held back until it is whole)."""

    def __init__(self) -> None:
        self._held = ""
        self._fence: tuple[str, int] | None = None  # the fence's character and length
        self._inline = 0  # length of the backtick run that opened the code span, 0 outside
        self._line_start = True  # nothing but spaces since the last line break

    def feed(self, piece: str, final: bool = False) -> str:
        text, self._held = self._held + piece, ""
        out: list[str] = []
        i = 0
        while i < len(text):
            ch = text[i]
            if ch in "`~":
                j = i
                while j < len(text) and text[j] == ch:
                    j += 1
                if j == len(text) and not final:
                    self._held = text[i:]
                    break
                self._run(ch, j - i)
                out.append(text[i:j])
                i = j
                continue
            if ch == "$" and self._fence is None and not self._inline:
                out.append("\\$")
            else:
                out.append(ch)
            if ch == "\n":
                self._line_start = True
            elif ch != " ":
                self._line_start = False
            i += 1
        return "".join(out)

    def close(self) -> str:
        return self.feed("", final=True)

    def _run(self, ch: str, n: int) -> None:
        at_line_start, self._line_start = self._line_start, False
        if self._fence is not None:
            if at_line_start and ch == self._fence[0] and n >= self._fence[1]:
                self._fence = None
        elif self._inline:
            if ch == "`" and n == self._inline:
                self._inline = 0
        elif at_line_start and n >= 3:
            self._fence = (ch, n)
        elif ch == "`":
            self._inline = n


def answer_md(text: str) -> str:
    """:class:`AnswerMarkdown` of a whole answer."""
    md = AnswerMarkdown()
    return md.feed(text) + md.close()


def answer_md_stream(pieces: Iterable[str]) -> Iterator[str]:
    """:class:`AnswerMarkdown` of an answer as it streams, piece by piece."""
    md = AnswerMarkdown()
    for piece in pieces:
        yield md.feed(piece)
    yield md.close()


def token_pieces(tokenizer: Any, ids: Sequence[int]) -> list[str]:
    """One piece of text per token, concatenating to the decoded ``ids``. A character spread
    over several byte-level tokens (accents, CJK, emoji) goes whole to the token that
    completes it, and the others get "" (decoding each token alone gave U+FFFD for each part).
    Each token is decoded after the one or two before it, so spacing rules that depend on
    the start of a text (SentencePiece's leading space) cancel out."""
    pieces: list[str] = []
    prefix = read = 0  # decoded from ``prefix``; tokens before ``read`` have their pieces
    for i in range(len(ids)):
        before = tokenizer.decode(ids[prefix:read])
        text = tokenizer.decode(ids[prefix:i + 1])
        if len(text) > len(before) and not text.endswith("\ufffd"):
            pieces.append(text[len(before):])
            prefix, read = read, i + 1
        else:
            pieces.append("")
    return pieces


def trace_notes(trace: QueryTrace) -> list[str]:
    """What a user should know about an answer beyond its figures: an engine that fell back
    (the trace's error) and retrieved chunks left out because they did not fit the window."""
    notes = [f"{trace.mode}: {trace.error}"] if trace.error else []
    if trace.left_out:
        names = ", ".join(c.document or c.key[:12] for c in trace.left_out)
        notes.append(f"Left out {len(trace.left_out)} retrieved chunk(s) that did not fit the "
                     f"model's window: {names}")
    return notes


def tier_of(entry: Any) -> str:
    """The fastest persistent tier an index entry is in (the memory tier is per process)."""
    if getattr(entry, "on_disk", True):
        return DEFAULT_TIER
    return "remote" if getattr(entry, "on_remote", False) else "-"


def hit_label(hit: bool | None) -> str:
    return "hit" if hit is True else "miss" if hit is False else "not looked up"


def chunk_table(index: CacheIndex, trace: QueryTrace) -> pd.DataFrame:
    """One row per chunk of an answer: where its KV came from and what was recomputed."""
    rows = []
    for c in trace.chunks:
        # The tier that served this answer's hit; none for a miss (computed now); where the
        # entry lives now for a chunk not looked up (full prefill)
        if c.hit is None:
            entry = index.get_entry(c.key) if c.key else None
            tier = tier_of(entry) if entry is not None else "-"
        else:
            tier = (c.tier or "-") if c.hit else "-"
        rows.append({
            "document": c.document or "-",
            "cache": hit_label(c.hit),
            "tier": tier,
            "tokens": c.n_tokens,
            "recomputed": c.recomputed,
            "key": c.key[:12],
        })
    return pd.DataFrame(rows, columns=["document", "cache", "tier", "tokens", "recomputed", "key"])


@dataclass(frozen=True)
class FullPrefillFit:
    """A fitted full-prefill TTFT, given only where it behaves as one: above zero, and
    outside the lengths it was fitted on only where it rises all the way from them (three
    points can fit a parabola that falls below zero a little past them: an "estimated"
    saving then came from a negative full-prefill TTFT). NaN elsewhere."""

    poly: np.poly1d
    lo: float
    hi: float

    def __call__(self, tokens: Any) -> Any:
        x = np.asarray(tokens, dtype=float)
        y, slope = self.poly(x), self.poly.deriv()
        inside = (x >= self.lo) & (x <= self.hi)
        # a parabola's slope is a line: rising at x and at the nearest measured length, it
        # rises between them
        rising = (slope(x) >= 0) & (slope(np.clip(x, self.lo, self.hi)) >= 0)
        return np.where((inside | rising) & (y > 0), y, np.nan)


def full_prefill_fit(df: pd.DataFrame) -> FullPrefillFit | None:
    """Full-prefill TTFT as a function of prompt tokens, fitted on this machine's own
    measurements: every query answered with ``full`` (its TTFT is one) and every paired
    measurement (``full_ttft_s`` beside another mode). Quadratic in length (attention grows
    with it) from 3 distinct lengths on, linear from 2; None with fewer."""
    if df.empty or "context_tokens" not in df:
        return None
    tokens = pd.to_numeric(df["context_tokens"], errors="coerce")
    full = pd.to_numeric(df["full_ttft_s"], errors="coerce")
    own = _full_mode(df)
    paired = full.notna() & ~own  # (a full answer is one measurement, whatever it logged)
    xs = pd.concat([tokens[paired], tokens[own]])
    ys = pd.concat([full[paired], pd.to_numeric(df["ttft_s"], errors="coerce")[own]])
    ok = xs.notna() & ys.notna()
    xs, ys = xs[ok].to_numpy(float), ys[ok].to_numpy(float)
    distinct = len(np.unique(xs))
    if distinct < 2:
        return None
    return FullPrefillFit(np.poly1d(np.polyfit(xs, ys, min(2, distinct - 1))),
                          float(xs.min()), float(xs.max()))


def _full_mode(df: pd.DataFrame) -> pd.Series:
    return df["mode"] == "full" if "mode" in df else pd.Series(False, index=df.index)


def queries_frame(rows: Iterable[dict[str, Any]]) -> pd.DataFrame:
    """The query log oldest first, with hit rate and TTFT saved per query.

    ``saved_s`` is filled where the full-prefill TTFT was measured for that query's prompt
    (the same prompt by the same engine); ``est_saved_s`` holds, for the other non-full
    queries, an estimate from :func:`full_prefill_fit` (labelled as such by the dashboard).
    ``cum_saved_s`` sums the measured savings only, ``cum_with_est_s`` both. A full-prefill
    query saves nothing, whatever TTFT it logged beside its own.
    """
    df = pd.DataFrame(list(rows))
    if df.empty:
        return df
    df = df.sort_values("id").reset_index(drop=True)
    looked_up = df["hits"] + df["misses"]
    df["hit_rate"] = (df["hits"] / looked_up.where(looked_up > 0)).astype(float)
    full = pd.to_numeric(df["full_ttft_s"], errors="coerce")
    df["saved_s"] = (full - df["ttft_s"]).where(~_full_mode(df))
    df["cum_saved_s"] = df["saved_s"].fillna(0.0).cumsum()
    df["est_saved_s"] = np.nan
    # one fit per engine and model: another model's full prefills say nothing of this one's
    engines = df["engine"].fillna("") if "engine" in df else pd.Series("", index=df.index)
    for engine in engines.unique():
        mine = engines == engine
        fit = full_prefill_fit(df[mine])
        if fit is None:
            continue
        todo = mine & df["saved_s"].isna() & ~_full_mode(df)
        tokens = pd.to_numeric(df["context_tokens"], errors="coerce")
        df.loc[todo, "est_saved_s"] = fit(tokens[todo].to_numpy(float)) - df.loc[todo, "ttft_s"]
    df["cum_with_est_s"] = df["saved_s"].fillna(df["est_saved_s"]).fillna(0.0).cumsum()
    return df


def size_by_tier(index: CacheIndex) -> pd.DataFrame:
    """Entries and MiB per persistent tier (an entry in both counts in both); the memory tier
    is per process and reported by ``KVStore.stats``. An empty remote tier is left out: most
    setups have none, and a zero bar would suggest one."""
    rows = [{"tier": t["tier"], "entries": t["entries"], "MiB": t["kv_bytes"] / 2**20}
            for t in index.tier_sizes() if t["tier"] == DEFAULT_TIER or t["entries"]]
    return pd.DataFrame(rows)


def size_by_document(index: CacheIndex) -> pd.DataFrame:
    """Stored KV bytes per document (a chunk shared by two documents counts in both)."""
    return pd.DataFrame([{"document": d["document"], "chunks": d["chunks"],
                          "MiB": d["kv_bytes"] / 2**20} for d in index.document_sizes()],
                        columns=["document", "chunks", "MiB"])


def top_chunks(index: CacheIndex, limit: int = 10) -> pd.DataFrame:
    """The most reused chunks: the hits of their KV entries summed (a chunk has one entry per
    context it is read in, the first position's and the others'; listed apart, one chunk
    filled two rows of ten), with its document and text."""
    rows: dict[str, dict[str, Any]] = {}
    for e in index.top_entries(2 * limit):
        # An entry no chunk names (the template prefix's KV, say) is shown by its key.
        label = f"{e['document']} #{e['ordinal']}" if e["ordinal"] is not None else e["key"][:12]
        row = rows.setdefault(label, {"chunk": label, "hits": 0, "tokens": e["n_tokens"],
                                      "text": (e["text"] or "")[:120].replace("\n", " ")})
        row["hits"] += e["hits"]
    top = sorted(rows.values(), key=lambda r: -r["hits"])[:limit]  # stable: ties keep order
    return pd.DataFrame(top, columns=["chunk", "hits", "tokens", "text"])


def recompute_matrix(layer_sets: Sequence[Any], n_positions: int) -> np.ndarray:
    """``[layers, positions]`` booleans: was position p computed afresh at layer l."""
    m = np.zeros((len(layer_sets), n_positions), dtype=bool)
    for layer, pos in enumerate(layer_sets):
        idx = np.asarray(pos.tolist() if hasattr(pos, "tolist") else list(pos), dtype=np.int64)
        m[layer, idx[(idx >= 0) & (idx < n_positions)]] = True
    return m


def heatmap_frame(matrix: np.ndarray, start: int = 0, end: int | None = None,
                  max_columns: int = 256) -> tuple[pd.DataFrame, int]:
    """Long-form ``layer, position, recomputed`` rows for positions ``[start, end)``.

    Wide spans are binned (``recomputed`` becomes the fraction of the bin recomputed) so a
    long prompt still draws as a readable, light chart. Returns the frame and the bin width.
    """
    end = matrix.shape[1] if end is None else end
    sub = matrix[:, start:end].astype(float)
    width = max(1, -(-sub.shape[1] // max_columns))  # ceil division
    if width > 1:
        pad = (-sub.shape[1]) % width
        sub = np.pad(sub, ((0, 0), (0, pad)), constant_values=np.nan)
        sub = np.nanmean(sub.reshape(sub.shape[0], -1, width), axis=2)
    layers, cols = np.indices(sub.shape)
    df = pd.DataFrame({"layer": layers.ravel(), "position": start + cols.ravel() * width,
                       "recomputed": sub.ravel()})
    return df, width


def token_shades(matrix: np.ndarray, start: int, end: int) -> np.ndarray:
    """Per position in ``[start, end)``: the fraction of layers that recomputed it."""
    if matrix.shape[0] == 0:
        return np.zeros(end - start)
    return matrix[:, start:end].mean(axis=0)
