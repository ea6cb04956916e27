"""The ``zptr`` command: one entry point, one module per subcommand.

Each subcommand lives in its own module exposing ``add_arguments(parser)`` and
``main(args) -> int``; this table is the whole wiring.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from typing import Optional, Sequence

from .errors import ZptrError

SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "train": ("zptr.train", "fine-tune a base model with LoRA + soul + Omega"),
    "convert": ("convert.cli", "checkpoint or HF model -> GGUF (soul folded) + Omega sidecar"),
    "quantize": ("convert.quantize", "re-quantize a GGUF to any llama.cpp type"),
    "run": ("runtime.cli", "generate with a GGUF on llama.cpp, Omega routing on top"),
    "bench": ("runtime.bench", "tokens/s and quality: PyTorch path vs llama.cpp path"),
    "inspect": ("zptr.inspect", "describe a checkpoint or a GGUF file"),
    "demo": ("zptr.demo", "the whole pipeline on the bundled SmolLM2-135M"),
}


def _load(module_name: str):
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as err:
        if err.name == module_name:
            return None
        raise


def build_parser(command: Optional[str] = None) -> argparse.ArgumentParser:
    """The parser; only the chosen subcommand's module is imported (keeps startup fast and one
    broken subcommand from taking the others down)."""
    parser = argparse.ArgumentParser(prog="zptr", description="Soul-injected language models on llama.cpp")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name, (module_name, help_text) in SUBCOMMANDS.items():
        sub_parser = sub.add_parser(name, help=help_text, description=help_text)
        if name != command:
            continue
        module = _load(module_name)
        if module is not None:
            module.add_arguments(sub_parser)
        sub_parser.set_defaults(_module=module)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = next((arg for arg in argv if not arg.startswith("-")), None)
    if command in SUBCOMMANDS and _load(SUBCOMMANDS[command][0]) is None:
        print(f"zptr {command}: not built yet", file=sys.stderr)
        return 2
    args = build_parser(command).parse_args(argv)
    try:
        return int(args._module.main(args) or 0)
    except (ZptrError, FileExistsError) as err:
        if os.environ.get("ZPTR_DEBUG"):
            raise
        print(f"zptr {args.command}: error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"zptr {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
