"""``convert_model``: checkpoint (or plain HF model) -> GGUF with the soul folded + Omega sidecar.

Order of work (SPEC §4): validate everything first (checkpoint hashes and tensors, base model,
architecture, hidden size, LoRA adapter, output paths), then stream the merged, folded tensors
into the GGUF, quantize when the type is not written directly, and only then write the sidecar,
paired with the final model file.
"""

from __future__ import annotations

import contextlib
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Union

import gguf
import torch

from zptr.checkpoint import (CONFIG_FILE, SEED_SOUL_FILE, Checkpoint, atomic_file, load_checkpoint,
                             sha256_file)
from zptr.config import FORMAT_VERSION, SUPPORTED_ARCHITECTURES
from zptr.models import load_base_model, resolve_model_path

from .errors import ConvertError
from .hf_export import export_hf as write_hf_export
from .hparams import arch_params, write_hparams
from .merge import EMBED, LoraAdapter, MergedModel, SafetensorsWeights, Soul, StateDictWeights
from .quantize import check_outtype, llama_quantize, untied_embedding_type
from .sidecar import sidecar_path_for, write_sidecar
from .tensors import GGUF_ARCHS, gguf_tensors
from .vocab import write_vocab
from .writer import DIRECT_TYPES, write_gguf

PathLike = Union[str, Path]


@dataclass
class ConvertResult:
    model_path: Path
    sidecar_path: Optional[Path]
    export_dir: Optional[Path] = None


@dataclass
class Source:
    """A resolved conversion input: what to write and where its parts came from."""

    model: MergedModel
    architecture: str
    tokenizer_source: Path  # a HF directory, or a GGUF base file
    name: str
    metadata: dict[str, Any]  # zptr.* keys without the prefix
    checkpoint: Optional[Checkpoint] = None

    @property
    def omega(self) -> dict:
        ckpt = self.checkpoint
        if ckpt is None or not ckpt.config.omega.enabled or ckpt.omega_gate is None:
            return {}
        return ckpt.omega_tensors()


def _architecture(config) -> str:
    arch = getattr(config, "model_type", None)
    if arch not in SUPPORTED_ARCHITECTURES:
        raise ConvertError(f"unsupported architecture {arch!r}; supported: {', '.join(SUPPORTED_ARCHITECTURES)}")
    return arch


def _base(reference: PathLike):
    """(weights, config, tokenizer source) of a base model: HF dir, .gguf file or 'bundled'.

    A GGUF base is dequantised by transformers into memory (not streamed); its tokenizer keys are
    taken from the GGUF itself, already in llama.cpp's form.
    """
    from transformers import AutoConfig

    directory, gguf_file = resolve_model_path(reference)
    if gguf_file is None:
        return SafetensorsWeights(directory), AutoConfig.from_pretrained(str(directory)), directory
    model = load_base_model(reference)
    return StateDictWeights(model.state_dict()), model.config, directory / gguf_file


def _checkpoint_sha256(ckpt: Checkpoint) -> str:
    # zptr_config.json lists the sha256 of every other file: its own hash identifies them all.
    return sha256_file(ckpt.path / (CONFIG_FILE if ckpt.format == "zptr" else SEED_SOUL_FILE))


def load_source(source: PathLike, base_model: Optional[PathLike]) -> Source:
    source = Path(source)
    is_checkpoint = source.is_dir() and ((source / CONFIG_FILE).exists() or (source / SEED_SOUL_FILE).exists())
    if not is_checkpoint:
        if not (source.is_dir() and (source / "config.json").is_file()):
            raise ConvertError(f"{source}: not a ZPTR checkpoint, a seed-format directory or a HF model directory")
        if base_model is not None:
            raise ConvertError(f"{source} is a plain HF model directory: --base-model applies to checkpoints only")
        weights, config, tokenizer_source = _base(source)
        arch = _architecture(config)
        return Source(MergedModel(weights, config), arch, tokenizer_source, source.name,
                      {"format_version": FORMAT_VERSION, "soul.folded": False, "source.base_model": str(source)})
    ckpt = load_checkpoint(source)
    reference = base_model or ckpt.base_model
    if not reference:
        raise ConvertError(f"{source}: the checkpoint records no base model; pass --base-model")
    weights, config, tokenizer_source = _base(reference)
    arch = _architecture(config)
    if ckpt.architecture and ckpt.architecture != arch:
        raise ConvertError(f"{source}: checkpoint architecture {ckpt.architecture!r} != base model's {arch!r}")
    if ckpt.config.hidden_size != config.hidden_size:
        raise ConvertError(f"{source}: checkpoint hidden size {ckpt.config.hidden_size} != base model "
                           f"{reference} hidden size {config.hidden_size}")
    adapter = LoraAdapter(ckpt.path) if ckpt.adapter_dir is not None else None
    model = MergedModel(weights, config, adapter, Soul(ckpt.rotation.float(), ckpt.gate))
    metadata = {
        "format_version": FORMAT_VERSION,
        "soul.folded": True,
        "soul.alpha": ckpt.alpha,
        "soul.gate": ckpt.gate,
        "soul.rotation": ckpt.config.rotation,
        "soul.orthogonality_error": ckpt.orthogonality_error(),
        "soul.phase": ckpt.phase,
        "source.base_model": str(reference),
        "source.step": ckpt.step,
        "source.checkpoint_sha256": _checkpoint_sha256(ckpt),
    }
    if model.tied:
        metadata["soul.untied_embedding"] = True  # quantizers keep the embedding's tied precision
    return Source(model, arch, tokenizer_source, source.name, metadata, ckpt)


