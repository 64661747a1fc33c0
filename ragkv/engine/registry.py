"""Which engine a configuration names, and how it is opened: the only place that knows.

``RagkvConfig.engine`` is ``"hf"``, ``"vllm"`` or the URL of a vLLM server started with
ragkv's connector. Heavy engines are imported only when named.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ragkv.config import RagkvConfig

if TYPE_CHECKING:
    from ragkv.cache_index import CacheIndex
    from ragkv.engine.base import Backend
    from ragkv.engine.hf import HFEngine


def open_backend(cfg: RagkvConfig, index: CacheIndex | None = None,
                 engine: HFEngine | None = None) -> Backend:
    """The engine ``cfg`` names, over the cache it names.

    index: the app's open cache index, shared with an in-process engine's store.
    engine: an already loaded transformers model to use (tests, benchmarks, notebooks).
    """
    if engine is not None or cfg.engine == "hf":
        from ragkv.cache_index import KVStore
        from ragkv.engine.local import HFBackend

        cfg.home.mkdir(parents=True, exist_ok=True)
        store = KVStore.from_config(cfg, index=index)
        if engine is not None:
            return HFBackend(engine, cfg, store)
        return HFBackend.load(cfg, store)
    from ragkv.engine.vllm.backend import VLLMBackend

    if cfg.engine == "vllm":
        return VLLMBackend.in_process(cfg)
    return VLLMBackend.served(cfg, cfg.engine)
