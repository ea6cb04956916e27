"""The ZPTR head in PyTorch: soul (rotation + alpha gate) and the Omega router.

Read top to bottom this is the whole math (``docs/design.md`` has the derivation):

    phi_t   = beta * phi_{t-1} + (1 - beta) * h_t                   phase, phi_0 = 0
    delta_t = h_t - h_{t-1},  delta_1 = 0                           change
    p_t     = tanh(W_phase phi_t + b_phase + 2.5 (W_origin s + b_origin))
    d_t     = P delta_t + b_P
    z_t     = [h_t, p_t, d_t]
    route   = BOUNDARY | DEPTH | PHASE | BASE   (thresholds on three sigmoid scores)
    o_t     = g_route * tanh(W_route h_t + b_route)
    f_t     = h_t + sigmoid(omega) * o_t                              Omega residual
    logits  = W_lm (f_t + sigmoid(alpha) R f_t) = W' f_t              the soul, foldable

Tensor names of ``state_dict()`` are the names stored in ``soul.safetensors`` and in the Omega
sidecar GGUF, so every path reads one naming.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from .choices import RotationKind, RoutingKind
from .config import CLUSTERS, OmegaConfig, ZptrConfig

BOUNDARY, DEPTH, PHASE, BASE = range(4)


# --------------------------------------------------------------------------------------------
# Soul: rotation R and alpha gate
# --------------------------------------------------------------------------------------------


class Rotation(nn.Module):
    """An orthogonal map of the hidden space.

    ``so8``: D/8 independent 8x8 blocks, each exp(A - A^T) of a free generator A, hence exactly in
    SO(8) (det +1). ``dense``: one DxD orthogonal matrix through torch's orthogonal
    parametrisation of a bias-free Linear, the layout of seed-format checkpoints.
    """

    def __init__(self, hidden_size: int, kind: str = RotationKind.SO8, init_std: float = 0.02):
        super().__init__()
        self.hidden_size = hidden_size
        self.kind = kind = RotationKind.parse(kind, "rotation kind", ValueError)
        if kind == RotationKind.SO8:
            self.generator = nn.Parameter(torch.randn(hidden_size // 8, 8, 8) * init_std)
        else:
            linear = nn.Linear(hidden_size, hidden_size, bias=False)
            self.dense = nn.utils.parametrizations.orthogonal(linear)

    def matrix(self) -> torch.Tensor:
        """The materialised rotation: (D/8, 8, 8) blocks for so8, (D, D) for dense."""
        if self.kind == RotationKind.SO8:
            skew = self.generator - self.generator.transpose(-1, -2)
            # float64 keeps every block orthogonal to ~1e-7 after the cast back; the blocks are
            # tiny (8x8), so the extra precision costs nothing.
            return torch.linalg.matrix_exp(skew.double()).to(skew.dtype)
        return self.dense.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """R x along the last dimension."""
        matrix = self.matrix().to(x.dtype)
        if self.kind == RotationKind.SO8:
            blocks = x.unflatten(-1, (self.hidden_size // 8, 8))
            return torch.einsum("...bj,bij->...bi", blocks, matrix).flatten(-2)
        return x @ matrix.T

    def orthogonality_loss(self) -> torch.Tensor:
        """||R^T R - I||_F^2 (summed over blocks for so8)."""
        matrix = self.matrix()
        eye = torch.eye(matrix.shape[-1], dtype=matrix.dtype, device=matrix.device)
        return ((matrix.transpose(-1, -2) @ matrix - eye) ** 2).sum()

    @torch.no_grad()
    def load_matrix(self, matrix: torch.Tensor) -> None:
        """Set R from a materialised rotation (the inverse of :meth:`matrix`)."""
        if self.kind == RotationKind.SO8:
            # A skew-symmetric logarithm: A = log(R)/2 gives exp(A - A^T) = R for R in SO(8).
            log = _so_log(matrix.double())
            self.generator.copy_((log / 2).to(self.generator.dtype))
        else:
            self.dense.weight = matrix.to(self.dense.weight.dtype)


def _so_log(blocks: torch.Tensor) -> torch.Tensor:
    """Real logarithm of rotation matrices via eigendecomposition (R is normal)."""
    eigvals, eigvecs = torch.linalg.eig(blocks)
    log = eigvecs @ torch.diag_embed(torch.log(eigvals)) @ torch.linalg.inv(eigvecs)
    log = log.real
    return (log - log.transpose(-1, -2)) / 2


def rotation_errors(matrix: torch.Tensor) -> tuple[float, float]:
    """(max |R^T R - I|, min det) of a materialised rotation, in float64."""
    matrix = matrix.double()
    eye = torch.eye(matrix.shape[-1], dtype=matrix.dtype)
    ortho = (matrix.transpose(-1, -2) @ matrix - eye).abs().max().item()
    det = torch.linalg.det(matrix).min().item()
    return ortho, det


def dense_rotation(matrix: torch.Tensor) -> torch.Tensor:
    """A (D, D) matrix of a materialised rotation (block-diagonal for so8)."""
    if matrix.dim() == 3:
        return torch.block_diag(*matrix)
    return matrix


class Soul(nn.Module):
    """m = f + sigmoid(alpha) R f. alpha follows the schedule: a buffer, set, never learned."""

    def __init__(self, hidden_size: int, kind: str = RotationKind.SO8, alpha: float = -5.0):
        super().__init__()
        self.rotation = Rotation(hidden_size, kind)
        self.register_buffer("alpha", torch.tensor(float(alpha)))

    @property
    def gate(self) -> torch.Tensor:
        return torch.sigmoid(self.alpha)

    def set_alpha(self, alpha: float) -> None:
        self.alpha.fill_(float(alpha))

    def forward(self, f: torch.Tensor) -> torch.Tensor:
        return f + self.gate.to(f.dtype) * self.rotation(f)

    @torch.no_grad()
    def folded_lm_head(self, lm_weight: torch.Tensor) -> torch.Tensor:
        """W' = W (I + sigmoid(alpha) R), computed in float32 without forming the DxD matrix."""
        return fold_lm_head(lm_weight, self.rotation.matrix().float(), float(self.gate))


