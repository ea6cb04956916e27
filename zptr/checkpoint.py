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

import contextlib
import hashlib
import json
import math
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Optional

import torch
from safetensors.torch import load_file, save_file

from .errors import ZptrError
from .config import FORMAT_VERSION, ZptrConfig, ZptrConfigError, phase_status
from .head import Rotation, ZptrHead, rotation_errors

CONFIG_FILE = "zptr_config.json"
SOUL_FILE = "soul.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
SEED_SOUL_FILE = "soul.pt"
ORTHOGONALITY_TOLERANCE = 1e-4


class CheckpointError(ZptrError, ValueError):
    """A checkpoint is missing, corrupt, tampered with or inconsistent."""


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
        return float(self.tensors["soul.alpha"])

    @property
    def gate(self) -> float:
        return 1.0 / (1.0 + math.exp(-self.alpha))

    @property
    def omega_gate(self) -> Optional[float]:
        return float(self.tensors["omega.gate"]) if "omega.gate" in self.tensors else None

    @property
    def rotation(self) -> torch.Tensor:
        return self.tensors["soul.rotation"]

    @property
    def phase(self) -> str:
        return phase_status(self.alpha, self.config.schedule.target)

    def omega_tensors(self) -> dict[str, torch.Tensor]:
        return {k: v for k, v in self.tensors.items() if k.startswith("omega.")}

    def orthogonality_error(self) -> float:
        return rotation_errors(self.rotation)[0]


# ------------------------------------------------------------------------------ tensors <-> head


def head_tensors(head: ZptrHead) -> dict[str, torch.Tensor]:
    """The stored tensors of a head: materialised rotation plus everything trainable."""
    soul = head.soul
    tensors = {"soul.alpha": soul.alpha.detach().float().clone(),
               "soul.rotation": soul.rotation.matrix().detach().float().contiguous()}
    if soul.rotation.kind == "so8":
        tensors["soul.generator"] = soul.rotation.generator.detach().float().clone()
    if head.omega is not None:
        for name, value in head.omega.state_dict().items():
            tensors[f"omega.{name}"] = value.detach().float().contiguous()
    return tensors


@torch.no_grad()
def load_head_tensors(head: ZptrHead, tensors: dict[str, torch.Tensor]) -> None:
    """Inverse of :func:`head_tensors`; the generator wins over the materialised rotation."""
    soul = head.soul
    soul.alpha.copy_(tensors["soul.alpha"])
    if soul.rotation.kind == "so8" and "soul.generator" in tensors:
        soul.rotation.generator.copy_(tensors["soul.generator"])
    else:
        soul.rotation.load_matrix(tensors["soul.rotation"])
    if head.omega is not None:
        omega = {k[len("omega."):]: v for k, v in tensors.items() if k.startswith("omega.")}
        if omega:
            head.omega.load_state_dict(omega)


def validate_tensors(tensors: dict[str, torch.Tensor], config: ZptrConfig, where: str) -> None:
    """NaN/Inf anywhere, shape against the hidden size, orthogonality and SO(8) membership."""
    for name, value in tensors.items():
        if not torch.isfinite(value).all():
            raise CheckpointError(f"{where}: tensor {name} contains NaN or Inf")
    if "soul.alpha" not in tensors or "soul.rotation" not in tensors:
        raise CheckpointError(f"{where}: soul.alpha or soul.rotation missing")
    rotation = tensors["soul.rotation"]
    d = config.hidden_size
    expected = (d // 8, 8, 8) if config.rotation == "so8" else (d, d)
    if tuple(rotation.shape) != expected:
        raise CheckpointError(
            f"{where}: soul.rotation has shape {tuple(rotation.shape)}, expected {expected} for "
            f"rotation {config.rotation!r} and hidden size {d}")
    ortho, det = rotation_errors(rotation)
    if ortho > ORTHOGONALITY_TOLERANCE:
        raise CheckpointError(
            f"{where}: soul.rotation is not orthogonal (max |R^T R - I| = {ortho:.3g} > "
            f"{ORTHOGONALITY_TOLERANCE:g})")
    if config.rotation == "so8" and det < 0:
        raise CheckpointError(f"{where}: soul.rotation has a block with det {det:.3f}: not in SO(8)")


# ------------------------------------------------------------------------------ hashing / atomic


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def _hash_tree(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): sha256_file(p)
            for p in sorted(root.rglob("*")) if p.is_file() and p.name != CONFIG_FILE}


