"""``zptr inspect FILE``: describe a ZPTR checkpoint, a seed-format directory or a GGUF file."""

from __future__ import annotations

import argparse
import importlib
import json
from pathlib import Path
from typing import Any

from .checkpoint import load_checkpoint
from .errors import ZptrError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("path", help="checkpoint directory or .gguf file")
    parser.add_argument("--json", action="store_true", help="print machine-readable JSON")


def describe_checkpoint(path: Path) -> dict[str, Any]:
    ckpt = load_checkpoint(path)  # verifies every sha256 and the soul tensors
    config = ckpt.config
    info: dict[str, Any] = {
        "kind": "zptr checkpoint" if ckpt.format == "zptr" else "seed-format checkpoint (imported)",
        "path": str(ckpt.path),
        "base_model": ckpt.base_model,
        "architecture": ckpt.architecture,
        "hidden_size": config.hidden_size,
        "step": ckpt.step,
        "rotation": config.rotation,
        "alpha": round(ckpt.alpha, 6),
        "sigmoid_alpha": round(ckpt.gate, 6),
        "phase": ckpt.phase,
        "orthogonality_error": ckpt.orthogonality_error(),
        "schedule": config.to_dict()["schedule"],
        "lora_adapter": ckpt.adapter_dir is not None,
    }
    if config.omega.enabled and ckpt.omega_gate is not None:
        omega = config.to_dict()["omega"]
        omega.update(gate=ckpt.omega_gate, sigmoid_gate=1 / (1 + pow(2.718281828459045, -ckpt.omega_gate)))
        info["omega"] = omega
    else:
        info["omega"] = None
    info["files_verified"] = {name: digest[:16] for name, digest in ckpt.files.items()}
    return info


def describe(path: Path) -> dict[str, Any]:
    path = Path(path)
    if path.is_file():
        # GGUF files are the converter's domain; it provides the description.
        try:
            gguf_inspect = importlib.import_module("convert.inspect")
        except ModuleNotFoundError as err:
            raise ZptrError(f"{path}: GGUF inspection is not available ({err})") from err
        return gguf_inspect.describe_gguf(path)
    return describe_checkpoint(path)


def format_text(info: dict[str, Any], indent: int = 0) -> str:
    lines = []
    pad = " " * indent
    for key, value in info.items():
        if isinstance(value, dict):
            lines.append(f"{pad}{key}:")
            lines.append(format_text(value, indent + 2))
        elif isinstance(value, float):
            lines.append(f"{pad}{key}: {value:.6g}")
        else:
            lines.append(f"{pad}{key}: {value}")
    return "\n".join(lines)


def main(args: argparse.Namespace) -> int:
    info = describe(Path(args.path))
    print(json.dumps(info, indent=2) if args.json else format_text(info))
    return 0
