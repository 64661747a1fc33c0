"""Fidelity metrics against full prefill, as defined in the evaluation README.

All compare a mode with ``full`` on the same assembled prompt, same engine, greedy decoding.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from ragkv.engine.base import NextToken


def kl(p_logits: torch.Tensor, q_logits: torch.Tensor) -> torch.Tensor:
    """KL(P || Q) per row, from logits ``[..., vocab]`` (P is the reference: full prefill)."""
    logp = torch.log_softmax(p_logits.float(), dim=-1)
    logq = torch.log_softmax(q_logits.float(), dim=-1)
    return (logp.exp() * (logp - logq)).sum(-1).clamp_min(0.0)


def top_kl(full: dict[int, float], mode: dict[int, float]) -> float:
    """KL(full || mode) for engines that expose only each distribution's top-k
    log-probabilities: both distributions coarse-grained to full's top-k tokens plus one
    bucket for the rest of the vocabulary, the mode's missing entries floored at its own
    smallest. A coarse-graining never raises a KL, so this reads low, never falsely high; a
    plain sum over the top-k alone is no divergence (its terms may cancel to zero or below
    when two near-tied tokens swap ranks)."""
    if not full or not mode:
        return float("nan")
    floor = min(mode.values())
    p = [math.exp(lp) for lp in full.values()]
    q = [math.exp(mode.get(t, floor)) for t in full]
    # the rest bucket of each, kept positive: a top-k can round to a sum a hair above 1
    p.append(max(0.0, 1.0 - sum(p)))
    q.append(max(1e-12, 1.0 - sum(q)))
    return max(0.0, sum(pi * math.log(pi / qi) for pi, qi in zip(p, q, strict=True) if pi > 0))


def dist_kl(full: NextToken, mode: NextToken) -> tuple[float, str]:
    """KL(full || mode) of one next token and its basis: ``vocab`` (exact, both full
    distributions known) or ``top-k`` (see :func:`top_kl`)."""
    if full.logits is not None and mode.logits is not None:
        return float(kl(full.logits, mode.logits)), "vocab"
    return top_kl(full.top, mode.top), f"top-{len(full.top)}"


def first_token(full: NextToken, mode: NextToken) -> dict[str, float | str]:
    value, basis = dist_kl(full, mode)
    return {"first_token_agree": float(full.argmax == mode.argmax), "first_token_kl": value,
            "kl_basis": basis}


def teacher_forced(full_rows: Sequence[NextToken], mode_rows: Sequence[NextToken],
                   target: Sequence[int]) -> dict[str, float]:
    """Row i predicts ``target[i]`` (full's greedy answer) after the prompt and
    ``target[:i]``: agreement of the mode's top-1 with it, and the mean KL."""
    n = len(target)
    if n == 0:
        return {"tf_agree": 1.0, "tf_kl": 0.0}
    agree = sum(mode_rows[i].argmax == int(target[i]) for i in range(n)) / n
    kls = [dist_kl(full_rows[i], mode_rows[i])[0] for i in range(n)]
    return {"tf_agree": float(agree), "tf_kl": float(sum(kls) / n)}


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
    """1.0 where ``answer_text`` holds ``expected`` (case and surrounding blanks aside); None
    without an expected answer, a blank one included (every text would hold it)."""
    if expected is None or not expected.strip():
        return None
    return float(expected.strip().lower() in answer_text.lower())
