"""The flag convention shared by every subcommand (README: "Flags").

* Where a subcommand mirrors a llama.cpp tool, it takes that tool's short flags: ``run`` ~
  llama-cli (``-p`` prompt, ``-n`` tokens to predict, ``-c``, ``-t``, ``-ngl``, ``-s``), ``bench``
  ~ llama-bench (``-m`` model, ``-p`` / ``-n`` prompt and generation lengths, ``-r``), ``quantize``
  ~ llama-quantize (positional IN OUT TYPE), ``convert`` ~ convert_hf_to_gguf.py
  (``--outfile``, ``--outtype``).
* Everywhere else one name means one thing: ``--output-dir DIR`` a directory of outputs,
  ``-o/--output FILE`` one output file, ``-t/--threads N`` threads (default: every core),
  ``--overwrite`` replace existing outputs, ``--no-progress`` no progress bars, ``-v/--verbose``
  llama.cpp's log lines in full.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import typing
from typing import Any, Optional

from ..choices import OMEGA_MODES, OmegaMode
from ..errors import ConfigError


def cores() -> int:
    return os.cpu_count() or 1


def threads(value: Optional[int]) -> int:
    """A thread count: None is every core; otherwise 1 .. 4 x cores (more only thrashes, and
    llama.cpp's thread pool aborts far above that)."""
    if value is None:
        return cores()
    if not 1 <= value <= 4 * cores():
        raise ConfigError(f"-t/--threads must lie in 1..{4 * cores()} (4 x {cores()} cores), got {value}")
    return value


def add_threads(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-t", "--threads", type=int, default=None,
                        help=f"threads (default: every core, {cores()} here)")


def add_engine_arguments(parser: argparse.ArgumentParser, omega_help: str, origin_help: str) -> None:
    """The flags of a command that loads a GGUF on the runtime (``run``, ``serve``), llama.cpp's
    names where it has one: ``--omega --sidecar --origin -c -t -ngl``."""
    parser.add_argument("--omega", choices=OMEGA_MODES, default=OmegaMode.AUTO.value, help=omega_help)
    parser.add_argument("--sidecar", default=None, help="Omega sidecar (default: X.omega.gguf)")
    parser.add_argument("--origin", default=None, help=origin_help)
    parser.add_argument("-c", "--ctx-size", type=int, default=2048, help="context size in tokens (default 2048)")
    add_threads(parser)
    parser.add_argument("-ngl", "--n-gpu-layers", type=int, default=0, help="layers offloaded to the GPU")


def engine_options(args: argparse.Namespace) -> dict[str, Any]:
    """``ZptrLlama``'s keyword arguments from the flags of :func:`add_engine_arguments`, checked."""
    if args.n_gpu_layers < -1:
        raise ConfigError(f"-ngl must be -1 (all) or more, got {args.n_gpu_layers}")
    n_threads = threads(args.threads)
    return dict(omega=args.omega, sidecar=args.sidecar, origin=args.origin, n_ctx=args.ctx_size,
                n_threads=n_threads, n_threads_batch=n_threads, n_gpu_layers=args.n_gpu_layers)


def add_overwrite(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--overwrite", action="store_true", help="replace existing outputs")


def add_progress(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--no-progress", dest="progress", action="store_false",
                        help="no progress bars")


def add_verbose(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="llama.cpp's log lines in full (default: one summary line per kind)")


def comma_list(value: str) -> list[str]:
    return [item.strip() for item in value.split(",") if item.strip()]


def add_dataclass_arguments(parser: argparse.ArgumentParser, cls: type, skip: tuple[str, ...] = ()) -> None:
    """One flag per field of a config dataclass: ``--field-name``, help and choices from the
    field's metadata, bools as switches (``--no-x`` for those that default to true). A flag not
    given leaves no attribute (the dataclass's default applies), so :func:`given_fields` can tell
    a default from a value the user typed (a resume keeps the run's own settings)."""
    hints = typing.get_type_hints(cls)
    for spec in dataclasses.fields(cls):
        if spec.name in skip:
            continue
        meta = dict(spec.metadata)
        flag = "--" + spec.name.replace("_", "-")
        kind = hints[spec.name]
        help_text = meta.get("help", "")
        if kind is bool:
            if spec.default:
                parser.add_argument("--no-" + spec.name.replace("_", "-"), dest=spec.name,
                                    action="store_false", default=argparse.SUPPRESS, help=f"no {help_text}")
            else:
                parser.add_argument(flag, action="store_true", default=argparse.SUPPRESS, help=help_text)
            continue
        options: dict[str, Any] = {"default": argparse.SUPPRESS, "dest": spec.name}
        base = [a for a in typing.get_args(kind) if a is not type(None)] or [kind]
        inner = base[0]
        if typing.get_origin(inner) is list:
            options["type"] = comma_list
        elif inner in (int, float):
            options["type"] = inner
        if "choices" in meta:
            options["choices"] = meta["choices"]
        if "metavar" in meta:
            options["metavar"] = meta["metavar"]
        default_note = "" if spec.default is None else f" (default {spec.default})"
        parser.add_argument(flag, help=help_text + default_note, **options)


def dataclass_from_args(cls: type, args: argparse.Namespace) -> Any:
    return cls(**{k: getattr(args, k) for k in given_fields(cls, args)})


def given_fields(cls: type, args: argparse.Namespace) -> frozenset[str]:
    """The fields of ``cls`` whose flag was on the command line."""
    return frozenset(f.name for f in dataclasses.fields(cls) if hasattr(args, f.name))
