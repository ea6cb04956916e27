"""What a conversion reads: a ZPTR checkpoint, a seed-format directory or a plain HF directory,
resolved to the merged, folded model, its family, its tokenizer and its ``zptr.*`` metadata.

Everything is validated here, before any output exists: checkpoint hashes and soul tensors, the
base model's config (JSON, family, what llama.cpp can reproduce), the LoRA adapter's tensors,
and that checkpoint and base model agree.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

from zptr.checkpoint import CONFIG_FILE, SEED_SOUL_FILE, Checkpoint, load_checkpoint
from zptr.config import FORMAT_VERSION
from zptr.errors import ConfigError, ConvertError, ZptrError, error_summary
from zptr.families import Family, family_of
from zptr.fileio import sha256_file
from zptr.formats.keys import Keys
from zptr.jsonio import read_json
from zptr.models import load_base_model, resolve_model_path

from .merge import LoraAdapter, MergedModel, SafetensorsWeights, Soul, StateDictWeights

PathLike = Union[str, Path]
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model")


@dataclass
class Source:
    """A resolved conversion input: what to write and where its parts came from."""

    model: MergedModel
    family: Family
    tokenizer_source: Path  # a HF directory, or a GGUF base file
    name: str
    metadata: dict[str, Any]  # full zptr.* key -> value
    inputs: list[Path] = field(default_factory=list)  # every file or directory read
    checkpoint: Optional[Checkpoint] = None

    @property
    def omega(self) -> dict:
        ckpt = self.checkpoint
        if ckpt is None or not ckpt.config.omega.enabled or ckpt.omega_gate is None:
            return {}
        return ckpt.omega_tensors()


def hf_config(directory: Path):
    """A HF directory's config, its family checked first (a clear error for JSON that is not a
    config, an unknown or unsupported model_type, or a config transformers refuses)."""
    from transformers import AutoConfig

    path = directory / "config.json"
    data = read_json(path)
    if not isinstance(data, dict):
        raise ConvertError(f"{path}: must be a JSON object, got {type(data).__name__}")
    try:
        family_of(data.get("model_type"))
    except ConfigError as err:
        raise ConvertError(f"{path}: {err}") from None
    try:
        return AutoConfig.from_pretrained(str(directory))
    except Exception as err:  # transformers raises many kinds for a config it cannot read
        raise ConvertError(f"{path}: transformers cannot read this config "
                           f"({error_summary(err, 160, with_type=True)})") from None


def _base(reference: PathLike):
    """(weights, config, tokenizer source, path read) of a base model: HF dir, .gguf or 'bundled'.

    A GGUF base is dequantised by transformers into memory (not streamed); its tokenizer keys are
    taken from the GGUF itself, already in llama.cpp's form.
    """
    directory, gguf_file = resolve_model_path(reference)
    if gguf_file is None:
        config = hf_config(directory)  # the family first: its refusal says more than missing weights
        return SafetensorsWeights(directory), config, directory, directory
    from zptr.formats.gguf import open_gguf

    path = directory / gguf_file
    open_gguf(path, "base model")  # a corrupt or foreign file is named before transformers tries
    try:
        model = load_base_model(reference)
    except ZptrError:
        raise
    except Exception as err:  # transformers' GGUF loader raises many kinds for files it cannot map
        raise ConvertError(f"{path}: transformers cannot load this GGUF as a base model "
                           f"({error_summary(err, 160, with_type=True)})") from None
    family_of(getattr(model.config, "model_type", None))
    return StateDictWeights(model.state_dict()), model.config, path, path


def _checkpoint_sha256(ckpt: Checkpoint) -> str:
    # zptr_config.json lists the sha256 of every other file: its own hash identifies them all.
    return sha256_file(ckpt.path / (CONFIG_FILE if ckpt.format == "zptr" else SEED_SOUL_FILE))


def _recorded_base(ckpt: Checkpoint) -> str:
    reference = ckpt.base_model
    if not reference:
        raise ConvertError(f"{ckpt.path}: the checkpoint records no base model; pass --base-model")
    return reference


def load_source(source: PathLike, base_model: Optional[PathLike] = None) -> Source:
    source = Path(source)
    if not source.exists():
        raise ConvertError(f"{source}: no such checkpoint or model directory")
    if not source.is_dir():
        raise ConvertError(f"{source}: is a file; give a ZPTR checkpoint, a seed-format directory or a "
                           "HF model directory")
    is_checkpoint = (source / CONFIG_FILE).exists() or (source / SEED_SOUL_FILE).exists()
    if not is_checkpoint:
        if not (source / "config.json").is_file():
            raise ConvertError(f"{source}: not a ZPTR checkpoint, a seed-format directory or a HF model directory")
        if base_model is not None:
            raise ConvertError(f"{source} is a plain HF model directory: --base-model applies to checkpoints only")
        weights, config, tokenizer_source, read = _base(source)
        family = family_of(config.model_type)
        return Source(MergedModel(weights, config), family, tokenizer_source, source.name,
                      {Keys.General.FORMAT_VERSION: FORMAT_VERSION, Keys.Soul.FOLDED: False,
                       Keys.Source.BASE_MODEL: str(source)}, inputs=[source])
    ckpt = load_checkpoint(source, needed_only=True)
    reference = base_model or _recorded_base(ckpt)
    weights, config, tokenizer_source, read = _base(reference)
    family = family_of(config.model_type)
    # Families that llama.cpp runs as one architecture are one model to it (a Mistral base read
    # back from GGUF is a llama to transformers).
    if ckpt.architecture and family_of(ckpt.architecture).gguf_arch != family.gguf_arch:
        raise ConvertError(f"{source}: checkpoint architecture {ckpt.architecture!r} != base model's "
                           f"{family.name!r}")
    if ckpt.config.hidden_size != config.hidden_size:
        raise ConvertError(f"{source}: checkpoint hidden size {ckpt.config.hidden_size} != base model "
                           f"{reference} hidden size {config.hidden_size}")
    # A tokenizer saved with the adapter (tokens added during fine-tuning) wins over the base's.
    if any((ckpt.path / name).is_file() for name in TOKENIZER_FILES):
        tokenizer_source = ckpt.path
    adapter = LoraAdapter(ckpt.path) if ckpt.adapter_dir is not None else None
    model = MergedModel(weights, config, adapter, Soul(ckpt.rotation.float(), ckpt.gate))
    metadata = {
        Keys.General.FORMAT_VERSION: FORMAT_VERSION,
        Keys.Soul.FOLDED: True,
        Keys.Soul.ALPHA: ckpt.alpha,
        Keys.Soul.GATE: ckpt.gate,
        Keys.Soul.ROTATION: ckpt.config.rotation,
        Keys.Soul.ORTHOGONALITY_ERROR: ckpt.orthogonality_error(),
        Keys.Soul.PHASE: ckpt.phase,
        Keys.Source.BASE_MODEL: str(reference),
        Keys.Source.STEP: ckpt.step,
        Keys.Source.CHECKPOINT_SHA256: _checkpoint_sha256(ckpt),
    }
    if model.tied:
        metadata[Keys.Soul.UNTIED_EMBEDDING] = True
    return Source(model, family, tokenizer_source, source.name, metadata,
                  inputs=[source, read], checkpoint=ckpt)