def fold_lm_head(lm_weight: torch.Tensor, rotation: torch.Tensor, gate: float) -> torch.Tensor:
    """W' = W (I + gate * R) for a (V, D) lm_head weight and a materialised rotation.

    ``rotation`` is (D/8, 8, 8) blocks (so8) or (D, D) (dense). Streams over the vocabulary in
    blocks of rows, so the temporaries stay a few MB next to W and W' (the converter's peak
    memory budget counts on it).
    """
    weight = lm_weight.float()
    out = torch.empty_like(weight)
    chunk = 1024
    for start in range(0, weight.shape[0], chunk):
        rows = weight[start : start + chunk]
        if rotation.dim() == 3:
            blocks = rows.unflatten(-1, (rotation.shape[0], 8))
            rotated = torch.einsum("vbi,bij->vbj", blocks, rotation.float()).flatten(-2)
        else:
            rotated = rows @ rotation.float()
        out[start : start + chunk] = rows + gate * rotated
    return out


# --------------------------------------------------------------------------------------------
# Omega: recurrences and router
# --------------------------------------------------------------------------------------------


@dataclass
class OmegaState:
    """What a sequence carries from one token to the next: phase, last h, origin signature."""

    phase: torch.Tensor  # (B, D) phi_{t-1}
    last_hidden: Optional[torch.Tensor]  # (B, D) h_{t-1}; None before the first token
    origin: torch.Tensor  # (B, D) signature s

    @classmethod
    def fresh(cls, batch: int, hidden_size: int, origin: Optional[torch.Tensor] = None,
              device=None, dtype=torch.float32) -> "OmegaState":
        zeros = torch.zeros(batch, hidden_size, device=device, dtype=dtype)
        if origin is None:
            origin = zeros.clone()
        elif origin.dim() == 1:
            origin = origin.expand(batch, -1)
        return cls(phase=zeros, last_hidden=None, origin=origin.to(device=device, dtype=dtype))


def omega_recurrences(hidden: torch.Tensor, state: OmegaState, decay: float
                      ) -> tuple[torch.Tensor, torch.Tensor, OmegaState]:
    """phi and delta for every position of ``hidden`` (B, T, D), continuing ``state``.

    One implementation serves a whole sequence (T tokens at once) and token-by-token generation
    (T = 1 per call with the returned state): the arithmetic per step is identical, so both give
    bit-identical results.
    """
    phases, deltas = [], []
    phase, last = state.phase, state.last_hidden
    for t in range(hidden.shape[1]):
        h = hidden[:, t]
        phase = decay * phase + (1.0 - decay) * h
        deltas.append(torch.zeros_like(h) if last is None else h - last)
        phases.append(phase)
        last = h
    new_state = OmegaState(phase=phase, last_hidden=last, origin=state.origin)
    return torch.stack(phases, 1), torch.stack(deltas, 1), new_state


# Router layers each routing mode leaves unused (they stay in the state dict, untrained).
UNUSED_BY_ROUTING: dict[str, tuple[str, ...]] = {
    RoutingKind.THRESHOLD: ("resonance_linear", "resonance_sin"),
    RoutingKind.RESONANCE: ("boundary", "router_depth", "router_phase"),
}


def unused_router_parameters(router: "OmegaRouter") -> list[nn.Parameter]:
    """The parameters the router's routing mode never uses."""
    return [param for prefix in UNUSED_BY_ROUTING[router.config.routing]
            for param in getattr(router, prefix).parameters()]


