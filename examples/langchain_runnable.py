"""LangChain runnable on ragkv: ingest two pydoc topics, ask, print answer and cache trace.

Run: .venv/bin/python examples/langchain_runnable.py \
    [--engine hf|vllm|http://HOST:PORT/v1] [--home DIR]
(needs `pip install 'ragkv[langchain]'`; the default model and ~/.cache/ragkv). The same code
runs on every engine: against a served vLLM, start it with `ragkv serve --home DIR` first and
give this script the same --home (server and app share the cache).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from pydoc_data.topics import topics
from typing import Any

from langchain_core.callbacks import BaseCallbackHandler

from ragkv import RagKV, RagkvConfig
from ragkv.connectors.langchain import RagkvRunnable
from ragkv.engine.base import EngineError


class PrintCacheEvents(BaseCallbackHandler):
    """Any LangChain callback handler sees ragkv's custom events; this one prints them."""

    def on_custom_event(self, name: str, data: Any, **kwargs: Any) -> None:
        if name == "ragkv_cache":
            print(f"  [event] {data['hits']} hits, {data['misses']} misses")
        elif name == "ragkv_ttft":
            print(f"  [event] TTFT {data['ttft_s']:.3f}s ({data['mode']})")


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
    chain = RagkvRunnable(rag=rag, k=3, max_new_tokens=48)
    question = "What does the with statement call when the block is left?"
    for mode in ("full", "blend"):
        out = chain.invoke({"question": question},
                           config={"configurable": {"ragkv_mode": mode, "ragkv_ratio": 0.15},
                                   "callbacks": [PrintCacheEvents()]})
        t = out["trace"]
        print(f"[{mode}] TTFT {t['ttft_s']:.2f}s, hits {t['hits']}/{len(t['chunks'])}, "
              f"recomputed {t['recomputed_tokens']}/{t['context_tokens']} tokens")
        print("   ", out["answer"])
    print("[blend, streaming] ", end="", flush=True)
    for piece in chain.pick("answer").stream(question):  # the text of the output's pieces
        print(piece, end="", flush=True)
    print()


if __name__ == "__main__":
    try:
        main()
    except EngineError as exc:  # a server that is down or died: its one line, exit 1
        raise SystemExit(f"error: {exc}") from None
