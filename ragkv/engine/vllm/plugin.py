"""vLLM general plugin: lets ragkv's KV connector reach the model's weights, unpatched.

vLLM runs every ``vllm.general_plugins`` entry point in each of its processes. This one
registers, for the Llama-family architectures ragkv fuses, a subclass of vLLM's own model
class that only records the instance it builds (:mod:`ragkv.engine.vllm.models`). The worker
side of the connector then finds the model that serves the engine in its own process and
runs the blend's selective recompute with its weights. Registration is by
``"module:Class"`` string, so nothing is imported until vLLM builds a model.
"""

from __future__ import annotations

#: vLLM architecture name -> ragkv subclass that records its instances.
ARCHITECTURES = {
    "LlamaForCausalLM": "ragkv.engine.vllm.models:RagkvLlamaForCausalLM",
    "MistralForCausalLM": "ragkv.engine.vllm.models:RagkvMistralForCausalLM",
    "Qwen2ForCausalLM": "ragkv.engine.vllm.models:RagkvQwen2ForCausalLM",
}


def register() -> None:
    """Entry point of the ``vllm.general_plugins`` group; safe to run more than once."""
    import logging

    from vllm import ModelRegistry

    # vLLM warns on every overwrite of a built-in architecture; the subclass adds nothing to
    # the forward pass, so the warning is noise in every engine process.
    reg_log = logging.getLogger("vllm.model_executor.models.registry")
    level = reg_log.level
    reg_log.setLevel(logging.ERROR)
    try:
        for arch, target in ARCHITECTURES.items():
            ModelRegistry.register_model(arch, target)
    finally:
        reg_log.setLevel(level)
