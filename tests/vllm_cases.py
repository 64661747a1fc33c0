"""What the vLLM test modules share: a tiny corpus and its question (short prompts, because
vLLM's CPU build is slow here)."""

from __future__ import annotations

CHUNKS = (
    "The capital of Freedonia is Zumbat. It lies on the river Oxo and has three bridges.",
    "Zumbat is famous for its blue cheese and for a kite festival held every May.",
    "The river Oxo floods every spring, and the bridges of Zumbat were rebuilt in 1911.",
)
QUESTION = "What is the capital of Freedonia and what is it famous for?"
