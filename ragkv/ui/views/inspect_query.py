"""Inspect page: which tokens blend recomputed at which layers, and full/reuse/blend answers
on the same retrieved chunks side by side."""

from __future__ import annotations

import html
from dataclasses import replace

import numpy as np
import streamlit as st

from ragkv.config import DEFAULT_RATIO, POLICIES, BlendConfig
from ragkv.ui import frames, state

RESULT_KEY = "ragkv_inspect"
MODES_SHOWN = ("full", "reuse", "blend")


def default_question(rag) -> str:
    last = st.session_state.get(state.LAST_ASK_KEY)
    if last is not None:
        return last["params"].question
    recent = rag.index.recent_queries(1)
    return recent[0]["question"] if recent else ""


def controls(rag) -> dict | None:
    with st.form("inspect"):
        question = st.text_input("Question", value=default_question(rag), key="inspect_question")
        c1, c2, c3, c4 = st.columns(4)
        k = c1.number_input("Chunks (k)", 1, 32, 4, key="inspect_k")
        ratio = c2.slider("Recompute ratio", 0.0, 1.0, DEFAULT_RATIO, 0.01, key="inspect_ratio")
        policy = c3.selectbox("Policy", POLICIES, key="inspect_policy",  # as on Ask
                              index=POLICIES.index(BlendConfig().policy))
        max_new = c4.number_input("Max new tokens", 1, 1024, 48, key="inspect_max_new")
        if not st.form_submit_button("Run full, reuse and blend", type="primary"):
            return None
    if not question.strip():
        st.warning("Type a question first.")
        return None
    return dict(question=question.strip(), k=int(k), ratio=float(ratio), policy=policy,
                max_new_tokens=int(max_new))


def run_modes(rag, question: str, k: int, ratio: float, policy: str,
              max_new_tokens: int) -> dict | None:
    """Answer with each mode over one retrieval, so the answers differ only by the mode."""
    blend = replace(rag.config.blend, ratio=ratio, policy=policy)
    with state.engine_lock():
        chunks = rag.retrieve(question, k)
        if not chunks:
            return None
        answers = {}
        full_ttft = None
        for mode in MODES_SHOWN:
            stream = rag.stream(chunks, question, mode=mode, blend=blend,
                                max_new_tokens=max_new_tokens, record=mode == "blend",
                                log_query=mode != "full")
            if mode == "full":
                full_ttft = stream.trace.ttft_s
            stream.trace.full_ttft_s = full_ttft  # measured on this same prompt just before
            answers[mode] = rag.generate_from(stream)
    blend_ans = answers["blend"]
    tok = rag.tokenizer
    return {
        "question": question, "ratio": ratio, "policy": policy,
        "ids": list(blend_ans.prompt.ids),
        "pieces": frames.token_pieces(tok, blend_ans.prompt.ids),
        "spans": list(blend_ans.prompt.chunk_spans),
        "documents": [c.document or "-" for c in blend_ans.trace.chunks],
        "layer_sets": blend_ans.trace.layer_sets or [],
        "answers": {m: {"text": a.text, "ttft_s": a.trace.ttft_s, "hits": a.trace.hits,
                        "n_chunks": len(a.trace.chunks),
                        "recomputed": a.trace.recomputed_tokens}
                    for m, a in answers.items()},
        "notes": {m: frames.trace_notes(a.trace) for m, a in answers.items()},
    }


def heatmap(matrix: np.ndarray, start: int, end: int, spans: list[tuple[int, int]],
            max_columns: int, title: str):
    import altair as alt

    df, width = frames.heatmap_frame(matrix, start, end, max_columns)
    df["end"] = df["position"] + width
    label = "recomputed" if width == 1 else f"share recomputed ({width} tokens per column)"
    rects = alt.Chart(df).mark_rect().encode(
        x=alt.X("position:Q", title="prompt position", scale=alt.Scale(domain=[start, end])),
        x2="end:Q",
        y=alt.Y("layer:O", title="layer", sort="descending"),
        color=alt.Color("recomputed:Q", title=label,
                        scale=alt.Scale(domain=[0, 1], scheme="oranges")),
        tooltip=["layer", "position", alt.Tooltip("recomputed:Q", format=".2f")],
    )
    bounds = [{"at": s} for s, _ in spans if start <= s <= end]
    rules = alt.Chart(alt.Data(values=bounds)).mark_rule(color="steelblue").encode(x="at:Q")
    return (rects + rules).properties(title=title, height=max(160, 12 * matrix.shape[0]))


