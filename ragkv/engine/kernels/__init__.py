"""Kernels for the fusion's hot paths: RoPE re-encoding, deviation + top-k, selected-query
attention with the exact causal mask.

``make_ops`` picks the implementation: Triton on CUDA devices when Triton is installed, the
PyTorch reference everywhere else. ``kernels="triton"`` forces Triton (on a CPU it then needs
``TRITON_INTERPRET=1``, which is how the tests run it); ``kernels="torch"`` forces the reference.
"""

from __future__ import annotations

import importlib.util
import os
from typing import Literal

import torch

from ragkv.engine.kernels.reference import TorchOps

KernelChoice = Literal["auto", "torch", "triton"]
KERNEL_CHOICES: tuple[str, ...] = ("auto", "torch", "triton")


def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def tuned(configs: list, key: list[str]):
    """``triton.autotune`` on a GPU; in the interpreter (tests) the caller's fixed sizes
    apply, since timing configurations there measures nothing."""
    def wrap(fn):
        if interpreting():
            return fn
        import triton

        return triton.autotune(configs=configs, key=key)(fn)
    return wrap


def make_ops(kernels: str, device: torch.device | str) -> TorchOps:
    """The kernel set for ``device``: ``auto`` = Triton on CUDA when installed, else torch."""
    if kernels not in KERNEL_CHOICES:
        raise ValueError(f"kernels must be one of {', '.join(KERNEL_CHOICES)}, got {kernels!r}")
    device = torch.device(device)
    if kernels == "torch" or (kernels == "auto" and not (device.type == "cuda"
                                                          and triton_available())):
        return TorchOps()
    if not triton_available():
        raise RuntimeError("kernels='triton' needs the triton package: pip install 'ragkv[triton]'")
    if device.type != "cuda" and not interpreting():
        raise RuntimeError(f"Triton kernels run on CUDA devices, not {device.type}; set "
                           "TRITON_INTERPRET=1 to run them through the interpreter (tests only)")
    from ragkv.engine.kernels.triton_ops import TritonOps

    return TritonOps()


__all__ = ["KERNEL_CHOICES", "KernelChoice", "TorchOps", "make_ops", "triton_available"]
