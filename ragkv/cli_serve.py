"""``ragkv serve``: a vLLM OpenAI-compatible server with ragkv's connector over a cache given by
URL, so that app processes (``--engine http://HOST:PORT/v1``) fuse and answer through it."""

from __future__ import annotations

import importlib.util
import shlex
import subprocess
from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape

from ragkv.cli_shared import Home, Model, Port, check_port, console, fail
from ragkv.config import RagkvConfig, default_home

#: compute dtypes vLLM takes for the model (``--dtype``)
DTYPES = ("float32", "bfloat16", "float16", "auto")


def serve(home: Home = default_home(), model: Model = None,
          index_url: Annotated[str | None, typer.Option(
              help="SQLAlchemy URL of the cache index shared with the app (default: SQLite "
                   "in --home)")] = None,
          blob_url: Annotated[str | None, typer.Option(
              help="fsspec URL of the shared KV blobs (default: --home/blobs)")] = None,
          host: str = "127.0.0.1", port: Port = 8000,
          kv_dtype: Annotated[str, typer.Option(
              help="stored KV dtype: float32 (as the engine computes by default), float16, "
                   "bfloat16 or int8")] = "float32",
          dtype: Annotated[str, typer.Option(
              help=f"the model's compute dtype: {', '.join(DTYPES)}")] = "float32",
          max_model_len: Annotated[int | None, typer.Option(
              min=1, help="positions per request (default: the model's own window)")] = None,
          kv_cache_mb: Annotated[int, typer.Option(min=1, help="vLLM's paged KV cache")] = 1024,
          print_only: Annotated[bool, typer.Option(
              "--print", help="print the vLLM command instead of running it")] = False) -> None:
    """Serve the model with vLLM and ragkv's KV connector (the served deployment)."""
    from ragkv.cache_index import BlobStore
    from ragkv.cache_index.database import make_engine
    from ragkv.engine.vllm.engine import (
        MISSING,
        kv_bytes_per_position,
        model_window,
        serve_command,
    )
    from ragkv.model_fetch import resolve_model

    if dtype not in DTYPES:
        fail(f"--dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    if not print_only:  # before the model loads, not after
        check_port(host, port)
    try:
        cfg = RagkvConfig(home=home, model=model, kv_dtype=kv_dtype,  # type: ignore[arg-type]
                          index_url=index_url, blob_url=blob_url)
        # a mistyped cache URL is refused here, not in the server's worker after start-up
        make_engine(cfg.resolved_index_url).dispose()
        BlobStore(cfg.resolved_blob_url, cfg.blob_options)
        path = resolve_model(cfg.model, cfg.home)
    except (ValueError, FileNotFoundError, RuntimeError) as exc:
        fail(str(exc))
    except OSError as exc:  # a home that cannot be made (under a file)
        fail(f"cannot use {exc.filename or home}: {exc.strerror or exc}")
    # vLLM refuses these only after loading the model, with a traceback
    window = model_window(path)
    if max_model_len is not None and max_model_len > window:
        fail(f"--max-model-len {max_model_len} is past the window of {path.name} "
             f"({window} positions); give at most {window}")
    need = kv_bytes_per_position(path, dtype) * (max_model_len or window)
    if kv_cache_mb * 2**20 < need:
        fail(f"--kv-cache-mb {kv_cache_mb} cannot hold one request of {max_model_len or window} "
             f"positions; give at least {-(-need // 2**20)} (or a smaller --max-model-len)")
    cmd = serve_command(cfg, path, host=host, port=port, dtype=dtype,
                        max_model_len=max_model_len, kv_cache_bytes=kv_cache_mb * 2**20)
    line = shlex.join(cmd)
    if print_only:
        print(line)
        return
    if importlib.util.find_spec("vllm") is None:
        fail(MISSING)
    cache = f"--index-url {shlex.quote(index_url)}" if index_url else f"--home {home}"
    console.print(f"[bold]serving[/bold] {escape(path.name)} on http://{host}:{port}/v1 over "
                  f"the cache at {escape(cfg.resolved_index_url)}\napp side: ragkv ask "
                  f"QUESTION --engine http://{host}:{port}/v1 {escape(cache)}")
    console.print(f"[dim]{escape(line)}[/dim]")
    Path(cfg.home).mkdir(parents=True, exist_ok=True)
    raise typer.Exit(subprocess.call(cmd))
