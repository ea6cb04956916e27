"""Comparing two sets of logits: the one definition of KL divergence and top-1 agreement used by
the parity tests, ``zptr bench``'s quality columns and ``zptr eval``.

``zptr eval`` reports llama-perplexity's statistics (``tools/perplexity/perplexity.cpp``,
``kl_divergence``): per scored position the negative log-likelihood of the next token under the
model and under the base, KL(base || model), whether both put the same token on top, and the
difference of the next token's probabilities; then means with llama.cpp's +/- (the standard
error of the mean, zero for 10 positions or fewer), KLD percentiles interpolated between sorted
values, the PPL ratio with the covariance of both log-likelihoods, and the RMS of the
probability difference. Unlike llama.cpp, which stores the base's log-probabilities in 16 bits
and drops probabilities below e^-16 from the KL sum, everything here is float64 and complete.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np

NEAR_TIE = 0.01  # reference top-2 logit margin under which float rounding may flip the argmax


def log_softmax(logits: np.ndarray) -> np.ndarray:
    x = np.asarray(logits, np.float64)
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def kl_per_position(reference: np.ndarray, candidate: np.ndarray) -> np.ndarray:
    """KL(reference || candidate) of every position's distribution, float64."""
    return _kl(log_softmax(reference), log_softmax(candidate))


def _kl(ref: np.ndarray, got: np.ndarray) -> np.ndarray:
    """KL per position from the two sides' log-probabilities."""
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


# ------------------------------------------------------------------------------ llama-perplexity

KLD_PERCENTILES = (0.90, 0.95, 0.99, 0.999)


@dataclass
class Scores:
    """Per scored position (float64): what llama-perplexity accumulates. The base fields are
    None without a base model."""

    nll: np.ndarray  # -log p(next token) under the model
    nll_base: Optional[np.ndarray] = None
    kld: Optional[np.ndarray] = None  # KL(base || model)
    same_top: Optional[np.ndarray] = None  # bool: the same argmax
    p_diff: Optional[np.ndarray] = None  # p(next token) - p_base(next token)


def _nll(log_probs: np.ndarray, targets: np.ndarray) -> np.ndarray:
    return -np.take_along_axis(log_probs, targets[:, None], -1)[:, 0]


def score(logits: np.ndarray, targets: Sequence[int], base: Optional[np.ndarray] = None) -> Scores:
    """Scores of positions whose logits are the rows of ``logits`` (and ``base``), row i
    predicting ``targets[i]``. Each side's log-softmax is computed once (float64)."""
    targets = np.asarray(targets)
    got = log_softmax(logits)
    nll = _nll(got, targets)
    if base is None:
        return Scores(nll)
    ref = log_softmax(base)
    nll_base = _nll(ref, targets)
    return Scores(nll, nll_base, _kl(ref, got), np.argmax(base, -1) == np.argmax(logits, -1),
                  np.exp(-nll) - np.exp(-nll_base))


def concatenate(parts: Sequence[Scores]) -> Scores:
    """The scores of several chunks as one."""
    def join(name: str) -> Optional[np.ndarray]:
        values = [getattr(part, name) for part in parts]
        return None if any(v is None for v in values) else np.concatenate(values)

    return Scores(join("nll"), join("nll_base"), join("kld"), join("same_top"), join("p_diff"))


def mean_and_uncertainty(values: np.ndarray) -> tuple[float, float]:
    """(mean, its standard error) as llama-perplexity computes them: sqrt((E[v^2] - E[v]^2) /
    (n - 1)), reported as 0 for n <= 10 or a non-positive variance."""
    values = np.asarray(values, np.float64)
    if values.size < 1:
        return 0.0, 0.0
    mean = float(values.mean())
    variance = float(np.mean(values * values)) - mean * mean
    error = np.sqrt(variance / (values.size - 1)) if variance > 0 and values.size > 10 else 0.0
    return mean, float(error)


def _covariance(a: np.ndarray, b: np.ndarray) -> float:
    """llama-perplexity's covariance of the two mean log-likelihoods (0 for n < 10)."""
    n = a.size
    if n < 10:
        return 0.0
    return (float(np.mean(a * b)) - float(a.mean()) * float(b.mean())) / (n - 1)


def statistics(scores: Scores) -> dict[str, float]:
    """llama-perplexity's summary of ``scores``: PPL +/- error; with a base, PPL(base), the PPL
    ratio, mean KLD +/- error, its median, 90/95/99/99.9 % percentiles and maximum, the share
    of same top tokens +/- error, and the RMS of the probability difference +/- error."""
    log_ppl, log_ppl_error = mean_and_uncertainty(scores.nll)
    ppl = float(np.exp(log_ppl))
    out = {"positions": int(scores.nll.size), "ppl": ppl, "ppl_error": ppl * log_ppl_error}
    if scores.kld is None:
        return out
    log_base, log_base_error = mean_and_uncertainty(scores.nll_base)
    ppl_base = float(np.exp(log_base))
    covariance = _covariance(scores.nll, scores.nll_base)
    ratio = float(np.exp(log_ppl - log_base))
    ratio_variance = log_ppl_error ** 2 + log_base_error ** 2 - 2.0 * covariance
    kld, kld_error = mean_and_uncertainty(scores.kld)
    same = float(scores.same_top.mean())
    n = scores.nll.size
    mse, mse_error = mean_and_uncertainty(scores.p_diff ** 2)
    rms = float(np.sqrt(mse))
    out.update({
        "ppl_base": ppl_base, "ppl_base_error": ppl_base * log_base_error,
        "ppl_ratio": ratio, "ppl_ratio_error": ratio * float(np.sqrt(max(ratio_variance, 0.0))),
        "kld_mean": kld, "kld_mean_error": kld_error, "kld_median": float(np.median(scores.kld)),
        **{f"kld_p{100 * q:g}": float(np.quantile(scores.kld, q)) for q in KLD_PERCENTILES},
        "kld_max": float(scores.kld.max()),
        "same_top": same, "same_top_error": float(np.sqrt(same * (1 - same) / (n - 1))) if n > 1 else 0.0,
        "rms_dp": rms, "rms_dp_error": 0.5 / rms * mse_error if rms > 0 else 0.0,
    })
    return out