# Python type -> GGUF writer method; bool before int (bool is an int in Python).
_KEY_WRITERS = ((bool, "add_bool"), (int, "add_uint32"), (float, "add_float32"), (str, "add_string"))


def write_zptr_keys(w: gguf.GGUFWriter, metadata: dict[str, Any]) -> None:
    for key, value in metadata.items():
        method = next(name for kind, name in _KEY_WRITERS if isinstance(value, kind))
        getattr(w, method)(f"zptr.{key}", value)


@contextlib.contextmanager
def _single_thread():
    """Per-tensor work is small and I/O bound: a torch thread pool's synchronisation costs more
    than it saves (LoRA merges of SmolLM2 took 30x longer with 2 threads on a busy machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _refuse_existing(paths: list[Optional[Path]], overwrite: bool) -> None:
    for path in paths:
        if path is not None and path.exists() and not overwrite:
            raise FileExistsError(f"{path} exists (pass --overwrite to replace it)")


def convert_model(source: PathLike, outfile: PathLike, outtype: str = "q4_k_m",
                  base_model: Optional[PathLike] = None, overwrite: bool = False,
                  export_hf: Optional[PathLike] = None, progress: bool = True) -> ConvertResult:
    """Convert a checkpoint, seed-format directory or HF directory to GGUF (+ sidecar, + HF export)."""
    outfile = Path(outfile)
    outtype = check_outtype(outtype)
    export_dir = Path(export_hf) if export_hf is not None else None
    _refuse_existing([outfile, export_dir], overwrite)
    with contextlib.ExitStack() as stack:
        stack.enter_context(_single_thread())
        src = load_source(source, base_model)
        sidecar_path = sidecar_path_for(outfile) if src.omega else None
        _refuse_existing([sidecar_path], overwrite)
        metadata = dict(src.metadata)
        if sidecar_path is not None:
            metadata["omega.sidecar"] = sidecar_path.name
        config = src.model.config
        params = arch_params(src.architecture, config)
        n_vocab = src.model.shape(EMBED)[0]

        def write_keys(w: gguf.GGUFWriter) -> None:
            w.add_name(src.name)
            write_hparams(w, src.architecture, config, params)
            w.add_vocab_size(n_vocab)
            write_vocab(w, src.tokenizer_source, n_vocab)
            write_zptr_keys(w, metadata)

        tensors = gguf_tensors(src.architecture, src.model, params)
        arch_name = gguf.MODEL_ARCH_NAMES[GGUF_ARCHS[src.architecture]]
        outfile.parent.mkdir(parents=True, exist_ok=True)
        if outtype in DIRECT_TYPES:
            write_gguf(outfile, arch_name, write_keys, tensors, outtype, overwrite, progress)
        else:
            work = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix=".zptr-convert-", dir=outfile.parent)))
            intermediate = write_gguf(work / "f32.gguf", arch_name, write_keys, tensors, "f32", progress=progress)
            untied = src.model.tied and src.model.folded
            embedding_type = untied_embedding_type(outtype, config.hidden_size) if untied else None
            if progress:
                print(f"quantizing {outfile.name} to {outtype} with llama.cpp", file=sys.stderr, flush=True)
            with atomic_file(outfile, overwrite) as tmp:
                llama_quantize(intermediate, tmp, outtype, embedding_type=embedding_type)
        if sidecar_path is not None:
            write_sidecar(sidecar_path, src.omega, src.checkpoint.config, outfile)
        if export_dir is not None:
            write_hf_export(src.model, src.tokenizer_source, export_dir, overwrite, progress)
    return ConvertResult(outfile, sidecar_path, export_dir)
