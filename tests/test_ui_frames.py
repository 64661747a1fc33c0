"""The UI's frames (pure helpers, no page run): the query log with its measured savings, the
recompute heatmap of wide prompts, the cache-size summaries of the index."""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("streamlit")
from ragkv.cache_index import CacheIndex, ChunkRecord  # noqa: E402
from ragkv.cache_index.models import ids_sha256  # noqa: E402
from ragkv.ui import frames  # noqa: E402


def test_queries_frame_measures_saved_time_only_where_measured() -> None:
    rows = [dict(id=2, created_at=1, hits=2, misses=2, ttft_s=0.1, full_ttft_s=0.5),
            dict(id=1, created_at=0, hits=0, misses=0, ttft_s=0.4, full_ttft_s=None),
            dict(id=3, created_at=2, hits=4, misses=0, ttft_s=0.1, full_ttft_s=None)]
    df = frames.queries_frame(rows)
    assert list(df["id"]) == [1, 2, 3]
    assert np.isnan(df["hit_rate"][0]) and df["hit_rate"][1] == 0.5 and df["hit_rate"][2] == 1.0
    assert np.isnan(df["saved_s"][0]) and df["saved_s"][1] == pytest.approx(0.4)
    assert list(df["cum_saved_s"].round(6)) == [0.0, 0.4, 0.4]
    assert frames.queries_frame([]).empty


def test_a_full_prefill_answer_saves_nothing_and_is_one_measurement() -> None:
    """A full answer logged with its own TTFT as full prefill's: not a pair (it counted among
    the measured ones) and one point of the fit (it was two)."""
    rows = [dict(id=1, created_at=0, hits=0, misses=0, ttft_s=1.0, full_ttft_s=1.0,
                 mode="full", context_tokens=100),
            dict(id=2, created_at=1, hits=2, misses=0, ttft_s=0.2, full_ttft_s=None,
                 mode="blend", context_tokens=100),
            dict(id=3, created_at=2, hits=0, misses=0, ttft_s=3.0, full_ttft_s=None,
                 mode="full", context_tokens=300)]
    df = frames.queries_frame(rows)
    assert df["saved_s"].isna().all() and list(df["cum_saved_s"]) == [0.0, 0.0, 0.0]
    assert frames.full_prefill_fit(df)(200) == pytest.approx(2.0)  # a line through 2 points
    assert df["est_saved_s"][1] == pytest.approx(0.8)


def test_the_totals_sum_the_whole_query_log() -> None:
    index = CacheIndex("sqlite://")
    try:
        assert index.query_totals() == {"queries": 0, "hits": 0, "misses": 0, "paired": 0,
                                        "saved_s": 0.0}
        for mode, hits, full in (("blend", 2, 1.0), ("full", 0, 0.5), ("blend", 1, None)):
            index.log_query(question="q", mode=mode, n_chunks=2, hits=hits, misses=2 - hits,
                            context_tokens=10, recomputed_tokens=1, ttft_s=0.5,
                            full_ttft_s=full, answer="a")
        totals = index.query_totals()
        assert totals == {"queries": 3, "hits": 3, "misses": 3, "paired": 1,
                          "saved_s": pytest.approx(0.5)}
    finally:
        index.close()


def test_the_chunk_table_names_the_tier_that_served_each_hit_and_none_for_a_miss() -> None:
    from ragkv.trace import ChunkTrace, QueryTrace

    index = CacheIndex("sqlite://")
    try:
        keys = [f"{i:064x}" for i in range(3)]
        for key in keys:  # each is on disk by now: the miss's was stored after computing
            index.upsert_entry(key, model_fp="f", layout="l", n_tokens=2, nbytes=8,
                               blob_name=key, checksum="0", dtype="float16")
        trace = QueryTrace(mode="blend", ratio=0.1, policy="qhkvd", context_tokens=30, chunks=[
            ChunkTrace(keys[0], 2, True, 0, "a.md", tier="memory"),
            ChunkTrace(keys[1], 2, False, 2, "b.md"),
            ChunkTrace(keys[2], 2, None, 4, "c.md")])
        table = frames.chunk_table(index, trace)
        assert list(table["cache"]) == ["hit", "miss", "not looked up"]
        assert list(table["tier"]) == ["memory", "-", "disk"]
    finally:
        index.close()


