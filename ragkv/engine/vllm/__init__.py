"""The vLLM backend: a KV connector that fuses cached chunk KV inside a real vLLM V1 engine.

Nothing here imports vLLM at package import: ``ragkv.engine.vllm.params`` is plain Python
(what a client sends), the rest is loaded by vLLM itself (connector, plugin) or by
``VLLMEngine`` once the ``vllm`` extra is known to be installed.
"""
