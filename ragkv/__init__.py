"""ragkv: precomputed chunk KV fused with CacheBlend, so RAG answers stay the same and come faster.

The public API is :class:`ragkv.api.RagKV`; configuration is :class:`ragkv.config.RagkvConfig`.
Heavy modules are imported lazily so ``import ragkv`` stays cheap.
"""

from __future__ import annotations

from ragkv.config import BlendConfig, RagkvConfig

__all__ = ["BlendConfig", "RagKV", "RagkvConfig"]
__version__ = "0.1.0"


def __getattr__(name: str):
    if name == "RagKV":
        from ragkv.api import RagKV

        return RagKV
    raise AttributeError(name)
