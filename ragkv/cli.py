"""Command line: ``ragkv ingest | ask | demo | bench | ui | serve``; ``ragkv cache ...`` lives
in :mod:`ragkv.cli_cache`. Every command runs the same code on every engine (``--engine hf``,
``vllm`` or a server URL): the engine contract carries the difference."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Annotated

import typer
from rich import box
from rich.console import Console
from rich.measure import Measurement
from rich.table import Table

from ragkv.cli_cache import cache_app
from ragkv.cli_docs import documents, ingest, ingest_docs, remove
from ragkv.cli_serve import serve
from ragkv.cli_shared import (
    AnchorSource,
    BlobUrl,
    Engine,
    Home,
    IndexUrl,
    Model,
    Port,
    ReadContext,
    answers_table,
    cache_errors,
    check_port,
    console,
    fail,
    given_path,
    index_failure,
    open_rag,
    print_error,
    progress_bar,
    run_engine,
    writable_file,
)
from ragkv.config import (
    CONTEXT_PRESELECT_FROM,
    CORRECTIONS,
    DEFAULT_CHECK_LAYERS,
    DEFAULT_RATIO,
    MODES,
    PRESELECT_FROM,
    BlendConfig,
    default_home,
)

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Precomputed chunk KV + CacheBlend fusion for RAG.")
app.add_typer(cache_app, name="cache")
app.command()(serve)
app.command()(ingest)
app.command()(documents)
app.command()(remove)


def _print_version(value: bool) -> None:
    if value:
        from ragkv import __version__

        console.print(f"ragkv {__version__}", markup=False, highlight=False)
        raise typer.Exit()


@app.callback()
def _options(version: Annotated[bool, typer.Option(
        "--version", callback=_print_version, is_eager=True,
        help="Print ragkv's version and exit.")] = False) -> None:
    """Precomputed chunk KV + CacheBlend fusion for RAG."""

#: The shortest ``bench --long-context`` prompt: two default chunks, template and question.
LONG_CONTEXT_MIN = 1_280

DEMO_TOPICS = ("try", "exceptions", "raise", "with", "context-managers", "assert", "for",
               "while", "yield", "lambda", "import", "del", "global", "nonlocal", "if", "pass")
DEMO_QUESTIONS = (
    "What happens to the name bound by 'except E as N' when the except clause ends?",
    "What does the with statement do when the body of the block raises an exception?",
    "What does a yield expression do when it is used inside a function?",
)


def _ask_both(rag, question: str, chunks, mode: str, max_new_tokens: int, compare: bool,
              retrieval_s: float | None = None):
    """The answer in ``mode`` and, with ``compare``, full prefill's on the same chunks first;
    ``retrieval_s`` (what retrieving the chunks took) goes with each to the query log."""
    answers = []
    if compare and mode != "full":
        answers.append(rag.generate(chunks, question, mode="full",
                                    max_new_tokens=max_new_tokens, retrieval_s=retrieval_s))
    full_s = answers[0].trace.ttft_s if answers else None
    answers.append(rag.generate(chunks, question, mode=mode, max_new_tokens=max_new_tokens,
                                full_ttft_s=full_s, retrieval_s=retrieval_s))
    return answers


@app.command()
def ask(ctx: typer.Context, question: str,
        k: Annotated[int, typer.Option("--k", "-k", help="chunks to retrieve")] = 4,
        mode: str = "blend", ratio: float = DEFAULT_RATIO,
        policy: str = "qhkvd",
        preselect: Annotated[float | None, typer.Option(
            help="blend: compute only this multiple of the ratio of chunk tokens before the "
                 "check layer, those with the highest stored context scores (times the "
                 "question's attention, with qhkvd; faster; default: four times the ratio on "
                 f"prompts of {PRESELECT_FROM:,} tokens or more, else off)")] = None,
        max_new_tokens: int = 64,
        compare: Annotated[bool, typer.Option(help="also run full prefill")] = False,
        home: Home = default_home(), model: Model = None,
        context: ReadContext = None,
        engine: Engine = "hf", index_url: IndexUrl = None, blob_url: BlobUrl = None) -> None:
    """Answer a question over the ingested documents."""
    if mode not in MODES:
        fail(f"unknown mode {mode!r}; choose from {', '.join(MODES)}")
    if not question.strip():
        fail("the question is empty")
    if k < 1:
        fail(f"-k must be at least 1, got {k}")
    if max_new_tokens < 1:
        fail(f"--max-new-tokens must be at least 1, got {max_new_tokens}")
    rag = open_rag(ctx, home, model, context or "anchor", engine=engine, index_url=index_url,
                   blob_url=blob_url, need_cache=True, ratio=ratio, policy=policy,
                   preselect=preselect)
    if context is None:  # the entries `ingest --context X` stored, not misses in another
        with cache_errors():
            rag = rag.as_ingested()

    def run():
        t = time.perf_counter()
        chunks = rag.retrieve(question, k)
        if not chunks:
            raise LookupError("no documents ingested yet; run `ragkv ingest PATH` first")
        return _ask_both(rag, question, chunks, mode, max_new_tokens, compare,
                         time.perf_counter() - t)

    answers = run_engine(run)
    console.print(answers_table(answers))


@app.command()
def demo(ctx: typer.Context, home: Home = default_home(), model: Model = None,
         all_topics: Annotated[bool, typer.Option(help="ingest every pydoc topic")] = False,
         max_new_tokens: int = 48, engine: Engine = "hf") -> None:
    """Ingest Python's documentation topics, then answer three questions with full and blend."""
    from ragkv.ingest import pydoc_topics

    if max_new_tokens < 1:
        fail(f"--max-new-tokens must be at least 1, got {max_new_tokens}")
    rag = open_rag(ctx, home, model, engine=engine)
    docs = pydoc_topics(None if all_topics else DEMO_TOPICS)
    computed = run_engine(lambda: ingest_docs(rag, docs)).computed
    if not computed:
        console.print("[green]all chunk KV already stored: nothing precomputed[/green]")
    # One untimed answer first: an engine's first request pays one-off costs (allocations,
    # kernel choices) that no later query does, and would inflate the first full prefill.
    run_engine(lambda: rag.generate(rag.retrieve(DEMO_QUESTIONS[0], 1), "Warm up?",
                                    mode="full", max_new_tokens=1, log_query=False))
    for q in DEMO_QUESTIONS:
        answers = run_engine(lambda q=q: _ask_both(rag, q, rag.retrieve(q, 4), "blend",
                                                   max_new_tokens, True))
        console.rule(q)
        console.print(answers_table(answers))


