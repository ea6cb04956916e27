"""The Omega sidecar: a small GGUF next to the model holding the Omega router.

llama.cpp refuses unknown tensors inside a model file, so the nonlinear Omega router travels in
``<model>.omega.gguf`` (architecture ``zptr-omega``). It carries the router tensors in float32
(names as in a checkpoint: ``omega.phase.weight`` ...), the routing configuration, the hidden
size, and the file name and sha256 of the model it pairs with, so the runtime can refuse a
sidecar that belongs to another model.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import gguf
import numpy as np

from ..config import OmegaConfig
from ..errors import SidecarError, ZptrError
from ..fileio import atomic_file, check_file, sha256_file
from ..tensor_names import Tensors
from .gguf import field_value, open_gguf
from .keys import Keys

SIDECAR_ARCH = "zptr-omega"
SIDECAR_SUFFIX = ".omega.gguf"
SIDECAR_FORMAT_VERSION = 1
# OmegaConfig fields stored as float32 keys (gate_init is training-only; the learned gate
# omega.gate is stored as a key and as a tensor).
_FLOAT_KEYS = {"boundary_threshold": Keys.Omega.BOUNDARY_THRESHOLD,
               "depth_threshold": Keys.Omega.DEPTH_THRESHOLD,
               "phase_threshold": Keys.Omega.PHASE_THRESHOLD,
               "origin_scale": Keys.Omega.ORIGIN_SCALE, "phase_decay": Keys.Omega.PHASE_DECAY}


@dataclass
class Sidecar:
    path: Path
    config: OmegaConfig
    hidden_size: int
    tensors: dict[str, np.ndarray]
    model_sha256: str
    model_file: str
    format_version: int = SIDECAR_FORMAT_VERSION

    @property
    def gate(self) -> float:
        """omega, the logit of the residual gate sigma(omega)."""
        return float(self.tensors[Tensors.OMEGA_GATE])


def sidecar_path_for(model_path: Path) -> Path:
    """``X.gguf`` -> ``X.omega.gguf``."""
    model_path = Path(model_path)
    stem = model_path.name[:-len(".gguf")] if model_path.name.endswith(".gguf") else model_path.name
    return model_path.with_name(stem + SIDECAR_SUFFIX)


def write_sidecar(path: Path, omega_tensors: dict[str, Any], omega: OmegaConfig, hidden_size: int,
                  model_path: Path, model_name: Optional[str] = None) -> Path:
    """Write the sidecar of the model at ``model_path`` (its sha256 is recorded) atomically.

    ``model_name`` is the file name recorded for the model when ``model_path`` is a temporary
    that will be renamed (a conversion's outputs are committed together).
    """
    path, model_path = Path(path), Path(model_path)
    if Tensors.OMEGA_GATE not in omega_tensors:
        raise SidecarError(f"omega tensors lack {Tensors.OMEGA_GATE}: nothing to write a sidecar for")
    arrays = {name: _float32_array(value) for name, value in omega_tensors.items()}
    for name, value in arrays.items():
        if not np.isfinite(value).all():
            raise SidecarError(f"omega tensor {name} contains NaN or Inf")
    scalars = sorted(name for name, value in arrays.items() if value.ndim == 0)

    with atomic_file(path) as tmp:
        writer = gguf.GGUFWriter(str(tmp), SIDECAR_ARCH)
        try:
            writer.add_uint32(Keys.Omega.FORMAT_VERSION, SIDECAR_FORMAT_VERSION)
            writer.add_uint32(Keys.Omega.HIDDEN_SIZE, int(hidden_size))
            writer.add_string(Keys.Omega.ROUTING, omega.routing)
            for name, key in _FLOAT_KEYS.items():
                writer.add_float32(key, float(getattr(omega, name)))
            writer.add_float32(Keys.Omega.GATE, float(arrays[Tensors.OMEGA_GATE]))
            writer.add_string(Keys.Omega.MODEL_FILE, model_name or model_path.name)
            writer.add_string(Keys.Omega.MODEL_SHA256, sha256_file(model_path))
            if scalars:
                writer.add_array(Keys.Omega.SCALAR_TENSORS, scalars)
            for name, value in arrays.items():
                writer.add_tensor(name, value.reshape(1) if value.ndim == 0 else value)
            writer.write_header_to_file()
            writer.write_kv_data_to_file()
            writer.write_tensors_to_file()
        finally:
            writer.close()
    return path


def _float32_array(value: Any) -> np.ndarray:
    """A C-ordered float32 copy of a torch tensor (any device or dtype) or of an array, without
    importing torch: the NumPy runtime and ``zptr inspect`` read sidecars and never need it."""
    if hasattr(value, "detach"):
        value = value.detach().float().cpu().numpy()
    return np.array(value, dtype=np.float32, order="C")


def _required(reader, key: str, path: Path, kind: type) -> Any:
    value = field_value(reader, key)
    if value is None:
        raise SidecarError(f"{path}: sidecar key {key} missing")
    if kind is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if not isinstance(value, kind) or isinstance(value, bool) != (kind is bool):
        raise SidecarError(f"{path}: sidecar key {key} must be {kind.__name__}, got {value!r}")
    return value


def read_sidecar(path: Path) -> Sidecar:
    """Read and validate a sidecar; any defect raises :class:`SidecarError` naming it."""
    path = check_file(path, SidecarError, "Omega sidecar not found", "an Omega sidecar")
    try:
        reader = open_gguf(path, "Omega sidecar")
    except ZptrError as err:
        raise SidecarError(str(err)) from None
    arch = field_value(reader, gguf.Keys.General.ARCHITECTURE)
    if arch != SIDECAR_ARCH:
        raise SidecarError(f"{path}: GGUF architecture is {arch!r}, not an Omega sidecar "
                           f"({SIDECAR_ARCH!r})")
    version = _required(reader, Keys.Omega.FORMAT_VERSION, path, int)
    if version != SIDECAR_FORMAT_VERSION:
        raise SidecarError(f"{path}: sidecar format_version {version}, this version reads "
                           f"{SIDECAR_FORMAT_VERSION}")
    hidden = _required(reader, Keys.Omega.HIDDEN_SIZE, path, int)
    values = {name: _required(reader, key, path, float) for name, key in _FLOAT_KEYS.items()}
    try:
        config = OmegaConfig(routing=_required(reader, Keys.Omega.ROUTING, path, str), **values)
    except ZptrError as err:
        raise SidecarError(f"{path}: {err}") from None
    scalars = set(field_value(reader, Keys.Omega.SCALAR_TENSORS, []))

    tensors: dict[str, np.ndarray] = {}
    for tensor in reader.tensors:
        if tensor.tensor_type != gguf.GGMLQuantizationType.F32:
            raise SidecarError(f"{path}: tensor {tensor.name} is {tensor.tensor_type.name}, "
                               f"expected F32")
        expected = tuple(int(n) for n in reversed(tensor.shape))
        data = np.array(tensor.data, dtype=np.float32)
        if data.size != int(np.prod(expected)):
            raise SidecarError(f"{path}: tensor {tensor.name} is truncated")
        data = data.reshape(expected)
        tensors[tensor.name] = data.reshape(()) if tensor.name in scalars else data
    _validate_tensors(tensors, hidden, path)
    config.gate_init = float(tensors[Tensors.OMEGA_GATE])
    return Sidecar(path=path, config=config, hidden_size=hidden, tensors=tensors,
                   model_sha256=_required(reader, Keys.Omega.MODEL_SHA256, path, str),
                   model_file=_required(reader, Keys.Omega.MODEL_FILE, path, str),
                   format_version=version)


def expected_shapes(hidden_size: int) -> dict[str, tuple[int, ...]]:
    """The router tensors the runtime needs and their shapes (cluster count 4)."""
    d = hidden_size
    return {Tensors.omega(name): shape for name, shape in {
        "gate": (),
        "phase.weight": (d, d), "phase.bias": (d,),
        "origin.weight": (d, d), "origin.bias": (d,),
        "depth.weight": (d, d), "depth.bias": (d,),
        "boundary.weight": (1, 3 * d), "boundary.bias": (1,),
        "router_depth.weight": (1, 3 * d), "router_depth.bias": (1,),
        "router_phase.weight": (1, 3 * d), "router_phase.bias": (1,),
        "experts_weight": (4, d, d), "experts_bias": (4, d),
        "resonance_linear.weight": (4, 3 * d), "resonance_linear.bias": (4,),
        "resonance_sin.weight": (4, 3 * d),
    }.items()}


def _validate_tensors(tensors: dict[str, np.ndarray], hidden: int, path: Path) -> None:
    for name, shape in expected_shapes(hidden).items():
        if name not in tensors:
            raise SidecarError(f"{path}: tensor {name} missing")
        if tensors[name].shape != shape:
            raise SidecarError(f"{path}: tensor {name} has shape {tensors[name].shape}, expected "
                               f"{shape} for hidden size {hidden}")
        if not np.isfinite(tensors[name]).all():
            raise SidecarError(f"{path}: tensor {name} contains NaN or Inf")


def check_pairing(sidecar: Sidecar, model_path: Path, hidden_size: int) -> None:
    """Refuse a sidecar written for another model (sha256) or another hidden size."""
    model_path = Path(model_path)
    if sidecar.hidden_size != hidden_size:
        raise SidecarError(
            f"{sidecar.path}: Omega sidecar has hidden size {sidecar.hidden_size}, the model "
            f"{model_path.name} has {hidden_size}")
    digest = sha256_file(model_path)
    if digest != sidecar.model_sha256:
        raise SidecarError(
            f"{sidecar.path}: Omega sidecar pairs with {sidecar.model_file} "
            f"(sha256 {sidecar.model_sha256[:12]}...), not with {model_path.name} "
            f"(sha256 {digest[:12]}...): sha256 mismatch")


__all__ = ["Sidecar", "SidecarError", "SIDECAR_ARCH", "check_pairing", "expected_shapes",
           "read_sidecar", "sidecar_path_for", "write_sidecar"]
