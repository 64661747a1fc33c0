"""Fidelity metrics against full prefill, as defined in the evaluation README.

All compare a mode with ``full`` on the same assembled prompt, same engine, greedy decoding.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def kl(p_logits: torch.Tensor, q_logits: torch.Tensor) -> torch.Tensor:
    """KL(P || Q) per row, from logits ``[..., vocab]`` (P is the reference: full prefill)."""
    logp = torch.log_softmax(p_logits.float(), dim=-1)
    logq = torch.log_softmax(q_logits.float(), dim=-1)
    return (logp.exp() * (logp - logq)).sum(-1).clamp_min(0.0)


def first_token(full_logits: torch.Tensor, mode_logits: torch.Tensor) -> dict[str, float]:
    return {
        "first_token_agree": float(full_logits.argmax() == mode_logits.argmax()),
        "first_token_kl": float(kl(full_logits, mode_logits)),
    }


def teacher_forced(full_scores: torch.Tensor, mode_scores: torch.Tensor,
                   target: Sequence[int]) -> dict[str, float]:
    """Scores ``[n, vocab]`` where row i predicts ``target[i]`` (full's greedy answer)."""
    n = len(target)
    if n == 0:
        return {"tf_agree": 1.0, "tf_kl": 0.0}
    tgt = torch.tensor(list(target))
    agree = (mode_scores[:n].argmax(-1) == tgt).float().mean()
    return {"tf_agree": float(agree), "tf_kl": float(kl(full_scores[:n], mode_scores[:n]).mean())}


def rouge_l(reference: Sequence, candidate: Sequence) -> float:
    """LCS-based F1 between two token sequences."""
    if not reference or not candidate:
        return float(len(reference) == len(candidate))
    prev = [0] * (len(candidate) + 1)
    for r in reference:
        cur = [0]
        for j, c in enumerate(candidate):
            cur.append(prev[j] + 1 if r == c else max(prev[j + 1], cur[j]))
        prev = cur
    lcs = prev[-1]
    if lcs == 0:
        return 0.0
    p, r = lcs / len(candidate), lcs / len(reference)
    return 2 * p * r / (p + r)


def contains(answer_text: str, expected: str | None) -> float | None:
    if expected is None:
        return None
    return float(expected.strip().lower() in answer_text.lower())