def _numbers(option: str, text: str, kind: type) -> list:
    """A comma-separated option's values as ``kind``, or a ValueError naming the option."""
    try:
        return [kind(part) for part in text.split(",")]
    except ValueError:
        what = "whole numbers" if kind is int else "numbers"
        raise ValueError(f"{option} takes {what} separated by commas, got {text!r}") from None


def print_summary(result: dict) -> None:
    def f(v, fmt: str) -> str:
        return "-" if v is None else format(v, fmt)

    t = Table(caption=f"{result['meta']['engine']}; KL over {result['summary'][0]['kl_basis']}",
              box=box.SIMPLE_HEAD)  # no column rules: 14 columns, little width to spare
    rows = result["summary"]
    # the correction names a row only where the run compared several (two rows read alike)
    several = len({s.get("correction") for s in rows if s["mode"] == "blend"}) > 1
    contains = any(s.get("contains") is not None for s in rows)  # the cases had answers
    for name in ("context", "mode", "policy", "ratio", *(("correction",) if several else ()),
                 "n", "TTFT s", "engine s", "TTFT x (med)", "1st agree", "1st KL (med)",
                 "TF agree", "TF KL (med)", "ROUGE-L", *(("contains",) if contains else ()),
                 "recomp %"):
        t.add_column(name, overflow="fold")  # a narrow terminal wraps a figure, never cuts it
    for s in rows:
        t.add_row(s["context"], s["mode"], s["policy"] or "-", f(s["ratio"], ".2f"),
                  *((s.get("correction") or "-",) if several else ()),
                  str(s["n"]), f(s["ttft_median_s"], ".3f"), f(s["engine_ttft_median_s"], ".3f"),
                  f(s["speedup_median"], ".2f"), f(s["first_token_agree"], ".3f"),
                  f(s["first_token_kl_median"], ".4f"), f(s["tf_agree"], ".3f"),
                  f(s["tf_kl_median"], ".4f"), f(s["rouge_l"], ".3f"),
                  *((f(s.get("contains"), ".3f"),) if contains else ()),
                  f(100 * s["recomputed_share"], ".1f"))
    out = console
    if not console.is_terminal:  # a log or `tee`: the table's own width, no terminal wraps it
        wide = Measurement.get(console, console.options.update_width(10_000), t).maximum
        out = Console(file=console.file, width=max(console.width, wide))
    out.print(t)
    if "long_context" in result:
        lc = result["long_context"]
        console.print(f"long prompt: {lc['context_tokens']} tokens, full {lc['full_ttft_s']:.2f}s,"
                      f" blend {lc['blend_ttft_s']:.2f}s, x{lc['speedup']:.2f}")


