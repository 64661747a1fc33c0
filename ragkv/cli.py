"""Command line: ``ragkv ingest | ask | demo | bench | ui``; ``ragkv cache ...`` lives in
:mod:`ragkv.cli_cache`."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Annotated

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from ragkv.cli_cache import cache_app
from ragkv.cli_shared import Home, console, fail
from ragkv.config import MODES, BlendConfig, RagkvConfig, default_home

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Precomputed chunk KV + CacheBlend fusion for RAG.")
app.add_typer(cache_app, name="cache")

Model = Annotated[Path | None, typer.Option(help="local Llama-family transformers model dir")]
Context = Annotated[str, typer.Option(help="precompute chunks 'cold' or after the 'prefix'")]
Engine = Annotated[str, typer.Option(help="'hf' (transformers) or 'vllm' (the vllm extra)")]

DEMO_TOPICS = ("try", "exceptions", "raise", "with", "context-managers", "assert", "for",
               "while", "yield", "lambda", "import", "del", "global", "nonlocal", "if", "pass")
DEMO_QUESTIONS = (
    "What happens to the name bound by 'except E as N' when the except clause ends?",
    "What does the with statement do when the body of the block raises an exception?",
    "What does a yield expression do when it is used inside a function?",
)


def _progress() -> Progress:
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TimeElapsedColumn(), console=console, transient=False)


def _rag(home: Path, model: Path | None, context: str = "prefix", kv_dtype: str = "float16",
         engine: str = "hf", **blend):
    from ragkv.api import RagKV

    try:
        cfg = RagkvConfig(home=home, model=model, precompute_context=context,  # type: ignore[arg-type]
                          kv_dtype=kv_dtype, engine=engine,  # type: ignore[arg-type]
                          blend=BlendConfig(**blend))
    except ValueError as exc:
        fail(str(exc))
    try:
        with console.status("loading model and cache index"):
            if cfg.engine == "vllm":
                from ragkv.engine.vllm.rag import VLLMRag

                return VLLMRag(cfg)
            return RagKV(cfg)
    except (ValueError, FileNotFoundError, RuntimeError) as exc:  # bad model dir, no download
        fail(str(exc))


@app.command()
def ingest(paths: list[Path], home: Home = default_home(), model: Model = None,
           context: Context = "prefix", engine: Engine = "hf") -> None:
    """Ingest text/markdown files or folders: chunk, embed, precompute and store KV."""
    from ragkv.ingest import iter_text_files, read_text

    try:
        files = list(iter_text_files(paths))
    except FileNotFoundError as exc:
        fail(str(exc))
    if not files:
        fail("no .txt/.md/.rst files found")
    rag = _rag(home, model, context, engine=engine)
    _ingest_docs(rag, [(str(f), read_text(f)) for f in files])


def _ingest_docs(rag, docs: list[tuple[str, str]]) -> int:
    computed = 0
    with _progress() as bar:
        task = bar.add_task("ingesting", total=len(docs))
        for name, text in docs:
            bar.update(task, description=f"ingesting {name[-40:]}")
            computed += rag.ingest_text(name, text).precomputed
            bar.advance(task)
    s = rag.index.stats()
    console.print(f"{s['documents']} documents, {s['chunks']} chunks, {s['kv_entries']} KV "
                  f"entries ({s['kv_bytes'] / 2**20:.0f} MiB); computed now: {computed}")
    return computed


def _trace_table(answers) -> Table:
    t = Table("mode", "chunks", "hits", "context tok", "recomputed tok", "TTFT s", "speed-up")
    full = next((a.trace.ttft_s for a in answers if a.trace.mode == "full"), None)
    for a in answers:
        tr = a.trace
        up = f"x{full / tr.ttft_s:.1f}" if full else "-"
        t.add_row(tr.mode, str(len(tr.chunks)), f"{tr.hits}/{len(tr.chunks)}",
                  str(tr.context_tokens), str(tr.recomputed_tokens), f"{tr.ttft_s:.2f}", up)
    return t


@app.command()
def ask(question: str,
        k: Annotated[int, typer.Option("--k", "-k", help="chunks to retrieve")] = 4,
        mode: str = "blend", ratio: float = 0.15,
        policy: str = "qhkvd", max_new_tokens: int = 64,
        compare: Annotated[bool, typer.Option(help="also run full prefill")] = False,
        home: Home = default_home(), model: Model = None, context: Context = "prefix",
        engine: Engine = "hf") -> None:
    """Answer a question over the ingested documents."""
    if mode not in MODES:
        fail(f"unknown mode {mode!r}; choose from {', '.join(MODES)}")
    rag = _rag(home, model, context, engine=engine, ratio=ratio, policy=policy)
    if engine == "vllm":
        _ask_vllm(rag, question, k, mode, max_new_tokens, compare)
        return
    try:
        answers = [rag.ask(question, k=k, mode=mode, max_new_tokens=max_new_tokens)]
        if compare and mode != "full":
            answers.insert(0, rag.ask(question, k=k, mode="full", max_new_tokens=max_new_tokens))
    except LookupError as exc:
        fail(str(exc))
    console.print(f"[bold]{answers[-1].text}[/bold]")
    console.print(_trace_table(answers))


def _ask_vllm(rag, question: str, k: int, mode: str, max_new_tokens: int,
              compare: bool) -> None:
    if mode == "prefix":
        fail("mode 'prefix' is vLLM's own prefix caching with --engine vllm: use full")
    modes = ["full", mode] if compare and mode != "full" else [mode]
    try:
        answers = [rag.ask(question, k=k, mode=m, max_new_tokens=max_new_tokens) for m in modes]
    except LookupError as exc:
        fail(str(exc))
    console.print(f"[bold]{answers[-1].text}[/bold]")
    t = Table("mode", "hits", "misses", "context tok", "recomputed tok", "TTFT s", "speed-up")
    full = answers[0].ttft_s if answers[0].mode == "full" else None
    for a in answers:
        tr = a.trace
        t.add_row(a.mode, str(tr.get("hits", "-")), str(tr.get("misses", "-")),
                  str(a.context_tokens), str(tr.get("recomputed", "-")), f"{a.ttft_s:.2f}",
                  f"x{full / a.ttft_s:.1f}" if full else "-")
    console.print(t)


@app.command()
def demo(home: Home = default_home(), model: Model = None,
         all_topics: Annotated[bool, typer.Option(help="ingest every pydoc topic")] = False,
         max_new_tokens: int = 48, engine: Engine = "hf") -> None:
    """Ingest Python's documentation topics, then answer three questions with full and blend."""
    from ragkv.ingest import pydoc_topics

    rag = _rag(home, model, engine=engine)
    docs = pydoc_topics(None if all_topics else DEMO_TOPICS)
    computed = _ingest_docs(rag, docs)
    if not computed:
        console.print("[green]all chunk KV already stored: nothing precomputed[/green]")
    for q in DEMO_QUESTIONS:
        if engine == "vllm":
            console.rule(q)
            _ask_vllm(rag, q, 4, "blend", max_new_tokens, compare=True)
            continue
        chunks = rag.retrieve(q, k=4)
        full = rag.generate(chunks, q, mode="full", max_new_tokens=max_new_tokens)
        blend = rag.generate(chunks, q, mode="blend", max_new_tokens=max_new_tokens)
        blend.trace.full_ttft_s = full.trace.ttft_s
        console.rule(q)
        console.print(_trace_table([full, blend]))
        side = Table("full prefill", "ragkv blend", show_lines=True)
        side.add_row(full.text, blend.text)
        console.print(side)