def highlighted_text(pieces: list[str], shades: np.ndarray) -> str:
    """The chunk's tokens, each shaded by the share of layers that recomputed it."""
    out = []
    for piece, shade in zip(pieces, shades, strict=True):
        text = html.escape(piece).replace("\n", "<br>")
        out.append(f'<span style="background: rgba(255,120,0,{0.1 + 0.8 * shade:.2f})" '
                   f'title="recomputed at {shade:.0%} of layers">{text}</span>'
                   if shade > 0 else text)
    return ('<div style="font-family: monospace; font-size: 0.85em; line-height: 1.6">'
            + "".join(out) + "</div>")


def show_recompute(res: dict) -> None:
    st.subheader("Recomputed tokens (blend)")
    if not res["layer_sets"]:
        st.info("Nothing was recorded for this run.")
        return
    matrix = frames.recompute_matrix(res["layer_sets"], len(res["ids"]))
    st.altair_chart(heatmap(matrix, 0, len(res["ids"]), res["spans"], 240,
                            "Whole prompt: layers x positions (blue lines: chunk starts)"),
                    width="stretch")
    labels = [f"chunk {i + 1}: {doc} [{s}, {e})"
              for i, ((s, e), doc) in enumerate(zip(res["spans"], res["documents"], strict=True))]
    if not labels:
        return
    pick = st.selectbox("Chunk", range(len(labels)), format_func=labels.__getitem__,
                        key="inspect_chunk")
    s, e = res["spans"][pick]
    st.altair_chart(heatmap(matrix, s, e, [], 600, labels[pick]), width="stretch")
    shades = frames.token_shades(matrix, s, e)
    st.caption(f"{int((matrix[-1, s:e]).sum())} of {e - s} tokens recomputed at the last layer; "
               "shading: share of layers that recomputed the token.")
    st.markdown(highlighted_text(res["pieces"][s:e], shades), unsafe_allow_html=True)


def show_answers(res: dict) -> None:
    st.subheader("Answers on the same chunks")
    full_ttft = res["answers"]["full"]["ttft_s"]
    for col, mode in zip(st.columns(len(MODES_SHOWN)), MODES_SHOWN, strict=True):
        a = res["answers"][mode]
        with col:
            st.markdown(f"**{mode}**" + (f" (ratio {res['ratio']:.2f}, {res['policy']})"
                                         if mode == "blend" else ""))
            st.metric(f"TTFT {mode}", f"{a['ttft_s'] * 1000:.0f} ms",
                      delta=None if mode == "full"
                      else f"x{full_ttft / max(a['ttft_s'], 1e-9):.2f} vs full",
                      delta_color="off")
            note = f"hits {a['hits']}/{a['n_chunks']}, {a['recomputed']} tokens recomputed"
            if mode != "full":
                same = a["text"] == res["answers"]["full"]["text"]
                note += f"; same text as full: {'yes' if same else 'no'}"
            st.caption(note)
            for warning in res.get("notes", {}).get(mode, []):
                st.warning(frames.literal_md(warning))
            st.markdown(frames.answer_md(a["text"]) or "_(empty answer)_")


def main() -> None:
    st.title("Inspect")
    rag = state.get_rag()
    if rag.index.stats()["documents"] == 0:
        st.info("No documents yet: ingest some on the **Ingest** page first.")
        return
    params = controls(rag)
    if params is not None:
        with st.spinner("Answering with full, reuse and blend..."):
            try:
                res = run_modes(rag, **params)
            except (ValueError, LookupError) as exc:
                st.error(f"Could not answer: {frames.literal_md(str(exc))}")
                return
        if res is None:
            st.info("No chunks to retrieve: ingest documents first.")
            return
        st.session_state[RESULT_KEY] = res
    res = st.session_state.get(RESULT_KEY)
    if res is None:
        st.info("Pick a question and press **Run**: full, reuse and blend answer it over the "
                "same retrieved chunks, and a heatmap shows which prompt tokens blend "
                "recomputed at which layers.")
        return
    st.caption(f"Question: *{frames.literal_md(res['question'])}*")
    show_answers(res)
    show_recompute(res)


if __name__ == "__main__":
    main()
