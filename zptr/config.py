"""Configuration of the ZPTR head: the soul (rotation + alpha gate) and the Omega router.

Every number the math uses lives here, is stored in checkpoints (``zptr_config.json``) and in GGUF
metadata, so a converted model and its runtime always agree with the training run.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

from .choices import RotationKind, RoutingKind
from .errors import ConfigError
from .jsonio import load_dataclass, require_keys

FORMAT_VERSION = 1

GOLDEN_RATIO = 1.618
# Cluster order is part of the format: index k of the stacked expert tensors is CLUSTERS[k].
CLUSTERS = ("BOUNDARY", "DEPTH", "PHASE", "BASE")


@dataclass
class AlphaSchedule:
    """alpha = start for ``warmup_steps``, then linear to ``target`` over ``annealing_steps``."""

    start: float = -5.0
    target: float = GOLDEN_RATIO
    warmup_steps: int = 50
    annealing_steps: int = 400

    def __post_init__(self) -> None:
        for name in ("start", "target"):
            if not math.isfinite(getattr(self, name)):
                raise ConfigError(f"schedule.{name} must be finite, got {getattr(self, name)}")
        for name in ("warmup_steps", "annealing_steps"):
            if getattr(self, name) < 0:
                raise ConfigError(f"schedule.{name} must not be negative, got {getattr(self, name)}")

    def alpha_at(self, step: int) -> float:
        if step <= self.warmup_steps:
            return self.start
        if self.annealing_steps <= 0:
            return self.target
        progress = min(1.0, (step - self.warmup_steps) / self.annealing_steps)
        return self.start + progress * (self.target - self.start)


def sigmoid(x: float) -> float:
    """The logistic function of a scalar gate logit (alpha, omega)."""
    return 0.5 * (1.0 + math.tanh(0.5 * x))  # no overflow for large |x|


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
    routing: str = RoutingKind.THRESHOLD.value
    boundary_threshold: float = 0.65
    depth_threshold: float = 0.55
    phase_threshold: float = 0.60
    origin_scale: float = 2.5
    phase_decay: float = 0.9
    gate_init: float = -5.0  # omega, the residual gate's logit: sigmoid(-5) ~ 0.0067

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        self.routing = RoutingKind.parse(self.routing, "omega routing", ConfigError)
        for name in ("boundary_threshold", "depth_threshold", "phase_threshold"):
            value = getattr(self, name)
            if not 0.0 < value < 1.0:
                raise ConfigError(f"omega {name} must lie in (0, 1), got {value}")
        if not 0.0 <= self.phase_decay < 1.0:
            raise ConfigError(f"omega phase_decay must lie in [0, 1), got {self.phase_decay}")
        for name in ("origin_scale", "gate_init"):
            if not math.isfinite(getattr(self, name)):
                raise ConfigError(f"omega {name} must be finite, got {getattr(self, name)}")


@dataclass
class ZptrConfig:
    hidden_size: int
    rotation: str = RotationKind.SO8.value
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
        self.rotation = RotationKind.parse(self.rotation, "rotation", ConfigError)
        if self.hidden_size <= 0:
            raise ConfigError(f"hidden_size must be positive, got {self.hidden_size}")
        if self.rotation == RotationKind.SO8 and self.hidden_size % 8 != 0:
            raise ConfigError(
                f"rotation 'so8' needs hidden_size divisible by 8, got {self.hidden_size} "
                f"({self.hidden_size} % 8 = {self.hidden_size % 8}); use --rotation dense"
            )
        self.omega.validate()

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Any, where: str = "zptr config", key: str = "",
                  complete: bool = False) -> "ZptrConfig":
        """From JSON data: every key type-checked, every value range-checked (errors name
        ``where`` and the key); with ``complete`` every key must be there (a checkpoint's)."""
        if complete:
            require_keys(cls, data, where, key)
        return load_dataclass(cls, data, where, key)