@app.command()
def bench(cases: Annotated[Path, typer.Option(help="JSONL case file")],
          modes: str = "full,prefix,reuse,blend", ratios: str = "0.05,0.15,0.3",
          policies: str = "qhkvd", contexts: str = "prefix", check_layers: str = "1",
          deviation_on: str = "k", max_new_tokens: int = 32, limit: int | None = None,
          long_context: Annotated[int, typer.Option(help="also time one prompt of N tokens")] = 0,
          kv_dtype: Annotated[str, typer.Option(
              help="stored KV dtype: float16, bfloat16, float32 or int8 (run once per dtype "
                   "to compare fidelity)")] = "float16",
          out: Path | None = None, home: Home = default_home(), model: Model = None,
          engine: Engine = "hf") -> None:
    """TTFT and fidelity of each mode against full prefill on a case file."""
    from ragkv.bench import BenchSpec, load_cases, run_bench

    try:
        spec = BenchSpec(modes=modes.split(","), ratios=[float(r) for r in ratios.split(",")],
                         policies=policies.split(","), contexts=contexts.split(","),
                         check_layers=tuple(int(c) for c in check_layers.split(",")),
                         deviation_on=deviation_on, max_new_tokens=max_new_tokens, limit=limit)
        data = load_cases(cases)
    except (ValueError, OSError) as exc:
        fail(str(exc))
    rag = _rag(home, model, kv_dtype=kv_dtype, engine=engine)
    if engine == "vllm":
        _bench_vllm(rag, data, spec, out)
        return
    with _progress() as bar:
        tasks: dict[str, int] = {}

        def progress(stage: str, done: int, total: int) -> None:
            if stage not in tasks:
                tasks[stage] = bar.add_task(stage, total=total)
            bar.update(tasks[stage], completed=done)

        result = run_bench(rag.engine, home, data, spec, progress, base=rag.config)
    result["kv_dtype"] = rag.config.kv_storage
    if long_context:
        from ragkv.bench import long_context as run_long

        result["long_context"] = run_long(rag, long_context)
    _print_summary(result)
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=1))
        console.print(f"wrote {out}")


