"""The ``zptr`` command: one entry point, one module per subcommand.

Each subcommand lives in its own module of ``zptr.app`` exposing ``add_arguments(parser)`` and
``main(args) -> int``; this table is the whole wiring. Only the chosen subcommand's module is
imported, so ``zptr inspect`` does not pay for torch and llama.cpp.

Errors: a :class:`~zptr.errors.ZptrError` becomes one line on stderr and its exit code (1, or
74 for an output that cannot be written); an interrupt exits 128 + signal (130, 143) whenever it
comes, the subcommand's imports included; an ``OSError`` from the system (a disk that fills, a
file name too long) is one line with exit 74; anything else is a bug, reported in one line too
(exit 70) with ``ZPTR_DEBUG=1`` giving the traceback. No message is echoed longer than
:data:`MAX_MESSAGE` characters: an error quoting a huge input stays one readable line.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import signal
import sys
import warnings
from typing import Optional, Sequence

from ..errors import Interrupted, OutputError, ZptrError, error_summary
from . import args as common

SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "train": ("zptr.app.train", "fine-tune a base model with LoRA + soul + Omega"),
    "convert": ("zptr.app.convert", "checkpoint or HF model -> GGUF (soul folded) + Omega sidecar"),
    "quantize": ("zptr.app.quantize", "re-quantize a GGUF to any llama.cpp type"),
    "imatrix": ("zptr.app.imatrix", "importance matrix for llama.cpp's quantizer from calibration text"),
    "eval": ("zptr.app.eval", "perplexity and KL divergence of a GGUF against a base model"),
    "run": ("zptr.app.run", "generate with a GGUF on llama.cpp, Omega routing on top"),
    "serve": ("zptr.app.serve", "OpenAI-compatible HTTP server with Omega routing and a chat page"),
    "bench": ("zptr.app.bench", "tokens/s and quality: PyTorch path vs llama.cpp path"),
    "inspect": ("zptr.app.inspect", "describe a checkpoint or a GGUF file"),
    "demo": ("zptr.app.demo", "the whole pipeline on the bundled SmolLM2-135M"),
}
EXIT_BUG = 70  # EX_SOFTWARE
MAX_MESSAGE = 500  # characters of an error message shown; the rest is summarised


def build_parser(command: Optional[str] = None) -> argparse.ArgumentParser:
    """The parser; only the chosen subcommand's arguments are built (its module imported)."""
    parser = argparse.ArgumentParser(prog="zptr", description="Soul-injected language models on llama.cpp")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name, (module_name, help_text) in SUBCOMMANDS.items():
        sub_parser = sub.add_parser(name, help=help_text, description=help_text)
        if name != command:
            continue
        module = importlib.import_module(module_name)
        module.add_arguments(sub_parser)
        common.add_verbose(sub_parser)
        sub_parser.set_defaults(_module=module)
    return parser


def quiet_library_chatter(verbose: bool) -> None:
    """Silence two library messages that tell a ZPTR user nothing they can act on (``-v`` keeps
    them): bitsandbytes' CPU backend asks on import for the optional ``kernels`` package (a Hub
    download this tool never makes), and PEFT reads transformers' deprecated
    ``is_gradient_checkpointing`` on every model it wraps."""
    if verbose:
        return
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)


def _raise_interrupt(signum, frame) -> None:
    raise Interrupted(signum)


def clip(message: str, limit: int = MAX_MESSAGE) -> str:
    """The first line of ``message``, at most about ``limit`` characters of it: its start and its
    end (where the cause usually is), what lies between counted."""
    line = message.splitlines()[0] if message else ""
    if len(line) <= limit:
        return line
    head, tail = 2 * limit // 3, limit // 3
    return f"{line[:head]} ...({len(line) - head - tail} characters)... {line[-tail:]}"


def _report(prefix: str, err: BaseException) -> int:
    """One line on stderr for ``err`` and the exit code it gets."""
    if isinstance(err, Interrupted):
        print(f"{prefix}: {clip(str(err))}", file=sys.stderr)
        return err.exit_code
    if isinstance(err, KeyboardInterrupt):
        print(f"{prefix}: interrupted", file=sys.stderr)
        return 128 + signal.SIGINT
    if isinstance(err, ZptrError):
        print(f"{prefix}: error: {clip(str(err))}", file=sys.stderr)
        return err.exit_code
    if isinstance(err, OSError) and err.errno is not None:  # the system's refusal, not a bug
        where = f"{err.filename}: " if err.filename is not None else ""
        print(f"{prefix}: error: {clip(where + (err.strerror or str(err)))}", file=sys.stderr)
        return OutputError.exit_code
    print(f"{prefix}: internal error (a bug): {clip(error_summary(err, with_type=True))} "
          "(run with ZPTR_DEBUG=1 for the traceback)", file=sys.stderr)
    return EXIT_BUG


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = next((arg for arg in argv if not arg.startswith("-")), None)
    prefix = f"zptr {command}" if command in SUBCOMMANDS else "zptr"
    previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        # Installed before the subcommand's module is imported (torch takes a second or more):
        # both signals unwind through the finally blocks that remove temporary outputs.
        for signum in previous:
            signal.signal(signum, _raise_interrupt)
    except ValueError:  # not the main thread (an embedding application): leave its handlers
        previous = {}
    try:
        args = build_parser(command if command in SUBCOMMANDS else None).parse_args(argv)
        quiet_library_chatter(args.verbose)
        from ..native_log import native_log

        with native_log(verbose=args.verbose):
            return int(args._module.main(args) or 0)
    except (Exception, KeyboardInterrupt) as err:
        if os.environ.get("ZPTR_DEBUG"):
            raise
        return _report(prefix, err)
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


if __name__ == "__main__":
    sys.exit(main())