def test_heatmap_frame_bins_wide_prompts() -> None:
    m = frames.recompute_matrix([torch.tensor([0, 1, 2, 3, 9]), torch.tensor([3]), []], 10)
    assert m.shape == (3, 10) and m[0].sum() == 5 and m[1, 3] and not m[2].any()
    df, width = frames.heatmap_frame(m, 0, 10, max_columns=5)
    assert width == 2 and len(df) == 15
    assert df[(df.layer == 0) & (df.position == 0)]["recomputed"].item() == 1.0
    assert df[(df.layer == 0) & (df.position == 8)]["recomputed"].item() == 0.5
    df, width = frames.heatmap_frame(m, 2, 5)
    assert width == 1 and sorted(set(df.position)) == [2, 3, 4]
    assert list(frames.token_shades(m, 2, 5).round(3)) == [round(1 / 3, 3), round(2 / 3, 3), 0]


def test_cache_size_frames_shape_the_index_summaries() -> None:
    index = CacheIndex("sqlite://")  # in memory: the frames only shape what the index reports
    try:
        assert list(frames.size_by_tier(index).itertuples(index=False)) == [("disk", 0, 0.0)]
        assert frames.size_by_document(index).empty
        assert list(frames.size_by_document(index).columns) == ["document", "chunks", "MiB"]
        assert list(frames.top_chunks(index).columns) == ["chunk", "hits", "tokens", "text"]
        doc, _ = index.add_document("a.md", "", "1" * 64)
        keys = [f"{i:064x}" for i in range(3)]
        index.add_chunks(doc, [ChunkRecord(i, f"line {i}\n" + "x" * 200, [1, 2 + i], keys[i])
                               for i in range(2)])
        for i, key in enumerate(keys):  # keys[2] is no chunk's (a prompt prefix, say)
            index.upsert_entry(key, model_fp="f", layout="l", n_tokens=i + 1, nbytes=2**20,
                               blob_name=key, checksum="0", dtype="float16", on_remote=i == 0)
        index.record_hits([keys[2], keys[2], keys[1]])
        tiers = frames.size_by_tier(index)
        assert tiers.to_dict("records") == [{"tier": "disk", "entries": 3, "MiB": 3.0},
                                            {"tier": "remote", "entries": 1, "MiB": 1.0}]
        assert frames.size_by_document(index).to_dict("records") == [
            {"document": "a.md", "chunks": 2, "MiB": 2.0}]
        top = frames.top_chunks(index, 10)
        assert list(top["chunk"]) == [keys[2][:12], "a.md #1"]
        assert list(top["hits"]) == [2, 1] and list(top["tokens"]) == [3, 2]
        assert top["text"][0] == "" and top["text"][1] == ("line 1 " + "x" * 200)[:120]
        # a chunk's other entry (its first-position one, with the same token ids) adds up
        index.upsert_entry("f" * 64, model_fp="f", layout="l", n_tokens=2, nbytes=2**20,
                           blob_name="f" * 64, checksum="0", dtype="float16",
                           ids_sha256=ids_sha256([1, 3]))
        index.record_hits(["f" * 64] * 3)
        top = frames.top_chunks(index, 10)
        assert list(top["chunk"]) == ["a.md #1", keys[2][:12]] and list(top["hits"]) == [4, 2]
    finally:
        index.close()


USER_TEXTS = ["What does f(*args, **kwargs) do?", "Why is __init__ called?",
              "Is $x$ a variable in `sh`?", "# not a heading", "1. not a list",
              "[a link](http://x)", r"C:\docs\my_file_.txt", "<b>bold?</b>", "x > y | z ~ w!",
              ":smile: and :red[red]", "plain words"]


@pytest.mark.parametrize("text", USER_TEXTS)
def test_user_text_shows_as_it_is_in_markdown(text: str) -> None:
    """A CommonMark renderer (rich's) shows the escaped text character for character: no
    emphasis, heading, list, link or code span, and every backslash of the text kept."""
    from markdown_it import MarkdownIt

    html = MarkdownIt("commonmark").render(frames.literal_md(text))
    assert html.startswith("<p>") and html.count("<") == 2, html  # <p> and </p> only
    plain = MarkdownIt("commonmark").render(text)
    visible = html[3:-5].replace("&lt;", "<").replace("&gt;", ">").replace("&amp;", "&")
    assert visible == text, (visible, plain)


def test_answers_keep_their_markdown_but_not_math() -> None:
    from markdown_it import MarkdownIt

    md = frames.answer_md("It costs $5 or $x$.\n\n1. **first**\n2. `code`")
    html = MarkdownIt("commonmark").render(md)
    assert "<strong>first</strong>" in html and "<ol>" in html and "<code>code</code>" in html
    assert "It costs $5 or $x$." in html  # shown as dollars, not read as math
    assert md.count("\\$") == 3


