"""Sampling settings, validated once for the CLI, the server and the Python API; stop strings.

Ranges (as llama.cpp's and OpenAI's): temperature >= 0 (0 is greedy), 0 < top_p <= 1,
0 <= min_p <= 1, top_k >= 0 (0: no limit), repeat_penalty > 0 (1: none), presence and frequency
penalties in [-2, 2], max_tokens >= 0, every logit bias finite, a seed in 0 .. 2^64 - 1. A value outside its range is a
:class:`~zptr.errors.ConfigError` naming the setting, never silently clamped.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Iterator, Optional, Sequence

from zptr.errors import ConfigError

# llama-cpp-python's repeat penalty looks back this many tokens (Llama(last_n_tokens_size=64)).
PENALTY_WINDOW = 64
# Seeds are unsigned 64-bit, folded into llama.cpp's 32-bit sampler seed: past this range the
# fold would wrap (2^64 would draw as 1) or, for a negative seed, never end.
MAX_SEED = 2**64 - 1


@dataclass
class SamplingSettings:
    max_tokens: int = 128
    temperature: float = 0.0
    top_k: int = 40
    top_p: float = 0.95
    min_p: float = 0.05
    repeat_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: Optional[int] = None
    stop: tuple[str, ...] = ()
    logit_bias: dict[int, float] = field(default_factory=dict)
    ignore_eos: bool = False  # generate max_tokens whatever the model says (benchmarks)

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        def number(name: str) -> float:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ConfigError(f"{name} must be a finite number, got {value!r}")
            return float(value)

        def integer(name: str) -> int:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise ConfigError(f"{name} must be an integer, got {value!r}")
            return value

        checks = (
            ("max_tokens", integer, lambda v: v >= 0, ">= 0"),
            ("temperature", number, lambda v: v >= 0, ">= 0 (0: greedy)"),
            ("top_k", integer, lambda v: v >= 0, ">= 0 (0: no limit)"),
            ("top_p", number, lambda v: 0 < v <= 1, "in (0, 1]"),
            ("min_p", number, lambda v: 0 <= v <= 1, "in [0, 1]"),
            ("repeat_penalty", number, lambda v: v > 0, "> 0 (1: none)"),
            ("presence_penalty", number, lambda v: -2 <= v <= 2, "in [-2, 2]"),
            ("frequency_penalty", number, lambda v: -2 <= v <= 2, "in [-2, 2]"),
        )
        for name, kind, ok, expected in checks:
            if not ok(kind(name)):
                raise ConfigError(f"{name} must be {expected}, got {getattr(self, name)!r}")
        if self.seed is not None and not 0 <= integer("seed") <= MAX_SEED:
            raise ConfigError(f"seed must lie in 0..{MAX_SEED} (omit it for a random seed), got {self.seed!r}")
        if not isinstance(self.ignore_eos, bool):
            raise ConfigError(f"ignore_eos must be true or false, got {self.ignore_eos!r}")
        if isinstance(self.stop, str):
            self.stop = (self.stop,)
        self.stop = tuple(self.stop)
        if not all(isinstance(s, str) and s for s in self.stop):
            raise ConfigError(f"stop must be non-empty strings, got {list(self.stop)!r}")
        clean: dict[int, float] = {}
        for token, bias in dict(self.logit_bias).items():
            try:
                token_id = int(token)
            except (TypeError, ValueError):
                raise ConfigError(f"logit_bias key {token!r} is not a token id") from None
            if isinstance(bias, bool) or not isinstance(bias, (int, float)) or not math.isfinite(bias):
                raise ConfigError(f"logit_bias of token {token_id} must be a finite number, got {bias!r}")
            clean[token_id] = float(bias)
        self.logit_bias = clean

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def penalized(self) -> bool:
        return (self.repeat_penalty != 1.0 or self.presence_penalty != 0.0
                or self.frequency_penalty != 0.0)

    def candidates(self) -> Optional[int]:
        """How many top tokens the sampler can draw from (after any bias), for Omega fast to
        certify: 1 greedy, top-k when sampling; None when unbounded (then fast computes exactly).
        Penalties run after Omega and (when not negative) only lower logits, of at most
        PENALTY_WINDOW tokens: the top k after them lies within the top k + PENALTY_WINDOW before
        them."""
        if self.presence_penalty < 0 or self.frequency_penalty < 0:
            return None  # a negative penalty raises tokens: any of them may climb into the top k
        if self.greedy:
            keep = 1
        elif self.top_k > 0:
            keep = self.top_k
        else:
            return None
        return keep + PENALTY_WINDOW if self.penalized else keep


class StopFilter:
    """Text pieces in, text out, cut at the first stop string: text that could still become a
    stop string is held back until it cannot."""

    def __init__(self, stops: Sequence[str]):
        self.stops = tuple(stops)
        self.pending = ""
        self.stopped = False

    def feed(self, piece: str) -> str:
        """The text that is safe to emit after ``piece``; sets :attr:`stopped` at a stop."""
        if not self.stops:
            return piece
        self.pending += piece
        cut = min((self.pending.find(s) for s in self.stops if s in self.pending), default=-1)
        if cut >= 0:
            self.stopped = True
            out, self.pending = self.pending[:cut], ""
            return out
        keep = max((k for s in self.stops for k in range(1, len(s)) if self.pending.endswith(s[:k])),
                   default=0)
        out = self.pending[: len(self.pending) - keep]
        self.pending = self.pending[len(out):]
        return out

    def flush(self) -> str:
        out, self.pending = self.pending, ""
        return out

    def filter(self, pieces: Iterator[str]) -> Iterator[str]:
        for piece in pieces:
            out = self.feed(piece)
            if out:
                yield out
            if self.stopped:
                return
        if self.pending:
            yield self.flush()
