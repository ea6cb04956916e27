"""Reading GGUF files back: validation, zptr metadata, and ``describe_gguf`` for ``zptr inspect``."""

from __future__ import annotations

import collections
from pathlib import Path
from typing import Any

import gguf

from zptr.config import phase_status

from .errors import ConvertError
from .sidecar import SIDECAR_ARCH, SidecarError, check_pairing, read_sidecar, sidecar_path_for

ZPTR_PREFIX = "zptr."


def open_gguf(path: Path) -> gguf.GGUFReader:
    """A reader over a complete GGUF file; truncated or non-GGUF files raise :class:`ConvertError`."""
    path = Path(path)
    if not path.is_file():
        raise ConvertError(f"{path}: no such GGUF file")
    with open(path, "rb") as handle:
        if handle.read(4) != b"GGUF":
            raise ConvertError(f"{path}: not a GGUF file (bad magic)")
    try:
        reader = gguf.GGUFReader(str(path))
    except Exception as err:  # the reader raises ValueError/IndexError/... on truncated files
        raise ConvertError(f"{path}: truncated or corrupt GGUF file ({type(err).__name__}: {err})") from err
    size = path.stat().st_size
    for tensor in reader.tensors:
        if tensor.data_offset + tensor.n_bytes > size:
            raise ConvertError(f"{path}: truncated GGUF file (tensor {tensor.name} runs past the end)")
    return reader


def field_value(reader: gguf.GGUFReader, key: str, default: Any = None) -> Any:
    found = reader.get_field(key)
    return default if found is None else found.contents()


def zptr_metadata(reader: gguf.GGUFReader) -> dict[str, Any]:
    """Every ``zptr.*`` key without the prefix."""
    return {key[len(ZPTR_PREFIX):]: found.contents() for key, found in reader.fields.items()
            if key.startswith(ZPTR_PREFIX)}


def _sidecar_status(path: Path, hidden_size: int) -> dict[str, Any]:
    sidecar = sidecar_path_for(path)
    if not sidecar.exists():
        return {"path": None, "paired": False, "reason": "no sidecar next to the model"}
    try:
        check_pairing(read_sidecar(sidecar), path, hidden_size)
    except SidecarError as err:
        return {"path": str(sidecar), "paired": False, "reason": str(err)}
    return {"path": str(sidecar), "paired": True}


def describe_gguf(path: Path) -> dict[str, Any]:
    """Architecture, size, tensor types, zptr metadata, phase status and sidecar pairing."""
    path = Path(path)
    reader = open_gguf(path)
    arch = field_value(reader, "general.architecture")
    if arch == SIDECAR_ARCH:
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
    types = collections.Counter(t.tensor_type.name for t in reader.tensors)
    hidden = int(field_value(reader, f"{arch}.embedding_length", 0))
    info: dict[str, Any] = {
        "kind": "GGUF model",
        "path": str(path),
        "architecture": arch,
        "name": field_value(reader, "general.name"),
        "file_type": _file_type_name(field_value(reader, "general.file_type")),
        "size_mb": round(path.stat().st_size / 1e6, 2),
        "tensors": len(reader.tensors),
        "tensor_types": dict(types),
        "hidden_size": hidden,
        "context_length": field_value(reader, f"{arch}.context_length"),
        "tokenizer": field_value(reader, "tokenizer.ggml.model"),
        "pre_tokenizer": field_value(reader, "tokenizer.ggml.pre"),
        "chat_template": field_value(reader, "tokenizer.chat_template") is not None,
    }
    zptr = zptr_metadata(reader)
    info["zptr"] = zptr or None
    if "soul.alpha" in zptr:
        info["phase"] = phase_status(float(zptr["soul.alpha"]))
    info["sidecar"] = _sidecar_status(path, hidden)
    return info


def _file_type_name(value: Any) -> Any:
    try:
        return gguf.LlamaFileType(int(value)).name
    except (TypeError, ValueError):
        return value
