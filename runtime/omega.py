"""Omega in NumPy: recurrences, router and the logits correction sigma(omega) W' o_t.

Written from the head's definition (``docs/design.md``, "The head") independently of ``zptr/head.py`` (the PyTorch definition), so the parity
tests that compare the two are a real check. Shapes: D hidden size, V vocabulary, T positions.

    phi_t   = beta phi_{t-1} + (1 - beta) h_t            phi_0 = 0
    delta_t = h_t - h_{t-1}                               delta_1 = 0
    p_t     = tanh(W_phase phi_t + b_phase + scale (W_origin s + b_origin))
    d_t     = P delta_t + b_P,   z_t = [h_t, p_t, d_t]
    logits  = base logits + sigma(omega) W' o_t

The correction has two modes. ``exact`` multiplies the whole (V, D) matrix W'. ``fast`` uses
|W'_v . o| <= ||W'_v|| ||o|| (row norms computed once): with L a lower bound of the exact value
that must be beaten, every token whose upper bound ``base_v + c ||o|| ||W'_v||`` stays below L
cannot be chosen, so only the remaining candidates need the product. When too many candidates
remain, or two of them are closer than rounding could separate, it falls back to ``exact``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np

from zptr.config import CLUSTERS, OmegaConfig

BOUNDARY, DEPTH, PHASE, BASE = range(4)
# A certified choice must win by more than float32 rounding could move it, so fast and exact
# pick the same token even where they sum in different orders: at least this much, and at least
# the a-priori bound 2 * D * 2^-24 * c ||o|| max_v ||W'_v|| on the two products' difference.
CERTIFY_TOLERANCE = 1e-4


def sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def recurrences(hidden: np.ndarray, phase: Optional[np.ndarray], last: Optional[np.ndarray],
                decay: float) -> tuple[np.ndarray, np.ndarray]:
    """(phi, delta) for the rows of ``hidden`` (T, D), continuing from phi_{t-1} and h_{t-1}.

    ``phase`` / ``last`` are None at the start of a sequence (phi_0 = 0, delta_1 = 0).
    """
    hidden = np.asarray(hidden, np.float32)
    decay32, rest32 = np.float32(decay), np.float32(1.0 - decay)
    phases = np.empty_like(hidden)
    current = np.zeros(hidden.shape[1], np.float32) if phase is None else phase
    for t, row in enumerate(hidden):
        current = decay32 * current + rest32 * row
        phases[t] = current
    deltas = np.empty_like(hidden)
    deltas[1:] = hidden[1:] - hidden[:-1]
    deltas[0] = 0.0 if last is None else hidden[0] - last
    return phases, deltas


@dataclass
class Routing:
    """Per position: o_t (T, D), route index (T,), and the distance of the deciding score from
    its threshold (threshold mode) or of the top two weights (resonance mode)."""

    outputs: np.ndarray
    routes: np.ndarray
    margins: np.ndarray


class OmegaRouter:
    """The Omega router over NumPy float32 arrays named as in a checkpoint (``omega.*``)."""

    def __init__(self, tensors: dict[str, np.ndarray], config: OmegaConfig):
        t = {name.removeprefix("omega."): np.asarray(v, np.float32) for name, v in tensors.items()}
        self.config = config
        self.hidden_size = t["phase.weight"].shape[0]
        self.gate = float(sigmoid(np.float64(t["gate"])))  # sigma(omega)
        self.phase_w, self.phase_b = t["phase.weight"], t["phase.bias"]
        self.origin_w, self.origin_b = t["origin.weight"], t["origin.bias"]
        self.depth_w, self.depth_b = t["depth.weight"], t["depth.bias"]
        # The three threshold scores b, r_depth, r_phase as one (3, 3D) projection.
        self.score_w = np.concatenate([t["boundary.weight"], t["router_depth.weight"],
                                       t["router_phase.weight"]])
        self.score_b = np.concatenate([t["boundary.bias"], t["router_depth.bias"],
                                       t["router_phase.bias"]])
        self.thresholds = np.array([config.boundary_threshold, config.depth_threshold,
                                    config.phase_threshold], np.float32)
        self.experts_w, self.experts_b = t["experts_weight"], t["experts_bias"]
        self.res_w, self.res_b = t["resonance_linear.weight"], t["resonance_linear.bias"]
        self.res_sin_w = t["resonance_sin.weight"]

    def origin_term(self, origin: Optional[np.ndarray]) -> np.ndarray:
        """scale (W_origin s + b_origin), constant over a request; s = 0 without an origin."""
        s = np.zeros(self.hidden_size, np.float32) if origin is None else origin
        return np.float32(self.config.origin_scale) * (self.origin_w @ s + self.origin_b)

    def features(self, hidden: np.ndarray, phase: np.ndarray, delta: np.ndarray,
                 origin_term: np.ndarray) -> np.ndarray:
        """z_t = [h, p, d] for every row, (T, 3D)."""
        p = np.tanh(phase @ self.phase_w.T + self.phase_b + origin_term)
        d = delta @ self.depth_w.T + self.depth_b
        return np.concatenate([hidden, p, d], axis=-1)

    def _experts(self, hidden: np.ndarray, clusters: np.ndarray) -> np.ndarray:
        """tanh(W_k h + b_k) for cluster ``clusters[t]`` of each row t."""
        out = np.empty_like(hidden)
        for k in np.unique(clusters):
            rows = clusters == k
            out[rows] = np.tanh(hidden[rows] @ self.experts_w[k].T + self.experts_b[k])
        return out

    def route(self, hidden: np.ndarray, phase: np.ndarray, delta: np.ndarray,
              origin_term: np.ndarray) -> Routing:
        hidden = np.atleast_2d(np.asarray(hidden, np.float32))
        z = self.features(hidden, np.atleast_2d(phase), np.atleast_2d(delta), origin_term)
        if self.config.routing == "resonance":
            return self._resonance(hidden, z)
        scores = sigmoid(z @ self.score_w.T + self.score_b)  # (T, 3): b, r_depth, r_phase
        above = scores > self.thresholds
        # First score above its threshold decides (BOUNDARY, DEPTH, PHASE); none: BASE.
        routes = np.where(above.any(1), above.argmax(1), BASE)
        # The deciding scores are those examined up to the decision: all three for BASE.
        distance = np.abs(scores - self.thresholds)
        examined = np.arange(3)[None, :] <= np.minimum(routes, 2)[:, None]
        margins = np.where(examined, distance, np.inf).min(1)
        gates = np.concatenate([scores, np.ones((len(z), 1), np.float32)], 1)
        gate = np.take_along_axis(gates, routes[:, None], 1)
        return Routing(gate * self._experts(hidden, routes), routes, margins)

    def _resonance(self, hidden: np.ndarray, z: np.ndarray) -> Routing:
        logits = z @ self.res_w.T + self.res_b + np.sin(z @ self.res_sin_w.T)
        weights = np.exp(logits - logits.max(1, keepdims=True))
        weights /= weights.sum(1, keepdims=True)
        outputs = np.zeros_like(hidden)
        for k in range(len(CLUSTERS)):
            outputs += weights[:, k:k + 1] * np.tanh(hidden @ self.experts_w[k].T
                                                     + self.experts_b[k])
        top2 = np.sort(weights, 1)[:, -2:]
        return Routing(outputs, weights.argmax(1), top2[:, 1] - top2[:, 0])


@dataclass
class CorrectionStats:
    certified: int = 0
    fallback: int = 0
    exact: int = 0

    @property
    def certified_share(self) -> float:
        total = self.certified + self.fallback
        return self.certified / total if total else 0.0

    def reset(self) -> None:
        self.certified = self.fallback = self.exact = 0


class Corrector:
    """Adds sigma(omega) W' o to logits, exactly or certified on a candidate set."""

    def __init__(self, output_matrix: np.ndarray, gate: float, max_candidates: int = 256):
        self.matrix = np.ascontiguousarray(output_matrix, np.float32)  # (V, D)
        self.row_norms = np.linalg.norm(self.matrix, axis=1).astype(np.float32)
        self.rounding = 2.0 * self.matrix.shape[1] * 2.0 ** -24 * float(self.row_norms.max())
        self.gate = np.float32(gate)
        self.max_candidates = max_candidates
        self.stats = CorrectionStats()

    def exact(self, logits: np.ndarray, output: np.ndarray) -> np.ndarray:
        self.stats.exact += 1
        return logits + self.gate * (self.matrix @ output)

    def exact_rows(self, logits: np.ndarray, outputs: np.ndarray) -> np.ndarray:
        """Exact correction of many positions at once: (T, V) + c (T, D) W'^T."""
        return logits + self.gate * (outputs @ self.matrix.T)

    def fast(self, logits: np.ndarray, output: np.ndarray, keep: int = 1) -> np.ndarray:
        """Logits whose top ``keep`` tokens and their values equal the exact mode's.

        Tokens outside the candidate set keep their base logit, which is below every token
        the certificate keeps. ``keep`` = 1 for greedy; the sampler's top-k otherwise.
        """
        logits = np.asarray(logits, np.float32)
        keep = max(1, int(keep))
        if keep > self.max_candidates:  # more tokens to certify than candidates allowed
            self.stats.fallback += 1
            return self.exact(logits, output)
        seeds = (np.array([int(np.argmax(logits))]) if keep == 1
                 else np.argpartition(logits, -keep)[-keep:])
        shift = self.gate * (self.matrix[seeds] @ output)
        floor = float((logits[seeds] + shift).min())  # <= the exact keep-th largest value
        radius = self.gate * np.float32(np.linalg.norm(output))
        tolerance = max(CERTIFY_TOLERANCE, self.rounding * float(radius))
        upper = logits + radius * self.row_norms
        candidates = np.flatnonzero(upper >= floor - tolerance)
        if len(candidates) > self.max_candidates:
            self.stats.fallback += 1
            return self.exact(logits, output)
        values = logits[candidates] + self.gate * (self.matrix[candidates] @ output)
        if keep == 1 and len(values) > 1:
            top2 = np.partition(values, -2)[-2:]
            if top2[1] - top2[0] <= tolerance:  # a near-tie rounding could flip
                self.stats.fallback += 1
                return self.exact(logits, output)
        out = logits.copy()
        out[candidates] = values
        self.stats.certified += 1
        return out


__all__ = ["BOUNDARY", "DEPTH", "PHASE", "BASE", "CERTIFY_TOLERANCE", "Corrector",
           "CorrectionStats", "OmegaRouter", "Routing", "recurrences", "sigmoid"]