class OmegaRouter(nn.Module):
    """Omega router of seed 001 (threshold mode) and seed 000's resonance mode."""

    def __init__(self, hidden_size: int, config: OmegaConfig):
        super().__init__()
        d = hidden_size
        self.config = config
        self.phase = nn.Linear(d, d)
        self.origin = nn.Linear(d, d)
        self.depth = nn.Linear(d, d)
        self.boundary = nn.Linear(3 * d, 1)
        self.router_depth = nn.Linear(3 * d, 1)
        self.router_phase = nn.Linear(3 * d, 1)
        # Cluster transforms W_k, b_k stacked in CLUSTERS order.
        self.experts_weight = nn.Parameter(torch.empty(len(CLUSTERS), d, d))
        self.experts_bias = nn.Parameter(torch.zeros(len(CLUSTERS), d))
        nn.init.normal_(self.experts_weight, std=d ** -0.5)
        # Resonance mode: pi = softmax(U1 z + sin(U2 z) + c).
        self.resonance_linear = nn.Linear(3 * d, len(CLUSTERS))
        self.resonance_sin = nn.Linear(3 * d, len(CLUSTERS), bias=False)
        self.gate = nn.Parameter(torch.tensor(float(config.gate_init)))  # omega

    def scores(self, hidden: torch.Tensor, phase: torch.Tensor, delta: torch.Tensor,
               origin: torch.Tensor) -> torch.Tensor:
        """z_t for every position: concat(h, p, d), (B, T, 3D)."""
        origin_term = self.config.origin_scale * self.origin(origin).unsqueeze(1)
        p = torch.tanh(self.phase(phase) + origin_term)
        d = self.depth(delta)
        return torch.cat([hidden, p, d], dim=-1)

    def forward(self, hidden: torch.Tensor, phase: torch.Tensor, delta: torch.Tensor,
                origin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(o_t, route index) for every position; o_t is (B, T, D), routes (B, T) int64."""
        z = self.scores(hidden, phase, delta, origin)
        # All four cluster outputs: (B, T, 4, D). D is small next to the vocabulary; computing
        # all four keeps the function branch-free and identical in training and inference.
        clusters = torch.tanh(torch.einsum("btd,ked->btke", hidden, self.experts_weight)
                              + self.experts_bias)
        if self.config.routing == RoutingKind.RESONANCE:
            weights = torch.softmax(self.resonance_linear(z) + torch.sin(self.resonance_sin(z)), -1)
            routes = weights.argmax(-1)
            return (weights.unsqueeze(-1) * clusters).sum(-2), routes
        b = torch.sigmoid(self.boundary(z)).squeeze(-1)
        r_depth = torch.sigmoid(self.router_depth(z)).squeeze(-1)
        r_phase = torch.sigmoid(self.router_phase(z)).squeeze(-1)
        routes = threshold_routes(b, r_depth, r_phase, self.config)
        gates = torch.stack([b, r_depth, r_phase, torch.ones_like(b)], -1)
        gate = gates.gather(-1, routes.unsqueeze(-1))
        chosen = clusters.gather(-2, routes[..., None, None].expand(*routes.shape, 1,
                                                                    clusters.shape[-1]))
        return gate * chosen.squeeze(-2), routes


def threshold_routes(b: torch.Tensor, r_depth: torch.Tensor, r_phase: torch.Tensor,
                     config: OmegaConfig) -> torch.Tensor:
    """BOUNDARY if b > tb, else DEPTH if r_depth > td, else PHASE if r_phase > tp, else BASE."""
    routes = torch.full_like(b, BASE, dtype=torch.long)
    routes = torch.where(r_phase > config.phase_threshold, PHASE, routes)
    routes = torch.where(r_depth > config.depth_threshold, DEPTH, routes)
    return torch.where(b > config.boundary_threshold, BOUNDARY, routes)


class ZptrHead(nn.Module):
    """Soul + Omega on top of final normalised hidden states."""

    def __init__(self, config: ZptrConfig):
        super().__init__()
        self.config = config
        self.soul = Soul(config.hidden_size, config.rotation, config.schedule.start)
        self.omega = OmegaRouter(config.hidden_size, config.omega) if config.omega.enabled else None

    def omega_residual(self, hidden: torch.Tensor, state: OmegaState
                       ) -> tuple[torch.Tensor, torch.Tensor, OmegaState]:
        """f_t = h_t + sigmoid(omega) o_t with routes and the carried state."""
        phase, delta, new_state = omega_recurrences(hidden, state, self.config.omega.phase_decay)
        if self.omega is None:
            routes = torch.full(hidden.shape[:2], BASE, dtype=torch.long, device=hidden.device)
            return hidden, routes, new_state
        dtype = self.omega.phase.weight.dtype
        o, routes = self.omega(hidden.to(dtype), phase.to(dtype), delta.to(dtype),
                               new_state.origin.to(dtype))
        f = hidden + torch.sigmoid(self.omega.gate).to(hidden.dtype) * o.to(hidden.dtype)
        return f, routes, new_state

    def orthogonality_loss(self) -> torch.Tensor:
        return self.soul.rotation.orthogonality_loss()


__all__ = [
    "BOUNDARY", "DEPTH", "PHASE", "BASE", "Rotation", "Soul", "OmegaState", "OmegaRouter",
    "ZptrHead", "omega_recurrences", "threshold_routes", "fold_lm_head", "rotation_errors",
    "dense_rotation", "unused_router_parameters",
]