def test_no_saving_is_estimated_where_the_fit_does_not_rise_from_the_measured_lengths(
        ) -> None:
    """Full prefills of 0.10, 0.30 and 0.35 s at 300, 600 and 900 tokens fit a parabola
    below zero at 2,000 and at 100 tokens: blends there were "estimated" to save -1.12 s.
    (A fit that rises past the measured lengths still estimates there:
    ``test_robustness.py``.)"""
    rows = [dict(id=i, created_at=i, hits=0, misses=0, ttft_s=t, full_ttft_s=None,
                 mode="full", context_tokens=n)
            for i, (n, t) in enumerate([(300, 0.10), (600, 0.30), (900, 0.35)])]
    rows += [dict(id=3 + i, created_at=3 + i, hits=2, misses=0, ttft_s=0.05, full_ttft_s=None,
                  mode="blend", context_tokens=n) for i, n in enumerate([2000, 100, 750])]
    df = frames.queries_frame(rows)
    est = df["est_saved_s"]
    assert est[3:5].isna().all() and 0 < est[5] < 0.35  # only the blend within 300-900 tokens
    assert df["cum_with_est_s"].iloc[-1] == pytest.approx(est[5])


def test_a_saving_is_estimated_from_the_same_engines_full_prefills_only() -> None:
    """The log now names the engine and model of each query: another model's full prefills
    (here 40x slower) gave this one's blends their "estimated" savings."""
    rows = [dict(id=i, created_at=i, hits=0, misses=0, ttft_s=t, full_ttft_s=None, mode="full",
                 context_tokens=n, engine="big model")
            for i, (n, t) in enumerate([(300, 4.0), (900, 12.0)])]
    rows += [dict(id=2, created_at=2, hits=2, misses=0, ttft_s=0.05, full_ttft_s=None,
                  mode="blend", context_tokens=600, engine="small model"),
             dict(id=3, created_at=3, hits=2, misses=0, ttft_s=0.5, full_ttft_s=None,
                  mode="blend", context_tokens=600, engine="big model")]
    df = frames.queries_frame(rows)
    assert np.isnan(df["est_saved_s"][2]) and df["est_saved_s"][3] == pytest.approx(7.5)


@pytest.mark.parametrize("answer, dollars", [
    ("Run `echo $HOME` to see it; it costs $5.", 1),
    ("Install it:\n\n```sh\n$ pip install ragkv\nexport PATH=$HOME/bin:$PATH\n```\nThen $3.", 1),
    ("~~~\n$x\n~~~\n\nA ``span with ` and $y`` and $z.", 1),
])
def test_dollars_inside_code_show_without_a_backslash(answer: str, dollars: int) -> None:
    """Shell commands in answers showed as `echo \\$HOME`: code shows a backslash as is."""
    from markdown_it import MarkdownIt

    md = frames.answer_md(answer)
    assert md.count("\\$") == dollars
    html = MarkdownIt("commonmark").render(md)
    assert "\\$" not in html and html.count("$") == answer.count("$")
    for step in (1, 2, 3, 7):  # streamed in pieces of any size, the same Markdown
        pieces = [answer[i:i + step] for i in range(0, len(answer), step)]
        assert "".join(frames.answer_md_stream(pieces)) == md


def test_token_pieces_keep_characters_that_span_tokens(tiny_model) -> None:
    """The Inspect page decoded each token alone: accents, CJK and emoji showed as U+FFFD."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model)
    sample = "Le café, ça va très bien. 日本語のテキスト 🎉👍🏽 and `$HOME`.\n\nNext"
    ids = tok(sample, add_special_tokens=False)["input_ids"]
    pieces = frames.token_pieces(tok, ids)
    assert len(pieces) == len(ids) and "".join(pieces) == tok.decode(ids)
    assert not any("\ufffd" in p for p in pieces)
    assert "".join(pieces[:3]) == tok.decode(ids[:3])  # whole tokens stay with their token


def test_trace_notes_name_a_fallback_and_chunks_left_out() -> None:
    from ragkv.trace import ChunkTrace, QueryTrace

    left = [ChunkTrace("k" * 64, 500, None, 0, "doc9.txt"),
            ChunkTrace("c0ffee" * 8, 500, None, 0)]
    trace = QueryTrace(mode="blend", ratio=0.15, policy="qhkvd", context_tokens=900,
                       error="fusion failed: x", left_out=left)
    assert frames.trace_notes(trace) == [
        "blend: fusion failed: x",
        "Left out 2 retrieved chunk(s) that did not fit the model's window: doc9.txt, c0ffeec0ffee"]
    assert frames.trace_notes(QueryTrace(mode="full", ratio=None, policy=None,
                                         context_tokens=900)) == []
