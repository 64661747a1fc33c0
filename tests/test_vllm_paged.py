"""The blend's attention on vLLM's paged cache: query runs, slots, and vLLM's CPU kernel held
to ragkv's exact-mask reference (the kernel tests need the ``vllm`` extra)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from ragkv.engine.kernels.reference import TorchOps
from ragkv.engine.vllm.paged import runs, slots


def test_runs_split_sorted_positions_into_causal_sequences():
    qsl, seq = runs(torch.tensor([3, 4, 5, 9, 11, 12]))
    assert qsl.tolist() == [0, 3, 4, 6]
    assert seq.tolist() == [6, 10, 13]  # each run's last query sees itself and all before it
    qsl, seq = runs(torch.tensor([7]))
    assert qsl.tolist() == [0, 1] and seq.tolist() == [8]


def test_slots_follow_the_block_table():
    assert slots([5, 2], 4, 2, 7).tolist() == [22, 23, 8, 9, 10]


def _layer(ops, n_blocks: int, kv_heads: int, block: int, d: int, q_heads: int):
    """A vLLM CPU attention layer's state: its cache and ISA, writes through vLLM's op."""
    cache = torch.zeros(n_blocks, kv_heads, block, 2 * d)
    isa = "vec" if block % 32 == 0 else "vec16"

    def update(layer, k, v, kv_cache, slot):
        kc, vc = kv_cache.view(n_blocks, kv_heads, 2 * block, d).chunk(2, dim=2)
        ops.cpu_attn_reshape_and_cache(k, v, kc, vc, slot, isa, 1.0, 1.0, "auto")

    return SimpleNamespace(kv_cache=cache, isa=isa, num_heads=q_heads, _k_scale_float=1.0,
                           _v_scale_float=1.0, impl=SimpleNamespace(do_kv_cache_update=update))


@pytest.mark.vllm
@pytest.mark.parametrize("q_heads,kv_heads", [(9, 3), (4, 4)])
@pytest.mark.parametrize("block", [32, 128])
@pytest.mark.parametrize("kind", ["scattered", "tail", "all", "first", "single_last"])
@pytest.mark.parametrize("strided", [True, False], ids=["views", "copies"])
def test_vllm_kernel_equals_exact_mask_reference(q_heads, kv_heads, block, kind, strided):
    pytest.importorskip("vllm")
    from vllm import _custom_ops as ops

    from ragkv.engine.vllm.paged import paged_attention, write_layer

    g = torch.Generator().manual_seed(block + q_heads)
    T, d = 300, 64
    n_blocks = (T + block - 1) // block
    table = torch.randperm(n_blocks + 3, generator=g)[:n_blocks]
    layer = _layer(ops, n_blocks + 3, kv_heads, block, d, q_heads)
    k, v = (torch.randn(kv_heads, T, d, generator=g) for _ in "kv")
    write_layer(layer, k, v, slots(table.tolist(), block, 0, T), strided=strided)
    q_pos = {"scattered": torch.randperm(T, generator=g)[:60].sort().values,
             "tail": torch.arange(T - 70, T), "all": torch.arange(T),
             "first": torch.tensor([0, 1, 2, 150]), "single_last": torch.tensor([T - 1])}[kind]
    q = torch.randn(q_heads, q_pos.numel(), d, generator=g)
    got = paged_attention(layer, q, q_pos, table.to(torch.int32)[None], 0.125)
    want = TorchOps().attend_selected(q, k, v, q_pos, 0.125).reshape(q_pos.numel(), -1)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