@contextlib.contextmanager
def atomic_file(path: Path, overwrite: bool = True) -> Iterator[Path]:
    """Yield a temporary sibling of ``path`` to write; it is renamed onto ``path`` on success
    and deleted on any failure or interrupt, so ``path`` is never half-written."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists (pass --overwrite to replace it)")
    if path.is_dir():
        raise ZptrError(f"{path} is a directory, not an output file")
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(handle)
    tmp = Path(tmp_name)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp's 0600 would make outputs private
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_directory(target: Path, write: Callable[[Path], None], overwrite: bool = False) -> Path:
    """Write a directory through ``write(tmpdir)``, then rename it into place.

    A failure or interrupt leaves no partial ``target``; an existing target is kept unless
    ``overwrite``, in which case it is replaced only after the new one is complete.
    """
    target = Path(target)
    if target.exists() and not overwrite:
        raise FileExistsError(f"{target} exists (pass --overwrite to replace it)")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    try:
        write(tmp)
        if target.exists():
            old = target.with_name(f".{target.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.rename(target, old)
            os.rename(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


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


def load_checkpoint(path: Path, verify: bool = True) -> Checkpoint:
    """Load and validate a ZPTR checkpoint, or import a seed-format directory."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path}: not a checkpoint directory (does not exist or is a file)")
    if not (path / CONFIG_FILE).exists():
        if (path / SEED_SOUL_FILE).exists():
            return load_seed_checkpoint(path)
        raise CheckpointError(f"{path}: neither {CONFIG_FILE} nor a seed-format {SEED_SOUL_FILE} found")
    try:
        meta = json.loads((path / CONFIG_FILE).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{path / CONFIG_FILE}: corrupt JSON ({err})") from err
    if meta.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{path / CONFIG_FILE}: format_version {meta.get('format_version')!r}, "
                              f"this version reads {FORMAT_VERSION}")
    try:
        config = ZptrConfig.from_dict(meta["zptr"])
    except (KeyError, TypeError, ZptrConfigError) as err:
        raise CheckpointError(f"{path / CONFIG_FILE}: invalid zptr config ({err})") from err
    files = meta.get("files", {})
    if SOUL_FILE not in files:
        raise CheckpointError(f"{path / CONFIG_FILE}: no sha256 recorded for {SOUL_FILE}")
    for name, digest in files.items():
        file = path / name
        if not file.is_file():
            raise CheckpointError(f"{file}: missing (listed in {CONFIG_FILE})")
        if verify and sha256_file(file) != digest:
            raise CheckpointError(f"{file}: sha256 mismatch (file changed or corrupt)")
    try:
        tensors = load_file(str(path / SOUL_FILE))
    except Exception as err:  # safetensors raises several types for corrupt headers
        raise CheckpointError(f"{path / SOUL_FILE}: unreadable safetensors ({err})") from err
    validate_tensors(tensors, config, str(path / SOUL_FILE))
    return Checkpoint(path=path, config=config, tensors=tensors, base_model=meta.get("base_model"),
                      architecture=meta.get("architecture"), step=int(meta.get("step", 0)),
                      format="zptr", files=files)


def load_seed_checkpoint(path: Path) -> Checkpoint:
    """A PEFT adapter plus the seed's ``soul.pt``: {"alpha", "so8_rotation", "step"}.

    Read with ``weights_only=True`` only: a pickle carrying code is refused. The rotation is the
    state dict of an orthogonal-parametrised Linear: a ``dense`` soul with no Omega router.
    """
    file = Path(path) / SEED_SOUL_FILE
    try:
        blob = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as err:
        raise CheckpointError(
            f"{file}: refused by torch.load(weights_only=True) - not a plain tensor pickle "
            f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''})") from err
    if not isinstance(blob, dict) or "alpha" not in blob or "so8_rotation" not in blob:
        raise CheckpointError(f"{file}: expected a dict with 'alpha' and 'so8_rotation'")
    state = blob["so8_rotation"]
    original = state.get("parametrizations.weight.original")
    if original is None:
        raise CheckpointError(f"{file}: so8_rotation lacks parametrizations.weight.original")
    hidden = original.shape[-1]
    rotation = Rotation(hidden, "dense")
    try:
        rotation.dense.load_state_dict(state)
    except RuntimeError as err:
        raise CheckpointError(f"{file}: so8_rotation does not load ({err})") from err
    alpha = torch.as_tensor(blob["alpha"], dtype=torch.float32).reshape(())
    config = ZptrConfig(hidden_size=hidden, rotation="dense")
    config.omega.enabled = False
    tensors = {"soul.alpha": alpha, "soul.rotation": rotation.matrix().detach().float()}
    validate_tensors(tensors, config, str(file))
    adapter = Path(path) / ADAPTER_CONFIG
    base_model = None
    if adapter.exists():
        base_model = json.loads(adapter.read_text()).get("base_model_name_or_path")
    return Checkpoint(path=Path(path), config=config, tensors=tensors, base_model=base_model,
                      step=int(blob.get("step", 0)), format="seed",
                      files={SEED_SOUL_FILE: sha256_file(file)})


def build_head(checkpoint: Checkpoint) -> ZptrHead:
    """A ZptrHead holding a checkpoint's tensors."""
    head = ZptrHead(checkpoint.config)
    load_head_tensors(head, checkpoint.tensors)
    return head
