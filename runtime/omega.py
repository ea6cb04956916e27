"""Omega in NumPy: recurrences, router and the logits correction sigma(omega) W' o_t.

Written from the head's definition (``docs/design.md``, "The head") independently of
``zptr/head.py`` (the PyTorch definition), so the parity tests that compare the two are a real
check. Shapes: D hidden size, V vocabulary, T positions.

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
from functools import cached_property
from typing import Callable, Optional

import numpy as np

from zptr.choices import RoutingKind
from zptr.config import CLUSTERS, OmegaConfig
from zptr.tensor_names import Tensors

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
    """Per position: the route index (T,), the distance of the deciding score from its threshold
    (threshold mode) or of the top two weights (resonance mode), the factor g of the chosen
    cluster (||o_t|| <= g sqrt(D)), and o_t itself, computed only when asked for."""

    routes: np.ndarray
    margins: np.ndarray
    gates: np.ndarray
    _experts: Callable[[np.ndarray], np.ndarray]  # o_t of the given rows

    @cached_property
    def outputs(self) -> np.ndarray:
        """o_t for every position, (T, D)."""
        return self._experts(np.arange(len(self.routes)))

    def output(self, row: int) -> np.ndarray:
        """o_t of one position (D,), without the other positions' cluster products."""
        if "outputs" in self.__dict__:
            return self.outputs[row]
        return self._experts(np.array([row]))[0]

    def output_bound(self, row: int, hidden_size: int) -> float:
        """An upper bound of ||o_row|| known before o is computed: |tanh| <= 1 per component."""
        return float(self.gates[row]) * float(np.sqrt(hidden_size))


