"""Ingest two documents, then answer one question with full prefill and with ragkv blend.

Run: .venv/bin/python examples/quickstart.py   (uses the default model and ~/.cache/ragkv)
"""

from __future__ import annotations

from pydoc_data.topics import topics

from ragkv import BlendConfig, RagKV, RagkvConfig


def main() -> None:
    rag = RagKV(RagkvConfig())
    for name in ("with", "context-managers"):
        rag.ingest_text(f"pydoc:{name}", topics[name])  # precomputes and stores chunk KV
    question = "What does the with statement call when the block is left?"
    chunks = rag.retrieve(question, k=3)  # chunks carry their cache keys
    for mode in ("full", "blend"):
        answer = rag.generate(chunks, question, mode=mode, blend=BlendConfig(ratio=0.15),
                              max_new_tokens=48)
        t = answer.trace
        print(f"[{mode}] TTFT {t.ttft_s:.2f}s, hits {t.hits}/{len(t.chunks)}, "
              f"recomputed {t.recomputed_tokens}/{t.context_tokens} tokens")
        print("   ", answer.text)


if __name__ == "__main__":
    main()
