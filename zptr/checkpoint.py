"""ZPTR checkpoints: save, load, verify; import of seed-format directories.

Layout of one checkpoint directory (no pickle anywhere)::

    adapter_config.json          PEFT, standard
    adapter_model.safetensors    PEFT, standard
    soul.safetensors             soul.alpha, soul.rotation (materialised), soul.generator (so8),
                                 omega.gate and omega.* router tensors
    zptr_config.json             format, base model, architecture, config, step, sha256 per file
    trainer_state/               optimizer, scheduler, RNG (written by the trainer)

Directories are written atomically: into a hidden temporary sibling, then renamed.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch
from safetensors.torch import load_file, save_file

from .choices import RotationKind
from .config import FORMAT_VERSION, ZptrConfig, phase_status, sigmoid
from .errors import CheckpointError, ConfigError, error_summary
from .families import family_of
from .fileio import atomic_directory, sha256_file
from .jsonio import JsonObject, read_json, read_object
from .head import Rotation, ZptrHead, rotation_errors
from .tensor_names import Tensors

CONFIG_FILE = "zptr_config.json"
SOUL_FILE = "soul.safetensors"
# PEFT's own file names (peft.utils.constants CONFIG_NAME, SAFETENSORS_WEIGHTS_NAME; a test
# checks they agree): not imported, because importing peft costs seconds and a bitsandbytes
# notice on stderr in commands that only read a checkpoint (convert, inspect).
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
SEED_SOUL_FILE = "soul.pt"
# Files conversion reads; the rest (trainer_state/, README.md) only matter for a resume.
CONVERSION_FILES = (SOUL_FILE, ADAPTER_CONFIG, ADAPTER_WEIGHTS)
FLOAT32_UNIT_ROUNDOFF = 2.0 ** -24
MAX_STEP = 2**32 - 1  # GGUF's zptr.source.step is a uint32


def orthogonality_tolerance(n: int) -> float:
    """How far from orthogonal (max |R^T R - I|) an n x n rotation materialised in float32 may be.

    Rounding R's entries alone moves R^T R by at most 2u (u = 2^-24, Cauchy-Schwarz over a row
    and a column of unit norm). But R is *computed* in float32: torch's orthogonal
    parametrisation forms base @ matrix_exp(A), a few n x n products of orthonormal factors, and
    each float32 product is off by at most about n*u per entry (Higham: |fl(AB) - AB| <= n*u |A||B|
    entrywise, and |A||B| <= 1 here). The errors measured on seed-style rotations moved as a few
    hundred training steps move them stay below 1.6*n*u for n = 576 ... 8192 (1.4e-4 at n = 3072;
    the figures are in the test suite's seed-soul test). 16*n*u leaves a tenfold margin and still
    refuses a matrix 1 % off a rotation (error 0.02) up to n = 20 000; the 1e-4 floor keeps small
    matrices (so8 blocks, n = 8) to the fixed bound they always had.
    """
    return max(1e-4, 16 * n * FLOAT32_UNIT_ROUNDOFF)


@dataclass
class Checkpoint:
    path: Path
    config: ZptrConfig
    tensors: dict[str, torch.Tensor]
    base_model: Optional[str] = None
    architecture: Optional[str] = None
    step: int = 0
    format: str = "zptr"  # or "seed"
    files: dict[str, str] = field(default_factory=dict)  # relative path -> sha256

    @property
    def adapter_dir(self) -> Optional[Path]:
        return self.path if (self.path / ADAPTER_CONFIG).exists() else None

    @property
    def alpha(self) -> float:
        return float(self.tensors[Tensors.SOUL_ALPHA])

    @property
    def gate(self) -> float:
        return sigmoid(self.alpha)

    @property
    def omega_gate(self) -> Optional[float]:
        return float(self.tensors[Tensors.OMEGA_GATE]) if Tensors.OMEGA_GATE in self.tensors else None

    @property
    def rotation(self) -> torch.Tensor:
        return self.tensors[Tensors.SOUL_ROTATION]

    @property
    def phase(self) -> str:
        return phase_status(self.alpha, self.config.schedule.target)

    def omega_tensors(self) -> dict[str, torch.Tensor]:
        return {k: v for k, v in self.tensors.items() if Tensors.is_omega(k)}

    def orthogonality_error(self) -> float:
        return rotation_errors(self.rotation)[0]


# ------------------------------------------------------------------------------ tensors <-> head


def head_tensors(head: ZptrHead) -> dict[str, torch.Tensor]:
    """The stored tensors of a head: materialised rotation plus everything trainable."""
    soul = head.soul
    tensors = {Tensors.SOUL_ALPHA: soul.alpha.detach().float().clone(),
               Tensors.SOUL_ROTATION: soul.rotation.matrix().detach().float().contiguous()}
    if soul.rotation.kind == RotationKind.SO8:
        tensors[Tensors.SOUL_GENERATOR] = soul.rotation.generator.detach().float().clone()
    if head.omega is not None:
        for name, value in head.omega.state_dict().items():
            tensors[Tensors.omega(name)] = value.detach().float().contiguous()
    return tensors


@torch.no_grad()
def load_head_tensors(head: ZptrHead, tensors: dict[str, torch.Tensor]) -> None:
    """Inverse of :func:`head_tensors`; the generator wins over the materialised rotation."""
    soul = head.soul
    soul.alpha.copy_(tensors[Tensors.SOUL_ALPHA])
    if soul.rotation.kind == RotationKind.SO8 and Tensors.SOUL_GENERATOR in tensors:
        soul.rotation.generator.copy_(tensors[Tensors.SOUL_GENERATOR])
    else:
        soul.rotation.load_matrix(tensors[Tensors.SOUL_ROTATION])
    if head.omega is not None:
        omega = {Tensors.router_name(k): v for k, v in tensors.items() if Tensors.is_omega(k)}
        if omega:
            head.omega.load_state_dict(omega)


def validate_tensors(tensors: dict[str, torch.Tensor], config: ZptrConfig, where: str) -> None:
    """NaN/Inf anywhere, shape against the hidden size, orthogonality and SO(8) membership."""
    for name, value in tensors.items():
        if not torch.isfinite(value).all():
            raise CheckpointError(f"{where}: tensor {name} contains NaN or Inf")
    if Tensors.SOUL_ALPHA not in tensors or Tensors.SOUL_ROTATION not in tensors:
        raise CheckpointError(f"{where}: {Tensors.SOUL_ALPHA} or {Tensors.SOUL_ROTATION} missing")
    rotation = tensors[Tensors.SOUL_ROTATION]
    d = config.hidden_size
    expected = (d // 8, 8, 8) if config.rotation == RotationKind.SO8 else (d, d)
    if tuple(rotation.shape) != expected:
        raise CheckpointError(
            f"{where}: soul.rotation has shape {tuple(rotation.shape)}, expected {expected} for "
            f"rotation {config.rotation!r} and hidden size {d}")
    ortho, det = rotation_errors(rotation)
    tolerance = orthogonality_tolerance(rotation.shape[-1])
    if ortho > tolerance:
        raise CheckpointError(
            f"{where}: soul.rotation is not orthogonal (max |R^T R - I| = {ortho:.3g} > "
            f"{tolerance:.3g}, the float32 bound for {rotation.shape[-1]} x {rotation.shape[-1]})")
    if config.rotation == RotationKind.SO8 and det < 0:
        raise CheckpointError(f"{where}: soul.rotation has a block with det {det:.3f}: not in SO(8)")


# ------------------------------------------------------------------------------ hashing


def _hash_tree(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): sha256_file(p)
            for p in sorted(root.rglob("*")) if p.is_file() and p.name != CONFIG_FILE}


# ------------------------------------------------------------------------------ save / load


def save_checkpoint(path: Path, head: ZptrHead, *, base_model: str, architecture: str, step: int,
                    adapter_writer: Optional[Callable[[Path], None]] = None,
                    extra_writer: Optional[Callable[[Path], None]] = None,
                    overwrite: bool = False) -> Path:
    """Write a checkpoint directory atomically.

    ``adapter_writer(dir)`` writes the PEFT adapter (``peft_model.save_pretrained``);
    ``extra_writer(dir)`` writes anything else (the trainer's ``trainer_state/``).
    """
    tensors = head_tensors(head)
    validate_tensors(tensors, head.config, "refusing to save")

    def write(tmp: Path) -> None:
        if adapter_writer is not None:
            adapter_writer(tmp)
        save_file(tensors, str(tmp / SOUL_FILE), metadata={"format": "zptr"})
        if extra_writer is not None:
            extra_writer(tmp)
        meta = {
            "format_version": FORMAT_VERSION,
            "base_model": base_model,
            "architecture": architecture,
            "step": int(step),
            "zptr": head.config.to_dict(),
            "files": _hash_tree(tmp),
        }
        (tmp / CONFIG_FILE).write_text(json.dumps(meta, indent=2) + "\n")

    return atomic_directory(Path(path), write, overwrite=overwrite)


def load_checkpoint(path: Path, verify: bool = True, needed_only: bool = False) -> Checkpoint:
    """Load and validate a ZPTR checkpoint, or import a seed-format directory.

    Every file listed in ``zptr_config.json`` is checked against its sha256; with
    ``needed_only`` (conversion) the files only a resume reads may be absent, and are not read.
    """
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such checkpoint directory")
    if not path.is_dir():
        raise CheckpointError(f"{path}: is a file, not a checkpoint directory")
    if not (path / CONFIG_FILE).exists():
        if (path / SEED_SOUL_FILE).exists():
            return load_seed_checkpoint(path)
        raise CheckpointError(f"{path}: neither {CONFIG_FILE} nor a seed-format {SEED_SOUL_FILE} found")
    where = str(path / CONFIG_FILE)
    try:
        # The one schema of zptr_config.json: every key that save_checkpoint writes, no other.
        meta = JsonObject(read_json(path / CONFIG_FILE), where)
        version = meta.get("format_version", int)
        if version != FORMAT_VERSION:
            raise CheckpointError(f"{where}: format_version {version}, this version reads {FORMAT_VERSION}")
        meta.only("format_version", "base_model", "architecture", "step", "zptr", "files")
        config = ZptrConfig.from_dict(meta.get("zptr", dict), where, "zptr", complete=True)
        files = meta.get("files", dict[str, str])
        base_model = meta.get("base_model", Optional[str])
        architecture = meta.get("architecture", str)
        step = meta.get("step", int)
    except ConfigError as err:
        raise CheckpointError(str(err)) from None
    try:
        family_of(architecture)
    except ConfigError as err:
        raise CheckpointError(f"{where}: {err}") from None
    if step < 0:
        raise CheckpointError(f"{where}: step must not be negative, got {step}")
    if step > MAX_STEP:
        raise CheckpointError(f"{where}: step must be at most {MAX_STEP}, got {step}")
    if SOUL_FILE not in files:
        raise CheckpointError(f"{where}: no sha256 recorded for {SOUL_FILE}")
    for name, digest in files.items():
        file = path / name
        if path.resolve() not in file.resolve().parents:
            raise CheckpointError(f"{where}: listed file {name!r} lies outside the checkpoint")
        if needed_only and name not in CONVERSION_FILES:
            continue
        if not file.is_file():
            raise CheckpointError(f"{file}: missing (listed in {CONFIG_FILE})")
        if verify and sha256_file(file) != digest:
            raise CheckpointError(f"{file}: sha256 mismatch (file changed or corrupt)")
    try:
        tensors = load_file(str(path / SOUL_FILE))
    except Exception as err:  # safetensors raises several types for corrupt headers
        raise CheckpointError(f"{path / SOUL_FILE}: unreadable safetensors ({err})") from None
    validate_tensors(tensors, config, str(path / SOUL_FILE))
    return Checkpoint(path=path, config=config, tensors=tensors, base_model=base_model,
                      architecture=architecture, step=step, format="zptr", files=files)


def _seed_scalar(blob: dict, key: str, file: Path, default=None) -> float:
    value = blob.get(key, default)
    if torch.is_tensor(value) and value.numel() == 1:
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise CheckpointError(f"{file}: {key!r} must be a number or a one-element tensor, got "
                              f"{type(value).__name__}")
    return value


def load_seed_checkpoint(path: Path) -> Checkpoint:
    """A PEFT adapter plus the seed's ``soul.pt``: {"alpha", "so8_rotation", "step"}.

    Read with ``weights_only=True`` only: a pickle carrying code is refused. The rotation is the
    state dict of an orthogonal-parametrised Linear: a ``dense`` soul with no Omega router. The
    rotation is used as the parametrisation materialises it in float32, as it was trained.
    """
    file = Path(path) / SEED_SOUL_FILE
    try:
        blob = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as err:
        raise CheckpointError(
            f"{file}: refused by torch.load(weights_only=True) - not a plain tensor pickle "
            f"({error_summary(err, with_type=True)})") from None
    if not isinstance(blob, dict) or "alpha" not in blob or "so8_rotation" not in blob:
        raise CheckpointError(f"{file}: expected a dict with 'alpha' and 'so8_rotation'")
    alpha = _seed_scalar(blob, "alpha", file)
    step = _seed_scalar(blob, "step", file, 0)
    if not math.isfinite(alpha):
        raise CheckpointError(f"{file}: alpha is {alpha}")
    if int(step) != step or step < 0:
        raise CheckpointError(f"{file}: step must be a non-negative integer, got {step}")
    state = blob["so8_rotation"]
    if not isinstance(state, dict) or not all(torch.is_tensor(v) for v in state.values()):
        raise CheckpointError(f"{file}: so8_rotation must be a state dict of tensors")
    original = state.get("parametrizations.weight.original")
    if original is None or original.dim() != 2 or original.shape[0] != original.shape[1]:
        raise CheckpointError(f"{file}: so8_rotation lacks a square parametrizations.weight.original")
    if not all(torch.isfinite(v.float()).all() for v in state.values()):
        raise CheckpointError(f"{file}: so8_rotation contains NaN or Inf")
    hidden = original.shape[-1]
    rotation = Rotation(hidden, RotationKind.DENSE)
    try:
        rotation.dense.load_state_dict(state)
    except RuntimeError as err:
        raise CheckpointError(f"{file}: so8_rotation does not load ({error_summary(err)})") from None
    config = ZptrConfig(hidden_size=hidden, rotation=RotationKind.DENSE)
    config.omega.enabled = False
    with torch.no_grad():
        tensors = {Tensors.SOUL_ALPHA: torch.tensor(float(alpha)), Tensors.SOUL_ROTATION: rotation.matrix().float()}
    validate_tensors(tensors, config, str(file))
    adapter = Path(path) / ADAPTER_CONFIG
    base_model = None
    if adapter.exists():
        try:
            base_model = read_object(adapter).get("base_model_name_or_path", Optional[str], None)
        except ConfigError as err:
            raise CheckpointError(str(err)) from None
    return Checkpoint(path=Path(path), config=config, tensors=tensors, base_model=base_model,
                      step=int(step), format="seed", files={SEED_SOUL_FILE: sha256_file(file)})


def build_head(checkpoint: Checkpoint) -> ZptrHead:
    """A ZptrHead holding a checkpoint's tensors."""
    head = ZptrHead(checkpoint.config)
    load_head_tensors(head, checkpoint.tensors)
    return head
