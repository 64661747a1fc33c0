"""The vLLM engine: a KV connector that fuses cached chunk KV inside a real vLLM V1 engine,
and the contract's backend that reaches it in process or over HTTP.

Nothing here imports vLLM at package import: ``params``, ``client``, ``transport`` and
``backend`` are plain Python (what a client of a served vLLM needs); the connector and the
plugin are loaded by vLLM itself, and ``engine.load_llm`` imports vLLM when it is asked for.
"""
