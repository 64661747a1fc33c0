"""``VLLMRunner.attend`` (its own CPU path for scattered queries) against the reference
kernel; no vLLM needed, so this runs in the fast suite."""

from __future__ import annotations

import torch

from ragkv.engine.kernels import TorchOps
from ragkv.engine.vllm.runner import VLLMRunner


class _CpuRunner(VLLMRunner):
    def __init__(self) -> None:  # only what attend reads; no model
        self.ops, self.scaling = TorchOps(), 0.125

    @property
    def device(self) -> torch.device:
        return torch.device("cpu")


def test_scattered_and_tail_queries_match_the_reference_attention():
    g = torch.Generator().manual_seed(0)
    T, hq, hkv, d = 300, 6, 2, 16
    k, v = torch.randn(hkv, T, d, generator=g), torch.randn(hkv, T, d, generator=g)
    r = _CpuRunner()
    scattered = torch.unique(torch.cat([torch.randperm(T - 20, generator=g)[:40] + 5,
                                        torch.arange(T - 10, T)]))
    for pos in (scattered, torch.arange(T - 50, T)):
        q = torch.randn(hq, pos.numel(), d, generator=g)
        want = TorchOps().attend_selected(q, k, v, pos, 0.125).reshape(pos.numel(), -1)
        torch.testing.assert_close(r.attend(q, k, v, pos), want, rtol=1e-5, atol=1e-6)
