"""Ask page: a streamed answer beside per-chunk cache figures and TTFT metrics."""

from __future__ import annotations

import time
from dataclasses import dataclass, replace

import streamlit as st

from ragkv.config import (
    DEFAULT_RATIO,
    FAST_PRESELECT,
    MODES,
    POLICIES,
    PRESELECT_FROM,
    BlendConfig,
)
from ragkv.trace import QueryTrace
from ragkv.ui import frames, state
from ragkv.ui.state import FullTTFT

#: Shown when the model's first tokens decode to nothing visible (EOS at once, whitespace).
EMPTY_ANSWER = "_(empty answer: the model stopped or produced only whitespace)_"


@dataclass(frozen=True)
class AskParams:
    question: str
    k: int
    mode: str
    ratio: float
    policy: str
    max_new_tokens: int
    measure_full: bool
    preselect: bool = False


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.0f} ms"


def controls() -> AskParams | None:
    with st.form("ask"):
        question = st.text_input("Question", key="ask_question",
                                 placeholder="What does the with statement do?")
        c1, c2, c3, c4 = st.columns(4)
        mode = c1.selectbox("Mode", MODES, index=MODES.index("blend"), key="ask_mode",
                            help="full: no reuse; prefix: first chunk only; reuse: all chunks, "
                                 "nothing recomputed; blend: reuse plus CacheBlend recompute")
        ratio = c2.slider("Recompute ratio", 0.0, 1.0, DEFAULT_RATIO, 0.01, key="ask_ratio",
                          help="blend only: share of chunk tokens recomputed")
        policy = c3.selectbox("Policy", POLICIES, key="ask_policy", help="blend only",
                          index=POLICIES.index(BlendConfig().policy))
        k = c4.number_input("Chunks (k)", 1, 32, 4, key="ask_k")
        c5, c6, c7 = st.columns(3)
        max_new = c5.number_input("Max new tokens", 1, 1024, 64, key="ask_max_new")
        measure = c6.checkbox("Measure full prefill on the same prompt (runs it first)",
                              key="ask_measure_full")
        preselect = c7.checkbox(
            "Faster blend: preselect by context scores", key="ask_preselect",
            help=f"blend only: before the check layer, compute only {FAST_PRESELECT:g}x the "
                 "ratio's tokens, those whose KV depends most on context (scores stored with "
                 "anchor entries) and that the question reads; the default does this from "
                 f"{PRESELECT_FROM:,} prompt tokens, the box on shorter prompts too")
        if not st.form_submit_button("Ask", type="primary"):
            return None
    if not question.strip():
        st.warning("Type a question first.")
        return None
    return AskParams(question.strip(), int(k), mode, float(ratio), policy, int(max_new),
                     bool(measure), bool(preselect))


def full_caption(trace: QueryTrace, full: FullTTFT | None) -> str:
    if trace.mode == "full":
        return "This answer is full prefill itself, so its speed-up is 1 by definition."
    if full is None:
        return ("Full-prefill TTFT not measured for this prompt yet: tick *Measure full prefill* "
                "to measure it (no estimate is shown).")
    when = time.strftime("%H:%M:%S UTC", time.gmtime(full.measured_at))
    if full.source == "now":
        return "Full-prefill TTFT measured just now on this exact prompt."
    if full.source == "this server":
        return f"Full-prefill TTFT: last figure measured for this exact prompt, at {when}."
    return (f"Full-prefill TTFT: last figure in the query log for this question and chunk "
            f"count, at {when} (same chunks assumed).")


def show_metrics(trace: QueryTrace, full: FullTTFT | None) -> None:
    c1, c2, c3, c4, c5, c6 = st.columns(6)
    c1.metric("TTFT (this answer)", ms(trace.ttft_s),
              help="From the request to the first token: lookup, KV loading, misses, fusion. "
                   "Retrieval is not included.")
    if full is not None:
        label = "Full-prefill TTFT" + ("" if full.source == "now" else " (last measured)")
        c2.metric(label, ms(full.seconds))
        c3.metric("Speed-up", f"x{full.seconds / max(trace.ttft_s, 1e-9):.2f}")
    else:
        c2.metric("Full-prefill TTFT", "not measured")
        c3.metric("Speed-up", "-")
    chunk_tokens = sum(c.n_tokens for c in trace.chunks)
    c4.metric("Chunk hits", f"{trace.hits}/{len(trace.chunks)}")
    first = trace.recomputed_per_layer[0] if trace.recomputed_per_layer else 0
    c5.metric("Tokens recomputed", f"{trace.recomputed_tokens}/{trace.context_tokens}",
              help=f"At the last layer, of the whole prompt ({chunk_tokens} chunk tokens); "
                   f"{first} at layer 0 (fewer than every uncached token when the blend "
                   "preselected by context scores, as it does from "
                   f"{PRESELECT_FROM:,} prompt tokens)")
    c6.metric("Retrieval", ms(trace.retrieval_s) if trace.retrieval_s is not None else "-")
    st.caption(full_caption(trace, full))
    for note in frames.trace_notes(trace):
        st.warning(frames.literal_md(note))


