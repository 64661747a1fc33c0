"""vLLM's own Llama-family model classes, recording the instances they build.

The subclasses change nothing in the forward pass; ``latest_model()`` hands the worker-side
connector the model serving this process (vLLM builds one per worker process).
"""

from __future__ import annotations

import weakref

from vllm.model_executor.models.llama import LlamaForCausalLM
from vllm.model_executor.models.mistral import MistralForCausalLM
from vllm.model_executor.models.qwen2 import Qwen2ForCausalLM

_MODELS: list[weakref.ref] = []


def _record(model) -> None:
    _MODELS.append(weakref.ref(model))


def latest_model():
    """The most recently built model still alive in this process, or None."""
    for ref in reversed(_MODELS):
        model = ref()
        if model is not None:
            return model
    return None


class RagkvLlamaForCausalLM(LlamaForCausalLM):
    # vLLM reads this signature to decide how to construct the model: keep it the base's.
    def __init__(self, *, vllm_config, prefix: str = "") -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        _record(self)


class RagkvMistralForCausalLM(MistralForCausalLM):
    # vLLM reads this signature to decide how to construct the model: keep it the base's.
    def __init__(self, *, vllm_config, prefix: str = "") -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        _record(self)


class RagkvQwen2ForCausalLM(Qwen2ForCausalLM):
    # vLLM reads this signature to decide how to construct the model: keep it the base's.
    def __init__(self, *, vllm_config, prefix: str = "") -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        _record(self)
