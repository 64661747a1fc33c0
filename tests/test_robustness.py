"""What users throw at ragkv: prompts longer than the window, bad CLI input, unreadable files,
and the dashboard's TTFT savings (measured where paired, estimated and labelled elsewhere)."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from ragkv.api import RagKV, pack
from ragkv.chunking import RetrievedChunk
from ragkv.cli import app
from ragkv.config import RagkvConfig

runner = CliRunner()
QUESTION = "What does the assert statement do?"


@pytest.fixture(scope="module")
def rag(tmp_path_factory, tiny_model: Path) -> RagKV:
    r = RagKV(RagkvConfig(home=tmp_path_factory.mktemp("robust"), model=tiny_model,
                          chunk_tokens=64))
    r.ingest_text("doc", "The assert statement checks a condition and raises. " * 40)
    return r


def test_chunks_are_packed_by_rank_into_the_window(rag):
    chunks = rag.retrieve(QUESTION, 4)
    assert len(chunks) >= 3
    tpl = rag.template
    fixed = len(tpl.prefix_ids) + len(tpl.suffix_ids(QUESTION))
    room = fixed + len(chunks[0].token_ids) + len(tpl.sep_ids) + len(chunks[1].token_ids)
    kept, left = pack(tpl, chunks, QUESTION, room)
    assert kept == chunks[:2] and left == chunks[2:]
    big = RetrievedChunk(list(chunks[0].token_ids) * 20, "", document="big")
    kept, left = pack(tpl, [big, *chunks[:1]], QUESTION, room)
    assert kept == chunks[:1] and left == [big]  # a later, shorter chunk still fits
    with pytest.raises(ValueError, match="not even one"):
        pack(tpl, [big], QUESTION, fixed + 5)
    with pytest.raises(ValueError, match="no room"):
        pack(tpl, chunks, QUESTION, fixed)


def test_an_answer_budget_as_long_as_the_window_names_itself(rag):
    """Not "the question takes 36 tokens: no room" for what is a max_new_tokens too large."""
    window = rag.backend.max_model_len
    with pytest.raises(ValueError, match=f"max_new_tokens {window} leaves no room .* {window} "):
        rag.generate(rag.retrieve(QUESTION, 2), QUESTION, max_new_tokens=window)
    out = runner.invoke(app, ["ask", QUESTION, "--max-new-tokens", "100000",
                              "--home", str(rag.config.home), "--model", str(rag.config.model)])
    assert out.exit_code == 2 and "max_new_tokens 100000 leaves no room" in out.output


def test_no_prompt_exceeds_the_engines_window(rag, monkeypatch):
    chunks = rag.retrieve(QUESTION, 4)
    tpl = rag.template
    window = (len(tpl.prefix_ids) + len(tpl.suffix_ids(QUESTION)) + len(chunks[0].token_ids)
              + 8)
    monkeypatch.setattr(rag.backend, "max_model_len", window)
    ans = rag.generate(chunks, QUESTION, max_new_tokens=8)
    assert len(ans.prompt) + 8 <= window
    assert len(ans.trace.chunks) == 1 and len(ans.trace.left_out) == len(chunks) - 1
    assert ans.trace.to_dict()["left_out"][0]["n_tokens"] == len(chunks[1].token_ids)


def test_a_sliding_window_is_where_prompts_are_cut(tmp_path, smol_path):
    """The fusion attends to every earlier position, so a prompt past a Mistral's sliding
    window cannot be fused: the facade leaves chunks out as for the model's own window."""
    import torch
    from transformers import AutoTokenizer, MistralConfig, MistralForCausalLM

    from ragkv.engine.vllm.engine import model_window

    torch.manual_seed(0)
    folder = tmp_path / "mistral"
    MistralForCausalLM(MistralConfig(
        vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, sliding_window=160,
        max_position_embeddings=4096)).save_pretrained(folder)
    AutoTokenizer.from_pretrained(smol_path).save_pretrained(folder)
    assert model_window(folder) == 160  # what a vLLM engine for it is started with
    rag = RagKV(RagkvConfig(home=tmp_path / "home", model=folder, chunk_tokens=48,
                            precompute_context="prefix"))
    try:
        rag.ingest_text("doc", "The assert statement checks a condition and raises. " * 30)
        chunks = rag.retrieve(QUESTION, 4)
        assert sum(len(c.token_ids) for c in chunks) > 160
        for mode in ("full", "blend"):
            ans = rag.generate(chunks, QUESTION, mode=mode, max_new_tokens=4)
            assert len(ans.prompt) + 4 <= 160 and ans.trace.left_out, mode
    finally:
        rag.close()


