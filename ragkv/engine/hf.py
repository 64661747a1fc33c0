"""The transformers backend: CPU reference, and CUDA when present."""

from __future__ import annotations

import inspect
import json
from collections.abc import Iterator
from pathlib import Path

import torch

from ragkv.config import BlendConfig
from ragkv.engine.blend import FusedPrefill, compute_span, fuse
from ragkv.engine.kernels import make_ops
from ragkv.engine.kv import ChunkKV, torch_dtype
from ragkv.engine.loading import LoadingController, WorkspacePool
from ragkv.engine.plan import plan_prefill, scores_of
from ragkv.engine.runner import SUPPORTED, LlamaFamilyRunner
from ragkv.keys import model_fingerprint
from ragkv.prompt import AssembledPrompt


def pick_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def cache_kwarg(model) -> str:
    """The name the model's forward takes its KV cache under: ``cache`` from transformers
    5.2x on, ``past_key_values`` before (the old name warns there and goes in 5.40)."""
    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def returned_cache(out):
    """The KV cache a forward returned, under either name (:func:`cache_kwarg`)."""
    return out["cache"] if "cache" in out else out.past_key_values


class HFEngine:
    """Runs a Llama-family transformers model; ``full`` is the model's own forward pass."""

    def __init__(self, model, tokenizer, kernels: str = "auto") -> None:
        self.model = model.eval()
        self._cache_kw = cache_kwarg(model)
        self.tokenizer = tokenizer
        device = next(model.parameters()).device
        self.runner = LlamaFamilyRunner(model, make_ops(kernels, device))
        #: measures placement vs compute per layer; answers ``ratio="auto"``
        self.controller = LoadingController()
        #: place cached KV layer by layer behind the compute: None = when it crosses devices
        self.pipelined: bool | None = None
        #: fused buffers reused across prefills once their results are let go (CPU)
        self.workspaces = WorkspacePool()
        self.fingerprint = model_fingerprint(model)
        eos = model.generation_config.eos_token_id if model.generation_config else None
        eos = eos if eos is not None else getattr(tokenizer, "eos_token_id", None)
        self.eos_token_ids = set(eos if isinstance(eos, list) else [] if eos is None else [eos])

    @classmethod
    def load(cls, path: Path, device: str = "auto", dtype: str = "float32",
             kernels: str = "auto") -> HFEngine:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        path = Path(path)
        cfg_file = path / "config.json"
        if not cfg_file.exists():
            raise FileNotFoundError(f"{path} is not a transformers model folder (no config.json)")
        archs = json.loads(cfg_file.read_text()).get("architectures") or ["?"]
        if archs[0] not in SUPPORTED:
            raise ValueError(f"{path}: architecture {archs[0]} is not supported; ragkv fuses KV "
                             "for the Llama family (Llama, Mistral, Qwen2, SmolLM)")
        tok = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype(dtype),
                                                     attn_implementation="sdpa")
        return cls(model.to(pick_device(device)), tok, kernels)

    @property
    def config(self):
        return self.model.config

    @torch.inference_mode()
    def precompute(self, ids: list[int], past: ChunkKV | None = None) -> ChunkKV:
        return compute_span(self.runner, torch.tensor(ids, device=self.runner.device), past)

    @torch.inference_mode()
    def prefill(self, prompt: AssembledPrompt, cached: list[tuple[int, ChunkKV]], mode: str,
                blend: BlendConfig, exact_until: int, record: bool = False) -> FusedPrefill:
        blend = self.controller.resolve(blend)  # a no-op when the caller resolved it
        ids = torch.tensor(prompt.ids, device=self.runner.device)
        if mode == "full":
            return self._full(ids)
        plan = plan_prefill(len(prompt.ids), prompt.chunk_spans, prompt.suffix_start,
                            [(s, kv.n_tokens) for s, kv in cached], exact_until, mode, blend,
                            self.runner.n_layers, scores_of(cached))
        ctx, policy = plan.ctx, plan.policy
        with self.workspaces.lease(self.runner.device) as ws:
            out = fuse(self.runner, ids, cached, ctx, policy, deviation_on=blend.deviation_on,
                       record=record, pipelined=self.pipelined, workspace=ws,
                       correction=plan.correction)
        if mode == "blend":
            self.controller.observe(chunk_tokens=ctx.chunk_tokens,
                                    place_s=out.place_s, layer_s=out.layer_s,
                                    computed=out.recomputed_per_layer)
        return out

    def _full(self, ids: torch.Tensor) -> FusedPrefill:
        # Logits of the last position only, as a serving engine's prefill computes them: the
        # vocabulary projection of every prompt token made full prefill at 2k tokens 20-35%
        # slower (SmolLM2, one CPU thread) and every blend-vs-full ratio look better.
        out = self.model(input_ids=ids[None], use_cache=True, logits_to_keep=1)
        cache = returned_cache(out)
        ks = [layer.keys[0] for layer in cache.layers]
        vs = [layer.values[0] for layer in cache.layers]
        T = ids.shape[0]
        return FusedPrefill(ks, vs, out.logits[0, -1].float(), [T] * len(ks),
                            torch.arange(T))

    def _cache(self, fused: FusedPrefill):
        from transformers import DynamicCache

        cache = DynamicCache(config=self.model.config)
        for i, (k, v) in enumerate(zip(fused.k, fused.v, strict=True)):
            cache.update(k[None], v[None], i)
        return cache

    def decode(self, fused: FusedPrefill, first_token: int, max_new_tokens: int) -> list[int]:
        """Greedy continuation after the first token, stopping at EOS."""
        return list(self.decode_iter(fused, first_token, max_new_tokens))

    @torch.inference_mode()
    def decode_iter(self, fused: FusedPrefill, first_token: int,
                    max_new_tokens: int) -> Iterator[int]:
        """Yield the first token, then each greedy token, stopping at EOS or the limit."""
        yield first_token
        last, n = first_token, 1
        cache = self._cache(fused)
        dev = self.runner.device
        while n < max_new_tokens and last not in self.eos_token_ids:
            out = self.model(input_ids=torch.tensor([[last]], device=dev), use_cache=True,
                             **{self._cache_kw: cache})
            cache = returned_cache(out)
            last, n = int(out.logits[0, -1].argmax()), n + 1
            yield last

    @torch.inference_mode()
    def score(self, fused: FusedPrefill, target: list[int]) -> torch.Tensor:
        """Teacher-forced logits ``[len(target), vocab]``: row i predicts ``target[i]`` given
        the prompt KV and ``target[:i]``."""
        rows = [fused.logits[None][:len(target)]]  # none for no target
        if len(target) > 1:
            ids = torch.tensor([target[:-1]], device=self.runner.device)
            out = self.model(input_ids=ids, use_cache=True, **{self._cache_kw: self._cache(fused)})
            rows.append(out.logits[0].float())
        return torch.cat(rows)
