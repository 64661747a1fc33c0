"""Counting Triton kernel launches, so a kernel test can prove the kernel it names ran (the
kernel set falls back to the torch reference in places, e.g. attention over a long contiguous
tail, where a test of "the kernel" would otherwise compare the reference with itself)."""

from __future__ import annotations

import importlib

import pytest

#: every Triton kernel of the kernel set, by the name the tests use: (module, attribute);
#: imported on use, so that collecting a test module does not need Triton
KERNELS = {
    "attention": ("ragkv.engine.kernels.attention", "_selected_attention_kernel"),
    "rope": ("ragkv.engine.kernels.rope", "_rope_kernel"),
    "deviation": ("ragkv.engine.kernels.select", "_deviation_kernel"),
    "keep_top": ("ragkv.engine.kernels.select", "_keep_top_kernel"),
}


class LaunchSpy:
    """Wraps a ``@triton.jit`` kernel (or its autotuner): ``kernel[grid](...)`` still launches
    it, and ``calls`` counts the launches."""

    def __init__(self, kernel) -> None:
        self.kernel, self.calls = kernel, 0

    def __getitem__(self, grid):
        launch = self.kernel[grid]

        def counted(*args, **kwargs):
            self.calls += 1
            return launch(*args, **kwargs)

        return counted


def spy_launches(monkeypatch: pytest.MonkeyPatch) -> dict[str, LaunchSpy]:
    """Launch counters of every kernel, by name, for the duration of a test (call it from a
    test's ``launches`` fixture)."""
    spies = {}
    for name, (path, attr) in KERNELS.items():
        module = importlib.import_module(path)
        spies[name] = LaunchSpy(getattr(module, attr))
        monkeypatch.setattr(module, attr, spies[name])
    return spies


def counts(spies: dict[str, LaunchSpy]) -> dict[str, int]:
    return {name: spy.calls for name, spy in spies.items()}
