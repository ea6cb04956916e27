"""Configuration of the ZPTR head: the soul (rotation + alpha gate) and the Omega router.

Every number the math uses lives here, is stored in checkpoints (``zptr_config.json``) and in GGUF
metadata, so a converted model and its runtime always agree with the training run.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from .errors import ZptrError

FORMAT_VERSION = 1

GOLDEN_RATIO = 1.618
ROTATION_KINDS = ("so8", "dense")
ROUTING_MODES = ("threshold", "resonance")
# Cluster order is part of the format: index k of the stacked expert tensors is CLUSTERS[k].
CLUSTERS = ("BOUNDARY", "DEPTH", "PHASE", "BASE")
SUPPORTED_ARCHITECTURES = ("llama", "phi3", "qwen2", "gemma3_text")


class ZptrConfigError(ZptrError, ValueError):
    """A configuration value is out of range or of the wrong kind."""


@dataclass
class AlphaSchedule:
    """alpha = start for ``warmup_steps``, then linear to ``target`` over ``annealing_steps``."""

    start: float = -5.0
    target: float = GOLDEN_RATIO
    warmup_steps: int = 50
    annealing_steps: int = 400

    def alpha_at(self, step: int) -> float:
        if step <= self.warmup_steps:
            return self.start
        if self.annealing_steps <= 0:
            return self.target
        progress = min(1.0, (step - self.warmup_steps) / self.annealing_steps)
        return self.start + progress * (self.target - self.start)


def phase_status(alpha: float, target: float = GOLDEN_RATIO) -> str:
    """``stable`` before annealing, ``golden`` at the target, ``transitioning`` in between."""
    if alpha <= -4.99:
        return "stable"
    if abs(alpha - target) < 1e-3:
        return "golden"
    return "transitioning"


@dataclass
class OmegaConfig:
    enabled: bool = True
    routing: str = "threshold"
    boundary_threshold: float = 0.65
    depth_threshold: float = 0.55
    phase_threshold: float = 0.60
    origin_scale: float = 2.5
    phase_decay: float = 0.9
    gate_init: float = -5.0  # omega, the residual gate's logit: sigmoid(-5) ~ 0.0067

    def validate(self) -> None:
        if self.routing not in ROUTING_MODES:
            raise ZptrConfigError(f"omega routing {self.routing!r} is not one of {ROUTING_MODES}")
        for name in ("boundary_threshold", "depth_threshold", "phase_threshold"):
            value = getattr(self, name)
            if not 0.0 < value < 1.0:
                raise ZptrConfigError(f"omega {name} must lie in (0, 1), got {value}")
        if not 0.0 <= self.phase_decay < 1.0:
            raise ZptrConfigError(f"omega phase_decay must lie in [0, 1), got {self.phase_decay}")


@dataclass
class ZptrConfig:
    hidden_size: int
    rotation: str = "so8"
    schedule: AlphaSchedule = field(default_factory=AlphaSchedule)
    omega: OmegaConfig = field(default_factory=OmegaConfig)
    orthogonality_weight: float = 0.1

    def __post_init__(self) -> None:
        if isinstance(self.schedule, dict):
            self.schedule = AlphaSchedule(**self.schedule)
        if isinstance(self.omega, dict):
            self.omega = OmegaConfig(**self.omega)
        self.validate()

    def validate(self) -> None:
        if self.rotation not in ROTATION_KINDS:
            raise ZptrConfigError(f"rotation {self.rotation!r} is not one of {ROTATION_KINDS}")
        if self.hidden_size <= 0:
            raise ZptrConfigError(f"hidden_size must be positive, got {self.hidden_size}")
        if self.rotation == "so8" and self.hidden_size % 8 != 0:
            raise ZptrConfigError(
                f"rotation 'so8' needs hidden_size divisible by 8, got {self.hidden_size} "
                f"({self.hidden_size} % 8 = {self.hidden_size % 8}); use --rotation dense"
            )
        self.omega.validate()

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ZptrConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ZptrConfigError(f"unknown zptr config keys: {sorted(unknown)}")
        return cls(**data)