@app.command()
def bench(ctx: typer.Context, cases: Annotated[Path, typer.Option(
              parser=given_path, help="JSONL case file")],
          modes: str = "full,prefix,reuse,blend", ratios: str = f"0.05,{DEFAULT_RATIO},0.3",
          policies: str = "qhkvd", contexts: str = "anchor",
          check_layers: str = ",".join(map(str, DEFAULT_CHECK_LAYERS)),
          start_factor: Annotated[float, typer.Option(
              help="with several check layers: the share of tokens the first keeps, as a "
                   "multiple of the ratio")] = BlendConfig.start_factor,
          preselect: Annotated[float | None, typer.Option(
              help="compute only this multiple of the ratio of chunk tokens before the check "
                   "layer, those with the highest stored context scores (times the question's "
                   "attention, with qhkvd)")] = None,
          preselect_from: Annotated[int, typer.Option(
              help="prompts of at least this many tokens preselect four times the ratio "
                   "anyway (0: never)")] = PRESELECT_FROM,
          preselect_by: Annotated[str, typer.Option(
              help="what a qhkvd preselection ranks by: question (context scores times the "
                   "question's attention), context (the scores alone), auto (question below "
                   f"{CONTEXT_PRESELECT_FROM:,} prompt tokens)")] = BlendConfig.preselect_by,
          deviation_on: str = "k",
          corrections: Annotated[str, typer.Option(
              help=f"blend KV corrections to compare: {', '.join(CORRECTIONS)}")
          ] = BlendConfig.correction,
          correction_strength: float = BlendConfig.correction_strength,
          coverage: Annotated[float | None, typer.Option(
              help="quality guard: share of deviation mass the recomputed tokens must "
                   "hold")] = None,
          floor_ratio: Annotated[float | None, typer.Option(
              help="with --coverage: a per-prompt budget that may also recompute fewer tokens "
                   "than the ratio, down to this share")] = None,
          max_new_tokens: int = 32,
          limit: int | None = None,
          long_context: Annotated[int, typer.Option(help="also time one prompt of N tokens")] = 0,
          kv_dtype: Annotated[str, typer.Option(
              help="stored KV dtype: float16, bfloat16, float32 or int8 (run once per dtype "
                   "to compare fidelity)")] = "float16",
          anchor_source: AnchorSource = "corpus",
          out: Annotated[Path | None, typer.Option(parser=given_path)] = None,
          home: Home = default_home(), model: Model = None,
          engine: Engine = "hf") -> None:
    """TTFT and fidelity of each mode against full prefill on a case file."""
    from ragkv.bench import LONG_CONTEXT_ANSWER, BenchSpec, load_cases, run_bench

    try:
        spec = BenchSpec(modes=modes.split(","), ratios=_numbers("--ratios", ratios, float),
                         policies=policies.split(","), contexts=contexts.split(","),
                         check_layers=tuple(_numbers("--check-layers", check_layers, int)),
                         start_factor=start_factor, preselect=preselect,
                         preselect_from=preselect_from or None, preselect_by=preselect_by,
                         deviation_on=deviation_on,
                         corrections=corrections.split(","),
                         correction_strength=correction_strength, coverage=coverage,
                         floor_ratio=floor_ratio,
                         max_new_tokens=max_new_tokens, limit=limit)
        data = load_cases(cases)
    except (ValueError, OSError) as exc:
        fail(str(exc))
    if out is not None:  # said before the run, not after it (its results were lost)
        writable_file(out, "--out")
    if long_context < 0 or 0 < long_context < LONG_CONTEXT_MIN:
        fail(f"--long-context must be 0 (off) or at least {LONG_CONTEXT_MIN:,} tokens (a few "
             f"chunks besides the template and question), got {long_context}")
    rag = open_rag(ctx, home, model, kv_dtype=kv_dtype, engine=engine, anchor_source=anchor_source)
    room = rag.backend.max_model_len - LONG_CONTEXT_ANSWER
    if long_context > room:  # said before the run: its prompt would be cut to the window
        fail(f"--long-context {long_context:,} is more than the model's window leaves after "
             f"the answer's {LONG_CONTEXT_ANSWER} tokens ({room:,})")
    with progress_bar() as bar:
        tasks: dict[str, int] = {}

        def progress(stage: str, done: int, total: int) -> None:
            if stage not in tasks:
                tasks[stage] = bar.add_task(stage, total=total)
            bar.update(tasks[stage], completed=done)

        result = run_engine(lambda: run_bench(rag, data, spec, progress))
    result["kv_dtype"] = rag.config.kv_storage
    if long_context:
        from ragkv.bench import long_context as run_long

        result["long_context"] = run_engine(lambda: run_long(rag, long_context))
    print_summary(result)
    if out:
        try:
            out.write_text(json.dumps(result, indent=1))
        except OSError as exc:
            fail(f"cannot write {out}: {exc.strerror or exc}", code=1)
        console.print(f"wrote {out}")