def _fold(matrix: np.ndarray, bias: Optional[np.ndarray], depth_w: np.ndarray, depth_b: np.ndarray,
          d: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """A linear map M of z = [h, p, d] with d = P delta + b_P, as (M_h, M_p, M_d P, M_d b_P + b):
    the depth projection's D x D product folded away (in float64, then float32)."""
    m = matrix.astype(np.float64)
    folded = (m[:, 2 * d:] @ depth_w.astype(np.float64)).astype(np.float32)
    constant = m[:, 2 * d:] @ depth_b.astype(np.float64) + (0.0 if bias is None else bias)
    return (np.ascontiguousarray(matrix[:, :d]), np.ascontiguousarray(matrix[:, d:2 * d]), folded,
            constant.astype(np.float32))


class OmegaRouter:
    """The Omega router over NumPy float32 arrays named as in a checkpoint (``omega.*``).

    z_t = [h_t, p_t, d_t] only ever enters linear maps (the three scores, the resonance maps), and
    d_t is linear in delta_t: those maps are folded with the depth projection once, so a decoded
    token costs one D x D product for p_t and one for its cluster (only when o_t is needed).
    """

    def __init__(self, tensors: dict[str, np.ndarray], config: OmegaConfig):
        t = {Tensors.router_name(name): np.asarray(v, np.float32) for name, v in tensors.items()}
        self.config = config
        d = self.hidden_size = t["phase.weight"].shape[0]
        self.gate = float(sigmoid(np.float64(t["gate"])))  # sigma(omega)
        self.phase_w, self.phase_b = t["phase.weight"], t["phase.bias"]
        self.origin_w, self.origin_b = t["origin.weight"], t["origin.bias"]
        depth_w, depth_b = t["depth.weight"], t["depth.bias"]
        # The three threshold scores b, r_depth, r_phase as one (3, 3D) map, folded.
        scores = np.concatenate([t["boundary.weight"], t["router_depth.weight"], t["router_phase.weight"]])
        scores_b = np.concatenate([t["boundary.bias"], t["router_depth.bias"], t["router_phase.bias"]])
        self.scores = _fold(scores, scores_b, depth_w, depth_b, d)
        self.resonance = _fold(t["resonance_linear.weight"], t["resonance_linear.bias"], depth_w, depth_b, d)
        self.resonance_sin = _fold(t["resonance_sin.weight"], None, depth_w, depth_b, d)
        self.thresholds = np.array([config.boundary_threshold, config.depth_threshold,
                                    config.phase_threshold], np.float32)
        self.experts_w, self.experts_b = t["experts_weight"], t["experts_bias"]

    def origin_term(self, origin: Optional[np.ndarray]) -> np.ndarray:
        """scale (W_origin s + b_origin), constant over a request; s = 0 without an origin."""
        s = np.zeros(self.hidden_size, np.float32) if origin is None else origin
        return np.float32(self.config.origin_scale) * (self.origin_w @ s + self.origin_b)

    @staticmethod
    def _apply(folded: tuple, hidden: np.ndarray, p: np.ndarray, delta: np.ndarray) -> np.ndarray:
        m_h, m_p, m_delta, constant = folded
        return hidden @ m_h.T + p @ m_p.T + delta @ m_delta.T + constant

    def route(self, hidden: np.ndarray, phase: np.ndarray, delta: np.ndarray,
              origin_term: np.ndarray) -> Routing:
        hidden = np.atleast_2d(np.asarray(hidden, np.float32))
        phase, delta = np.atleast_2d(phase), np.atleast_2d(delta)
        p = np.tanh(phase @ self.phase_w.T + self.phase_b + origin_term)
        if self.config.routing == RoutingKind.RESONANCE:
            logits = self._apply(self.resonance, hidden, p, delta) + np.sin(
                self._apply(self.resonance_sin, hidden, p, delta))
            weights = np.exp(logits - logits.max(1, keepdims=True))
            weights /= weights.sum(1, keepdims=True)
            top2 = np.sort(weights, 1)[:, -2:]
            return Routing(weights.argmax(1), top2[:, 1] - top2[:, 0], np.ones(len(hidden), np.float32),
                           lambda rows: self._mixed_experts(hidden[rows], weights[rows]))
        scores = sigmoid(self._apply(self.scores, hidden, p, delta))  # (T, 3): b, r_depth, r_phase
        above = scores > self.thresholds
        # First score above its threshold decides (BOUNDARY, DEPTH, PHASE); none: BASE.
        routes = np.where(above.any(1), above.argmax(1), BASE)
        # The deciding scores are those examined up to the decision: all three for BASE.
        distance = np.abs(scores - self.thresholds)
        examined = np.arange(3)[None, :] <= np.minimum(routes, 2)[:, None]
        margins = np.where(examined, distance, np.inf).min(1)
        gates = np.take_along_axis(np.concatenate([scores, np.ones((len(scores), 1), np.float32)], 1),
                                   routes[:, None], 1)[:, 0]
        return Routing(routes, margins, gates,
                       lambda rows: gates[rows, None] * self._experts(hidden[rows], routes[rows]))

    def _experts(self, hidden: np.ndarray, clusters: np.ndarray) -> np.ndarray:
        """tanh(W_k h + b_k) for cluster ``clusters[t]`` of each row t."""
        out = np.empty_like(hidden)
        for k in np.unique(clusters):
            rows = clusters == k
            out[rows] = np.tanh(hidden[rows] @ self.experts_w[k].T + self.experts_b[k])
        return out

    def _mixed_experts(self, hidden: np.ndarray, weights: np.ndarray) -> np.ndarray:
        outputs = np.zeros_like(hidden)
        for k in range(len(CLUSTERS)):
            outputs += weights[:, k:k + 1] * np.tanh(hidden @ self.experts_w[k].T + self.experts_b[k])
        return outputs


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


class HalfMatrix:
    """W' stored in float16 for the per-token full product of exact decoding: half the bytes to
    read (the product is memory-bound), float32 accumulation (torch's CPU kernel), and a proven
    error bound per row: storing W' and o in float16 moves each product term by at most 2u16,
    accumulation by D u32, rounding the result to float16 by u16 of |W'_v| |o|, so
    |half - exact| <= (3 u16 + D u32) ||W'_v|| ||o|| with u16 = 2^-11, u32 = 2^-24.

    :meth:`build` checks the bound on this machine's kernel and returns None where it does not
    hold (then exact decoding stays in float32).
    """

    def __init__(self, matrix: np.ndarray):
        import torch

        self._torch = torch
        # Rounded to float16 by NumPy (round to nearest even, as torch's .half()): a new, writable
        # array, where the model's matrix may be a read-only view torch would warn about.
        self.weights = torch.from_numpy(np.ascontiguousarray(matrix, np.float32).astype(np.float16))
        self.factor = 1.01 * (3 * 2.0 ** -11 + matrix.shape[1] * 2.0 ** -24)

    def product(self, output: np.ndarray) -> np.ndarray:
        torch = self._torch
        with torch.inference_mode():
            vector = torch.from_numpy(np.ascontiguousarray(output, np.float32).astype(np.float16))
            return torch.mv(self.weights, vector).float().numpy()

    @classmethod
    def build(cls, matrix: np.ndarray, row_norms: np.ndarray) -> Optional["HalfMatrix"]:
        try:
            half = cls(matrix)
        except ImportError:
            return None
        output = np.random.default_rng(0).standard_normal(matrix.shape[1]).astype(np.float32)
        error = np.abs(half.product(output) - matrix.astype(np.float64) @ output.astype(np.float64))
        within = error <= half.factor * row_norms * np.linalg.norm(output)
        return half if within.all() else None


class Corrector:
    """Adds sigma(omega) W' o to logits, exactly or certified on a candidate set."""

    def __init__(self, output_matrix: np.ndarray, gate: float, max_candidates: int = 256):
        self.matrix = np.ascontiguousarray(output_matrix, np.float32)  # (V, D)
        self.row_norms = np.linalg.norm(self.matrix, axis=1).astype(np.float32)
        self.rounding = 2.0 * self.matrix.shape[1] * 2.0 ** -24 * float(self.row_norms.max())
        self.gate = np.float32(gate)
        self.max_candidates = max_candidates
        self.stats = CorrectionStats()
        self._half: Optional[HalfMatrix] = None
        self._half_checked = False

    def _count(self, outcome: str, stats: Optional[CorrectionStats]) -> None:
        """One correction's outcome in the engine's totals and, given, one request's own."""
        for record in (self.stats, stats):
            if record is not None:
                setattr(record, outcome, getattr(record, outcome) + 1)

    def exact(self, logits: np.ndarray, output: np.ndarray,
              stats: Optional[CorrectionStats] = None) -> np.ndarray:
        self._count("exact", stats)
        return logits + self.gate * (self.matrix @ output)

    def exact_choice(self, logits: np.ndarray, output: np.ndarray,
                     stats: Optional[CorrectionStats] = None) -> int:
        """The argmax of the exactly corrected logits. The full product runs on W' in float16
        (:class:`HalfMatrix`); every token its error bound cannot rule out is recomputed in
        float32, as the fast mode computes it, and a near-tie falls back to the float32 product."""
        if not self._half_checked:
            self._half, self._half_checked = HalfMatrix.build(self.matrix, self.row_norms), True
        if self._half is None:
            return int(np.argmax(self.exact(logits, output, stats)))
        self._count("exact", stats)
        approx = logits + self.gate * self._half.product(output)
        bound = (self.gate * np.float32(self._half.factor * np.linalg.norm(output))) * self.row_norms
        top = int(np.argmax(approx))
        candidates = np.flatnonzero(approx + bound >= approx[top] - bound[top])
        values = logits[candidates] + self.gate * (self.matrix[candidates] @ output)
        if len(values) > 1:
            top2 = np.partition(values, -2)[-2:]
            if top2[1] - top2[0] <= self._tolerance(float(self.gate * np.linalg.norm(output))):
                return int(np.argmax(logits + self.gate * (self.matrix @ output)))
        return int(candidates[np.argmax(values)])

    def exact_rows(self, logits: np.ndarray, outputs: np.ndarray) -> np.ndarray:
        """Exact correction of many positions at once: (T, V) + c (T, D) W'^T."""
        return logits + self.gate * (outputs @ self.matrix.T)

    def _tolerance(self, radius: float) -> float:
        return max(CERTIFY_TOLERANCE, self.rounding * radius)

    def greedy_before_output(self, logits: np.ndarray, bound: float,
                             stats: Optional[CorrectionStats] = None) -> Optional[int]:
        """The greedy token when the base margin alone decides it: with ||o|| <= ``bound`` known
        before o is computed, no token's correction can overtake the base argmax. None otherwise."""
        radius = self.gate * np.float32(bound)
        top = int(np.argmax(logits))
        upper = logits + radius * self.row_norms
        upper[top] = -np.inf
        if logits[top] - radius * self.row_norms[top] - self._tolerance(float(radius)) > upper.max():
            self._count("certified", stats)
            return top
        return None

    def fast(self, logits: np.ndarray, output: np.ndarray, keep: int = 1,
             stats: Optional[CorrectionStats] = None) -> np.ndarray:
        """Logits whose top ``keep`` tokens and their values equal the exact mode's.

        Tokens outside the candidate set keep their base logit, which is below every token
        the certificate keeps. ``keep`` = 1 for greedy; the sampler's top-k otherwise.
        """
        logits = np.asarray(logits, np.float32)
        keep = max(1, int(keep))
        if keep > self.max_candidates:  # more tokens to certify than candidates allowed
            self._count("fallback", stats)
            return self.exact(logits, output, stats)
        seeds = (np.array([int(np.argmax(logits))]) if keep == 1
                 else np.argpartition(logits, -keep)[-keep:])
        shift = self.gate * (self.matrix[seeds] @ output)
        floor = float((logits[seeds] + shift).min())  # <= the exact keep-th largest value
        radius = self.gate * np.float32(np.linalg.norm(output))
        tolerance = self._tolerance(float(radius))
        upper = logits + radius * self.row_norms
        candidates = np.flatnonzero(upper >= floor - tolerance)
        if len(candidates) > self.max_candidates:
            self._count("fallback", stats)
            return self.exact(logits, output, stats)
        values = logits[candidates] + self.gate * (self.matrix[candidates] @ output)
        if keep == 1 and len(values) > 1:
            top2 = np.partition(values, -2)[-2:]
            if top2[1] - top2[0] <= tolerance:  # a near-tie rounding could flip
                self._count("fallback", stats)
                return self.exact(logits, output, stats)
        out = logits.copy()
        out[candidates] = values
        self._count("certified", stats)
        return out


__all__ = ["BOUNDARY", "DEPTH", "PHASE", "BASE", "CERTIFY_TOLERANCE", "Corrector",
           "CorrectionStats", "OmegaRouter", "Routing", "recurrences", "sigmoid"]
