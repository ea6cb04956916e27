"""Comparing two sets of logits: the one definition of KL divergence and top-1 agreement used by
the parity tests, ``zptr bench``'s quality columns and ``zptr eval``."""

from __future__ import annotations

import numpy as np

NEAR_TIE = 0.01  # reference top-2 logit margin under which float rounding may flip the argmax


def log_softmax(logits: np.ndarray) -> np.ndarray:
    x = np.asarray(logits, np.float64)
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def kl_per_position(reference: np.ndarray, candidate: np.ndarray) -> np.ndarray:
    """KL(reference || candidate) of every position's distribution, float64."""
    ref, got = log_softmax(reference), log_softmax(candidate)
    return (np.exp(ref) * (ref - got)).sum(-1)


def quality(reference: np.ndarray, candidate: np.ndarray) -> tuple[float, float]:
    """(mean KL(reference || candidate), top-1 agreement) over positions."""
    top1 = (np.argmax(reference, -1) == np.argmax(candidate, -1)).mean()
    return float(kl_per_position(reference, candidate).mean()), float(top1)


def compare(reference: np.ndarray, candidate: np.ndarray) -> dict[str, float]:
    """Parity figures: mean KL, top-1 agreement (also over the positions that are not near-ties),
    max |difference| and the number of positions."""
    mean_kl, top1 = quality(reference, candidate)
    agree = np.argmax(reference, -1) == np.argmax(candidate, -1)
    top2 = np.sort(reference, -1)[:, -2:]
    clear = (top2[:, 1] - top2[:, 0]) >= NEAR_TIE
    return {"mean_kl": mean_kl, "top1": top1, "top1_non_tie": float(agree[clear].mean()),
            "max_abs": float(np.abs(np.asarray(reference, np.float64) - candidate).max()),
            "n": int(reference.shape[0])}
