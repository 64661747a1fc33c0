"""LlamaIndex query engine on ragkv: ingest two pydoc topics, ask, print answer and cache trace.

Run: .venv/bin/python examples/llamaindex_query_engine.py \
    [--engine hf|vllm|http://HOST:PORT/v1] [--home DIR]
(needs `pip install 'ragkv[llamaindex]'`; the default model and ~/.cache/ragkv). The same code
runs on every engine: against a served vLLM, start it with `ragkv serve --home DIR` first and
give this script the same --home (server and app share the cache).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from pydoc_data.topics import topics
from typing import Any

from llama_index.core.instrumentation import get_dispatcher
from llama_index.core.instrumentation.event_handlers import BaseEventHandler
from llama_index.core.instrumentation.events import BaseEvent

from ragkv import RagKV, RagkvConfig
from ragkv.connectors.llamaindex import RagkvQueryEngine, RagkvTTFTEvent
from ragkv.engine.base import EngineError


class PrintTTFT(BaseEventHandler):
    """Any LlamaIndex event handler sees ragkv's events; this one prints the TTFT."""

    @classmethod
    def class_name(cls) -> str:
        return "PrintTTFT"

    def handle(self, event: BaseEvent, **kwargs: Any) -> None:
        if isinstance(event, RagkvTTFTEvent):
            print(f"  [event] TTFT {event.ttft_s:.3f}s, {event.hits} hits, "
                  f"{event.recomputed_tokens} tokens recomputed")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--engine", default="hf", help="hf, vllm or a vLLM server URL")
    ap.add_argument("--home", type=Path, default=RagkvConfig().home)
    a = ap.parse_args()
    try:
        cfg = RagkvConfig(home=a.home, engine=a.engine)
    except ValueError as exc:  # a mistyped --engine: argparse's one line and exit 2
        ap.error(str(exc))
    rag = RagKV(cfg)
    print(f"engine: {rag.backend.description}")
    for name in ("with", "context-managers"):
        rag.ingest_text(f"pydoc:{name}", topics[name])  # precomputes and stores chunk KV
    get_dispatcher().add_event_handler(PrintTTFT())
    question = "What does the with statement call when the block is left?"
    for mode in ("full", "blend"):
        engine = RagkvQueryEngine(rag=rag, similarity_top_k=3, mode=mode, ratio=0.15,
                                  max_new_tokens=48)
        response = engine.query(question)
        t = response.metadata["ragkv_trace"]
        print(f"[{mode}] TTFT {t['ttft_s']:.2f}s, hits {t['hits']}/{len(t['chunks'])}, "
              f"recomputed {t['recomputed_tokens']}/{t['context_tokens']} tokens")
        print("   ", response.response)
    streaming = RagkvQueryEngine(rag=rag, similarity_top_k=3, max_new_tokens=48, streaming=True)
    print("[blend, streaming] ", end="", flush=True)
    streaming.query(question).print_response_stream()
    print()


if __name__ == "__main__":
    try:
        main()
    except EngineError as exc:  # a server that is down or died: its one line, exit 1
        raise SystemExit(f"error: {exc}") from None
