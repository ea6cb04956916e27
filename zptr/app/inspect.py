"""``zptr inspect FILE``: describe a ZPTR checkpoint, a seed-format directory or a GGUF file."""

from __future__ import annotations

import argparse
import collections
import json
from pathlib import Path
from typing import Any

import gguf

from ..config import phase_status, sigmoid
from ..errors import SidecarError, ZptrError
from ..formats.gguf import arch_value, architecture, check_model, field_value, open_gguf, zptr_metadata
from ..formats.keys import Keys
from ..formats.sidecar import SIDECAR_ARCH, check_pairing, read_sidecar, sidecar_path_for


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("path", help="checkpoint directory or .gguf file")
    parser.add_argument("--json", action="store_true", help="print machine-readable JSON")


def describe_checkpoint(path: Path) -> dict[str, Any]:
    from ..checkpoint import load_checkpoint  # torch: only a checkpoint needs it, a GGUF does not

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
        omega.update(gate=ckpt.omega_gate, sigmoid_gate=sigmoid(ckpt.omega_gate))
        info["omega"] = omega
    else:
        info["omega"] = None
    info["files_verified"] = {name: digest[:16] for name, digest in ckpt.files.items()}
    return info


def _sidecar_status(path: Path, hidden_size: int) -> dict[str, Any]:
    sidecar = sidecar_path_for(path)
    if not sidecar.exists():
        return {"path": None, "paired": False, "reason": "no sidecar next to the model"}
    try:
        check_pairing(read_sidecar(sidecar), path, hidden_size)
    except SidecarError as err:
        return {"path": str(sidecar), "paired": False, "reason": str(err)}
    return {"path": str(sidecar), "paired": True}


def _file_type_name(value: Any) -> Any:
    try:
        return gguf.LlamaFileType(int(value)).name
    except (TypeError, ValueError):
        return value


def describe_sidecar(path: Path) -> dict[str, Any]:
    sidecar = read_sidecar(path)
    model = path.with_name(sidecar.model_file)
    info = {"kind": "Omega sidecar", "path": str(path), "hidden_size": sidecar.hidden_size,
            "routing": sidecar.config.routing, "gate": sidecar.gate, "model_file": sidecar.model_file}
    try:
        check_pairing(sidecar, model, sidecar.hidden_size)
        info["paired"] = True
    except (SidecarError, FileNotFoundError) as err:
        info["paired"], info["reason"] = False, str(err)
    return info


def describe_gguf(path: Path) -> dict[str, Any]:
    """Architecture, size, tensor types, zptr metadata, phase status and sidecar pairing."""
    path = Path(path)
    reader = open_gguf(path)
    if architecture(reader) == SIDECAR_ARCH:
        return describe_sidecar(path)
    check_model(reader, path)  # what llama.cpp would refuse is not reported as a model
    types = collections.Counter(t.tensor_type.name for t in reader.tensors)
    hidden = int(arch_value(reader, gguf.Keys.LLM.EMBEDDING_LENGTH, 0))
    info: dict[str, Any] = {
        "kind": "GGUF model",
        "path": str(path),
        "architecture": architecture(reader),
        "name": field_value(reader, gguf.Keys.General.NAME),
        "file_type": _file_type_name(field_value(reader, gguf.Keys.General.FILE_TYPE)),
        "size_mb": round(path.stat().st_size / 1e6, 2),
        "tensors": len(reader.tensors),
        "tensor_types": dict(types),
        "hidden_size": hidden,
        "context_length": arch_value(reader, gguf.Keys.LLM.CONTEXT_LENGTH),
        "tokenizer": field_value(reader, gguf.Keys.Tokenizer.MODEL),
        "pre_tokenizer": field_value(reader, gguf.Keys.Tokenizer.PRE),
        "chat_template": field_value(reader, gguf.Keys.Tokenizer.CHAT_TEMPLATE) is not None,
    }
    zptr = zptr_metadata(reader)
    info["zptr"] = zptr or None
    alpha = field_value(reader, Keys.Soul.ALPHA)
    if alpha is not None:
        info["phase"] = phase_status(float(alpha))
    info["sidecar"] = _sidecar_status(path, hidden)
    return info


def describe(path: Path) -> dict[str, Any]:
    path = Path(path)
    if not path.exists():
        raise ZptrError(f"{path}: no such file or directory")
    return describe_gguf(path) if path.is_file() else describe_checkpoint(path)


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
