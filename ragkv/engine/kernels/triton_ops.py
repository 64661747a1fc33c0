"""The Triton kernel set: overrides every operation of the reference it accelerates."""

from __future__ import annotations

import torch

from ragkv.engine.kernels import attention, rope, select
from ragkv.engine.kernels.reference import TorchOps


class TritonOps(TorchOps):
    name = "triton"

    def rope(self, x, cos, sin, positions=None, out=None):
        return rope.rope(x, cos, sin, positions, out)

    def deviation(self, k_new, k_buf, index, out=None):
        return select.deviation(k_new, k_buf, index, out)

    def keep_top(self, deviation, must, budget):
        return select.keep_top(deviation, must, budget)

    def attend_selected(self, q, k, v, q_pos, scale) -> torch.Tensor:
        n, T = q.shape[1], k.shape[1]
        # Most of the prompt as one contiguous tail (the layers before the check, after an
        # exact prefix): padded plain-causal flash attention wastes little and is faster.
        if 2 * n > T and int(q_pos[0]) == T - n and int(q_pos[-1]) == T - 1:
            return super().attend_selected(q, k, v, q_pos, scale)
        return attention.selected_attention(q, k, v, q_pos, scale)
