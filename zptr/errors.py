"""Every error ZPTR raises on bad input, in one place.

The CLI turns a :class:`ZptrError` into one line on stderr and a non-zero exit code; the
subclasses exist so that callers (and tests) can tell the families of problems apart.
"""

from __future__ import annotations

import signal
from typing import Optional


class ZptrError(Exception):
    """Bad input or state that a user can fix; the message names the problem."""

    exit_code = 1


class ConfigError(ZptrError, ValueError):
    """A configuration value (file or argument) is of the wrong type or out of range."""


class CheckpointError(ZptrError, ValueError):
    """A checkpoint is missing, corrupt, tampered with or inconsistent."""


class DatasetError(ZptrError, ValueError):
    """Training or calibration data is missing, empty or has a malformed line."""


class TrainError(ZptrError, ValueError):
    """A training setting or a resume source is unusable."""


class ConvertError(ZptrError, ValueError):
    """Converter input that cannot become a faithful GGUF: the message names file and problem."""


class SidecarError(ZptrError, ValueError):
    """An Omega sidecar is missing, corrupt, of another format, or pairs with another model."""


class ImatrixError(ZptrError, ValueError):
    """An importance-matrix file is unreadable, malformed, or does not fit the model."""


class ModelLoadError(ZptrError, RuntimeError):
    """A model file cannot be opened (missing, not GGUF, truncated, refused by llama.cpp)."""


class OmegaModeError(ZptrError, ValueError):
    """An Omega mode that cannot run (unknown name, or on without a sidecar)."""


class OutputExistsError(ZptrError, FileExistsError):
    """An output path exists and ``--overwrite`` was not given."""

    def __init__(self, path: object):
        super().__init__(f"{path} exists (pass --overwrite to replace it)")
        self.path = path


class OutputError(ZptrError, OSError):
    """An output cannot be written (disk full, read-only or forbidden directory); nothing of it
    was left behind. Exit code 74 (EX_IOERR): the input was fine, the place to write was not."""

    exit_code = 74


class Interrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM stopped the work; nothing partial was left behind.

    A ``KeyboardInterrupt`` (not an ``Exception``), so that no ``except Exception`` on the way
    out, ours or a library's, can take it for an error of its own. The exit code follows the
    shell convention 128 + signal number (130 for Ctrl-C, 143 for SIGTERM).
    """

    def __init__(self, signum: int, message: str = ""):
        name = signal.Signals(signum).name
        super().__init__(message or f"interrupted by {name}; no output was written")
        self.signum = signum
        self.exit_code = 128 + signum


def error_summary(err: BaseException, limit: Optional[int] = None, with_type: bool = False) -> str:
    """The first line of ``err``'s message (empty for an empty message), cut to ``limit``
    characters, after ``TypeName: `` when ``with_type``: how a one-line error quotes a library's
    multi-line exception."""
    lines = str(err).splitlines()
    line = (lines[0] if lines else "")[:limit]
    return f"{type(err).__name__}: {line}" if with_type else line
