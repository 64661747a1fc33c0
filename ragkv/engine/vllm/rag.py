"""``VLLMRag``: ingest / retrieve / ask with vLLM serving, for ``ragkv --engine vllm``.

Duck-types the parts of :class:`ragkv.api.RagKV` that ingestion and retrieval use (``index``,
``config``, ``engine.tokenizer``, ``key_for``, ``precompute``), so documents, chunks and
embeddings live in the same index as with the transformers backend; KV keys are in the vLLM
namespace (see ``params.vllm_fingerprint``).
"""

from __future__ import annotations

from collections.abc import Sequence

from ragkv.cache_index import CacheIndex, KVStore
from ragkv.config import BlendConfig, RagkvConfig
from ragkv.engine.vllm.engine import VLLMAnswer, VLLMEngine


class VLLMRag:
    def __init__(self, config: RagkvConfig, **engine_kwargs) -> None:
        from ragkv.model_fetch import resolve_model

        self.config = config
        self.config.home.mkdir(parents=True, exist_ok=True)
        self.engine = VLLMEngine(config, resolve_model(config.model, config.home),
                                 **engine_kwargs)
        self._store = KVStore.from_config(RagkvConfig(**{**config.__dict__,
                                                         "memory_budget_bytes": 0}))
        self._retrieval = None

    @property
    def index(self) -> CacheIndex:
        return self._store.index

    def key_for(self, token_ids: Sequence[int]) -> str:
        return self.engine.builder.key_for(token_ids)

    def precompute(self, token_ids: Sequence[int]) -> bool:
        return self.engine.precompute(token_ids)

    def ingest_text(self, name: str, text: str, source: str = "", progress=None):
        from ragkv.ingest import ingest_text

        return ingest_text(self, name, text, source, progress)  # type: ignore[arg-type]

    def retrieve(self, question: str, k: int = 4):
        from ragkv.ingest import retrieve

        return retrieve(self, question, k)  # type: ignore[arg-type]

    def ask(self, question: str, k: int = 4, *, mode: str = "blend",
            blend: BlendConfig | None = None, max_new_tokens: int = 64) -> VLLMAnswer:
        chunks = self.retrieve(question, k)
        if not chunks:
            raise LookupError("no documents ingested yet; run `ragkv ingest PATH` first")
        return self.engine.generate([c.token_ids for c in chunks], question, mode=mode,
                                    blend=blend or self.config.blend,
                                    max_new_tokens=max_new_tokens)