@app.command()
def ui(home: Home = default_home(), model: Model = None, port: Port = 8501,
       headless: bool = True, engine: Engine = "hf", context: ReadContext = None,
       docs_root: Annotated[list[Path] | None, typer.Option(
           "--docs-root", file_okay=False, parser=given_path,
           help="a folder the Ingest page may read on the server (repeatable; none: uploads "
                "only)")] = None) -> None:
    """Start the web UI (Ask, Dashboard, Inspect, Ingest) on localhost."""
    from ragkv.config import RagkvConfig
    from ragkv.ui.launch import ADDRESS, check_start, launch

    # refused before a server starts: a mistyped engine or context, an unusable home or model
    try:
        cfg = RagkvConfig(home=home, model=model, engine=engine,  # type: ignore[arg-type]
                          precompute_context=context or "anchor")  # type: ignore[arg-type]
        check_start(cfg.home, model)
    except ValueError as exc:
        fail(str(exc))
    check_port(ADDRESS, port)
    try:
        code = launch(home, model, port=port, headless=headless, engine=engine,
                      docs_roots=docs_root or [], context=context)
    except RuntimeError as exc:  # Streamlit missing: the message names the extra to install
        fail(str(exc))
    raise typer.Exit(code)


def main() -> None:  # pragma: no cover
    try:
        _main()
    except KeyboardInterrupt:  # Ctrl-C before a command runs (typer handles it in one)
        raise SystemExit(130) from None


def _main() -> None:  # pragma: no cover
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:  # weight-loading bars on every start are noise next to ragkv's own progress
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    except ImportError:
        pass
    from sqlalchemy.exc import SQLAlchemyError

    try:  # not standalone: a mistyped command line is one line too, not a framed box
        code = app(standalone_mode=False)
    except _command_line_errors() as exc:
        if type(exc).__name__ == "NoArgsIsHelpError":  # bare `ragkv`: its help is printed
            raise SystemExit(2) from None
        ctx = getattr(exc, "ctx", None)
        hint = f" (see `{ctx.command_path} --help`)" if ctx is not None else ""
        print_error(exc.format_message() + hint)
        raise SystemExit(getattr(exc, "exit_code", 2)) from None
    except typer.Abort:  # end of input at a prompt (typer turns Ctrl-C into exit 130 itself)
        print_error("aborted")
        raise SystemExit(1) from None
    except SQLAlchemyError as exc:  # an index server that went away mid-command
        print_error(index_failure(exc))
        raise SystemExit(1) from None
    raise SystemExit(code if isinstance(code, int) else 0)


def _command_line_errors() -> tuple[type[Exception], ...]:
    """Click's usage errors: typer's own copy of click (typer >= 0.20), and click itself."""
    kinds: list[type[Exception]] = [typer.TyperException] if hasattr(
        typer, "TyperException") else []
    try:
        import click

        kinds.append(click.ClickException)
    except ImportError:
        pass
    return tuple(kinds)


if __name__ == "__main__":  # pragma: no cover
    main()
