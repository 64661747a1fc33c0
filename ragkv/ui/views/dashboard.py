"""Dashboard page: cache reuse and TTFT over time, cache size, hottest chunks, recent queries."""

from __future__ import annotations

import streamlit as st

from ragkv.ui import frames, state


def overview(rag) -> None:
    s = rag.index.stats()
    c = st.columns(5)
    c[0].metric("Documents", s["documents"])
    c[1].metric("Chunks", s["chunks"])
    c[2].metric("KV entries", s["kv_entries"])
    c[3].metric("Cache size", f"{s['kv_bytes'] / 2**20:.1f} MiB")
    c[4].metric("Queries", s["queries"])


#: Queries the charts draw (the newest); the totals in their captions are of every query.
WINDOW = 1000


def reuse_over_time(df, totals) -> None:
    left, right = st.columns(2)
    with left:
        st.subheader("Chunk hit rate")
        rated = df.dropna(subset=["hit_rate"])
        if rated.empty:
            st.info("No query looked chunks up yet (full-prefill queries do not).")
        else:
            chart = rated[["created_at", "hit_rate"]].copy()
            chart["rolling (10 queries)"] = chart["hit_rate"].rolling(10, min_periods=1).mean()
            st.line_chart(chart, x="created_at", y=["hit_rate", "rolling (10 queries)"])
            st.caption(f"Per query: hits / chunks looked up{_latest(df, totals)}. Overall "
                       f"{totals['hits']}/{totals['hits'] + totals['misses']} hits.")
    with right:
        st.subheader("Cumulative TTFT saved")
        measured = df.dropna(subset=["saved_s"])
        estimated = df.dropna(subset=["est_saved_s"])
        if measured.empty and estimated.empty:
            st.info("Nothing to show yet: no query has a full-prefill TTFT measured on its "
                    "prompt, and too few full prefills were measured to estimate one. Tick "
                    "*Measure full prefill* on the Ask page, or run `ragkv ask --compare`.")
            return
        lines = ["cum_saved_s"] + (["cum_with_est_s"] if not estimated.empty else [])
        chart = df[["created_at", *lines]].rename(columns={
            "cum_saved_s": "measured", "cum_with_est_s": "measured + estimated"})
        st.line_chart(chart, x="created_at", y=[c for c in chart.columns if c != "created_at"],
                      y_label="seconds")
        caption = (f"Measured: full-prefill TTFT minus TTFT on the same prompt, summed over "
                   f"{totals['paired']} of {totals['queries']} queries "
                   f"({totals['saved_s']:.2f} s).")
        if not estimated.empty:
            caption += (f" Estimated for {len(estimated)} more{_latest(df, totals, ' of')}: "
                        f"full-prefill TTFT from a fit "
                        f"of this machine's measured full prefills against prompt length "
                        f"({estimated['est_saved_s'].sum():.2f} s; an estimate, not a "
                        f"measurement).")
        st.caption(caption)


def _latest(df, totals, lead: str = ",") -> str:
    """Names the window where the charts draw only the latest queries."""
    return f"{lead} the latest {len(df):,} queries" if totals["queries"] > len(df) else ""


def cache_size(rag) -> None:
    left, right = st.columns(2)
    with left:
        st.subheader("Cache size by tier")
        tiers = frames.size_by_tier(rag.index)
        st.bar_chart(tiers, x="tier", y="MiB")
        s = rag.index.stats()
        st.caption(f"{s['kv_entries']} KV entries, {s['kv_bytes'] / 2**20:.1f} MiB as the "
                   "cache index records them (shared by every engine on this cache)")
    with right:
        st.subheader("Cache size by document")
        docs = frames.size_by_document(rag.index)
        if docs.empty:
            st.info("No documents yet.")
        else:
            st.bar_chart(docs, x="document", y="MiB")


def hottest(rag) -> None:
    st.subheader("Top chunks by hits")
    top = frames.top_chunks(rag.index, 10)
    if top.empty:
        st.info("No chunk has been reused yet.")
        return
    st.bar_chart(top, x="chunk", y="hits")
    st.dataframe(top, hide_index=True, width="stretch")


def recent(df) -> None:
    st.subheader("Recent queries")
    cols = ["created_at", "question", "mode", "ratio", "n_chunks", "hits", "misses",
            "recomputed_tokens", "ttft_s", "full_ttft_s", "retrieval_s", "answer"]
    st.dataframe(df.sort_values("id", ascending=False)[cols].head(50), hide_index=True,
                 width="stretch")


def main() -> None:
    st.title("Dashboard")
    rag = state.get_rag()
    overview(rag)
    if rag.index.stats()["documents"] == 0:
        st.info("No documents yet: ingest some on the **Ingest** page.")
    totals = rag.index.query_totals()
    df = frames.queries_frame(rag.index.recent_queries(WINDOW))
    if not df.empty:  # the cumulative lines start from what the queries before these saved
        df[["cum_saved_s", "cum_with_est_s"]] += totals["saved_s"] - df["saved_s"].sum()
    if df.empty:
        st.info("No queries yet: ask something on the **Ask** page and come back.")
    else:
        reuse_over_time(df, totals)
    cache_size(rag)
    hottest(rag)
    if not df.empty:
        recent(df)


if __name__ == "__main__":
    main()