def _bench_vllm(rag, data: list[dict], spec, out: Path | None) -> None:
    from ragkv.engine.vllm.bench import run_vllm_bench

    result = run_vllm_bench(rag, data, spec)
    t = Table("mode", "ratio", "n", "TTFT cold full s", "TTFT full s", "TTFT s",
              "x vs cold", "x vs full", "1st agree", "1st KL top-20", "ROUGE-L", "recomp %",
              caption="medians; full = vLLM with its prefix cache, cold = nothing cached")
    for s in result["summary"]:
        t.add_row(s["mode"], "-" if s["ratio"] is None else f"{s['ratio']:.2f}", str(s["n"]),
                  f"{s['full_cold_ttft_median_s']:.2f}", f"{s['full_ttft_median_s']:.2f}",
                  f"{s['ttft_median_s']:.2f}", f"{s['speedup_vs_cold_median']:.2f}",
                  f"{s['speedup_median']:.2f}", f"{s['first_token_agree']:.3f}",
                  f"{s['first_token_kl_top20_median']:.4f}", f"{s['rouge_l']:.3f}",
                  f"{100 * s['recomputed_share']:.1f}")
    console.print(t)
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=1))
        console.print(f"wrote {out}")


def _print_summary(result: dict) -> None:
    t = Table("context", "mode", "policy", "ratio", "n", "TTFT x (med)", "1st agree",
              "1st KL (med)", "TF agree", "TF KL (med)", "ROUGE-L", "recomp %")
    for s in result["summary"]:
        t.add_row(s["context"], s["mode"], s["policy"] or "-",
                  "-" if s["ratio"] is None else f"{s['ratio']:.2f}", str(s["n"]),
                  f"{s['speedup_median']:.2f}", f"{s['first_token_agree']:.3f}",
                  f"{s['first_token_kl_median']:.4f}", f"{s['tf_agree']:.3f}",
                  f"{s['tf_kl_median']:.4f}", f"{s['rouge_l']:.3f}",
                  f"{100 * s['recomputed_share']:.1f}")
    console.print(t)
    if "long_context" in result:
        lc = result["long_context"]
        console.print(f"long prompt: {lc['context_tokens']} tokens, full {lc['full_ttft_s']:.2f}s,"
                      f" blend {lc['blend_ttft_s']:.2f}s, x{lc['speedup']:.2f}")


@app.command()
def ui(home: Home = default_home(), model: Model = None, port: int = 8501,
       headless: bool = True) -> None:
    """Start the web UI (Ask, Dashboard, Inspect, Ingest) on localhost."""
    from ragkv.ui.launch import launch

    try:
        code = launch(home, model, port=port, headless=headless)
    except RuntimeError as exc:  # Streamlit missing: the message names the extra to install
        fail(str(exc))
    raise typer.Exit(code)


def main() -> None:  # pragma: no cover
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:  # weight-loading bars on every start are noise next to ragkv's own progress
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    except ImportError:
        pass
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