def test_cli_user_errors_are_one_line_and_exit_2(tmp_path, tiny_model):
    home = ["--home", str(tmp_path), "--model", str(tiny_model)]
    for args, words in ((["ask", ""], "empty"), (["ask", "q", "--policy", "bogus"], "bogus"),
                        (["ask", "q", "-k", "0"], "-k"), (["ask", "q", "--ratio", "2"], "ratio"),
                        (["ask", "q", "--engine", "nonsense"], "engine")):
        out = runner.invoke(app, [*args, *home])
        assert out.exit_code == 2, (args, out.output)
        assert words in out.output and "Traceback" not in out.output
        assert len(out.output.strip().splitlines()) <= 2, out.output


def test_ingest_skips_unreadable_files_and_ingests_the_rest(tmp_path, tiny_model):
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "good.md").write_text("The with statement wraps a block. " * 20)
    (docs / "latin1.txt").write_bytes("Le café crème est servi. ".encode("cp1252") * 20)
    (docs / "junk.txt").write_bytes(bytes(range(256)) * 40)
    out = runner.invoke(app, ["ingest", str(docs), "--home", str(tmp_path / "h"),
                              "--model", str(tiny_model)])
    assert out.exit_code == 0, out.output
    assert "skipped" in out.output and "junk.txt" in out.output
    assert "2 documents" in out.output and "files skipped: 1" in out.output
    strict = runner.invoke(app, ["ingest", str(docs), "--strict", "--home",
                                 str(tmp_path / "h2"), "--model", str(tiny_model)])
    assert strict.exit_code == 2 and "junk.txt" in strict.output


def test_ask_compare_shows_both_answers_sources_and_logs_the_pair(tmp_path, tiny_model):
    home = ["--home", str(tmp_path), "--model", str(tiny_model)]
    docs = tmp_path / "d.md"
    docs.write_text("The assert statement checks a condition. " * 30)
    assert runner.invoke(app, ["ingest", str(docs), *home]).exit_code == 0
    out = runner.invoke(app, ["ask", QUESTION, "-k", "2", "--compare",
                              "--max-new-tokens", "4", *home])
    assert out.exit_code == 0, out.output
    assert "full prefill" in out.output and "ragkv blend" in out.output
    assert "d.md" in out.output  # the sources
    from ragkv.cache_index import CacheIndex
    from ragkv.ui import frames

    rows = CacheIndex(RagkvConfig(home=tmp_path).resolved_index_url).recent_queries(10)
    blend = [r for r in rows if r["mode"] == "blend"]
    assert blend and blend[0]["full_ttft_s"] is not None  # the pair counts on the dashboard
    df = frames.queries_frame(rows)
    assert df["saved_s"].notna().sum() == 1


def test_dashboard_estimates_only_where_nothing_was_measured():
    from ragkv.ui import frames

    rows = [dict(id=1, created_at=0, mode="full", hits=0, misses=0, context_tokens=1000,
                 ttft_s=1.0, full_ttft_s=None),
            dict(id=2, created_at=1, mode="full", hits=0, misses=0, context_tokens=2000,
                 ttft_s=2.2, full_ttft_s=None),
            dict(id=3, created_at=2, mode="blend", hits=2, misses=0, context_tokens=2000,
                 ttft_s=0.5, full_ttft_s=2.4),
            dict(id=4, created_at=3, mode="blend", hits=2, misses=0, context_tokens=3000,
                 ttft_s=0.6, full_ttft_s=None)]
    df = frames.queries_frame(rows)
    assert df["saved_s"][2] == pytest.approx(1.9)
    assert df["est_saved_s"].notna().tolist() == [False, False, False, True]
    assert df["est_saved_s"][3] > 2.0  # the fit grows with length past the measured 2.2-2.4 s
    assert df["cum_saved_s"].iloc[-1] == pytest.approx(1.9)
    assert df["cum_with_est_s"].iloc[-1] > df["cum_saved_s"].iloc[-1]
    assert frames.full_prefill_fit(frames.queries_frame(rows[2:3])) is None


def test_every_fingerprint_fits_the_index_column(tiny_model, rag):
    """PostgreSQL enforces the index's 64-character model_fp column (SQLite does not): a
    longer vLLM fingerprint made every store through vLLM fail there."""
    from ragkv.cache_index.models import KVEntry
    from ragkv.engine.vllm.params import vllm_fingerprint

    width = KVEntry.__table__.c.model_fp.type.length
    assert len(vllm_fingerprint(str(tiny_model), "float32")) == width
    assert len(rag.fingerprint) == width


def test_a_server_that_is_not_there_is_one_clear_error(tmp_path, tiny_model):
    import socket

    from ragkv.engine.base import EngineError

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{s.getsockname()[1]}/v1"
    with pytest.raises(EngineError, match="did not answer"):
        RagKV(RagkvConfig(home=tmp_path, model=tiny_model, engine=url))
    out = runner.invoke(app, ["ask", "q", "--engine", url, "--home", str(tmp_path),
                              "--model", str(tiny_model)])
    assert out.exit_code == 1 and "ragkv serve" in out.output
    assert "Traceback" not in out.output
