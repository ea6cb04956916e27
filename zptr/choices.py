"""The closed sets of names the package passes around, one enum each; every layer may import it.

Members are strings (``OmegaMode.FAST == "fast"``): they go into JSON, flags and messages as
their value, and a name read from outside is turned into a member, and so checked, once, where
it enters (:meth:`Choice.parse`).
"""

from __future__ import annotations

from enum import Enum
from typing import Literal, TypeVar, get_args

from .errors import ZptrError

C = TypeVar("C", bound="Choice")


class Choice(str, Enum):
    """A closed set of names; a member prints, formats and quotes (``!r``) as its value, so
    messages read the same whether they hold a member or the name a user typed."""

    def __str__(self) -> str:
        return self.value

    __format__ = str.__format__
    __repr__ = str.__repr__

    @classmethod
    def values(cls) -> tuple[str, ...]:
        return tuple(member.value for member in cls)

    @classmethod
    def parse(cls: type[C], name: object, what: str, error: type[Exception] = ZptrError,
              allowed: tuple[str, ...] = ()) -> C:
        """The member named ``name`` (among ``allowed``, when given); ``error`` naming ``what``
        and the accepted names otherwise."""
        allowed = allowed or cls.values()
        if name not in allowed:
            raise error(f"{what} {name!r} is not one of {', '.join(allowed)}")
        return cls(name)


class OmegaMode(Choice):
    """How the runtime applies Omega: ``auto`` (fast with a sidecar, else off) when a model
    loads; a request asks for one of :data:`REQUEST_MODES`."""

    AUTO = "auto"
    OFF = "off"
    EXACT = "exact"
    FAST = "fast"


# What a model may load with, and what one request may ask for (never auto: the model decided).
OMEGA_MODES = OmegaMode.values()
RequestMode = Literal["off", "exact", "fast"]  # the server's request schema checks it
REQUEST_MODES: tuple[str, ...] = get_args(RequestMode)
# The modes a benchmark measures (its column order) and the ones ``zptr eval`` scores.
BENCH_MODES = (OmegaMode.OFF.value, OmegaMode.FAST.value, OmegaMode.EXACT.value)
EVAL_MODES = (OmegaMode.OFF.value, OmegaMode.EXACT.value)


class FinishReason(Choice):
    """Why a generation ended: an end-of-generation token or stop string, ``max_tokens``, a full
    context, or a cancelled request."""

    STOP = "stop"
    LENGTH = "length"
    CONTEXT = "context"
    CANCELLED = "cancelled"


class JobState(Choice):
    """A server job's life: made, queued for a slot, decoding, finished, or dropped while queued."""

    NEW = "new"
    WAITING = "waiting"
    RUNNING = "running"
    DONE = "done"
    DROPPED = "dropped"


class RoutingKind(Choice):
    """How the Omega router picks a cluster: hard thresholds (seed 001) or soft resonance weights."""

    THRESHOLD = "threshold"
    RESONANCE = "resonance"


class RotationKind(Choice):
    """The soul rotation: block-diagonal SO(8) blocks or one dense orthogonal matrix."""

    SO8 = "so8"
    DENSE = "dense"


__all__ = ["BENCH_MODES", "Choice", "EVAL_MODES", "FinishReason", "JobState", "OMEGA_MODES", "OmegaMode",
           "REQUEST_MODES", "RequestMode", "RotationKind", "RoutingKind"]