def show_chunks(rag, trace: QueryTrace) -> None:
    st.subheader("Chunks")
    st.dataframe(frames.chunk_table(rag.index, trace), hide_index=True, width="stretch")


def known_full(rag, p: AskParams, keys: list[str], n_chunks: int) -> FullTTFT | None:
    memo = state.full_ttft_memo(state.settings().home)
    return memo.get(p.question, keys) or state.last_full_from_log(rag, p.question, n_chunks)


def answer(rag, p: AskParams) -> None:
    memo = state.full_ttft_memo(state.settings().home)
    with state.engine_lock():
        t = time.perf_counter()
        chunks = rag.retrieve(p.question, p.k)
        retrieval_s = time.perf_counter() - t
        if not chunks:
            st.info("No chunks to retrieve: ingest documents on the Ingest page first.")
            return
        keys = [c.key for c in chunks]
        full: FullTTFT | None = None
        if p.measure_full and p.mode != "full":
            with st.spinner("Measuring full prefill on the same chunks..."):
                base = rag.generate(chunks, p.question, mode="full", max_new_tokens=1,
                                    log_query=False)
            full = FullTTFT(base.trace.ttft_s, time.time(), "now")
        stream = rag.stream(chunks, p.question, mode=p.mode,
                            blend=replace(rag.config.blend, ratio=p.ratio, policy=p.policy,
                                          preselect=FAST_PRESELECT if p.preselect
                                          else rag.config.blend.preselect),
                            max_new_tokens=p.max_new_tokens, keep_kv=False, record=False,
                            retrieval_s=retrieval_s)
        if p.mode == "full":
            full = FullTTFT(stream.trace.ttft_s, time.time(), "now")
        if full is not None:
            memo.put(p.question, keys, full.seconds)
            if p.mode != "full":  # logged with the query when it ends: a pair to compare
                stream.trace.full_ttft_s = full.seconds
        else:
            full = known_full(rag, p, keys, len(chunks))
        # The prefill is done, so its figures show while the answer streams.
        show_metrics(stream.trace, full)
        left, right = st.columns([3, 2], gap="large")
        with right:
            show_chunks(rag, stream.trace)
        with left:
            st.subheader("Answer")
            text = st.write_stream(frames.answer_md_stream(stream))
            if not str(text or "").strip():
                st.markdown(EMPTY_ANSWER)
            if stream.answer is not None:
                st.caption(f"{len(stream.answer.tokens)} tokens generated")
    ans = stream.answer
    # Only small things go to session state: the answer's KV stays out of it.
    st.session_state[state.LAST_ASK_KEY] = {
        "params": p, "text": ans.text if ans else "", "trace": stream.trace, "full": full,
    }


def show_last(rag, last: dict) -> None:
    p: AskParams = last["params"]
    st.caption(f"Last question: *{frames.literal_md(p.question)}* ({p.mode}"
               + (f", ratio {p.ratio:.2f}, {p.policy}" if p.mode == "blend" else "")
               + (", preselected by context scores" if p.mode == "blend" and p.preselect
                  else "") + ")")
    show_metrics(last["trace"], last["full"])
    left, right = st.columns([3, 2], gap="large")
    with right:
        show_chunks(rag, last["trace"])
    with left:
        st.subheader("Answer")
        st.markdown(frames.answer_md(last["text"]) or EMPTY_ANSWER)


def main() -> None:
    st.title("Ask")
    rag = state.get_rag()
    if rag.index.stats()["documents"] == 0:
        st.info("No documents yet. Add some on the **Ingest** page "
                "(or run `ragkv ingest PATH`), then ask here.")
        return
    params = controls()
    if params is not None:
        try:
            answer(rag, params)
        except (ValueError, LookupError) as exc:
            st.error(f"Could not answer: {frames.literal_md(str(exc))}")
    elif (last := st.session_state.get(state.LAST_ASK_KEY)) is not None:
        show_last(rag, last)


if __name__ == "__main__":
    main()
