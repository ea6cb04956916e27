"""Importance matrices computed on the PyTorch path, and the check that one fits a model.

The statistic is llama-imatrix's (``tools/imatrix/imatrix.cpp``): for every weight matrix of a
``blk.*`` layer (and ``output.weight`` with ``process_output``), the sum over calibration tokens
of the square of each input column, and the number of tokens. llama.cpp gathers it from the
inputs of its matrix products; here forward pre-hooks read the inputs of the same products in
transformers (each ``nn.Linear`` whose weight the converter writes as a ``blk.*`` tensor, named
by the converter's own name mapping) and the decoder's final hidden state stands for the input
of ``output.weight``. The model is the one the converter writes: LoRA merged (and for a
checkpoint the soul folded, which changes no matrix input), loaded through :func:`load_source`.

Chunks are llama-imatrix's: the calibration tokens cut into ``ctx``-token windows, each decoded
on its own from an empty context, its first token replaced by BOS when the tokenizer adds one.
llama-imatrix asks for two chunks because it also measures perplexity; one is enough here.
"""

from __future__ import annotations

import contextlib
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional, Union

import gguf
import numpy as np
import torch
from tqdm import tqdm

from zptr.dataset import calibration_ids, llama_chunks, sample_corpus_path
from zptr.errors import ConvertError, ImatrixError, error_summary
from zptr.families import family_of
from zptr.fileio import sha256_file
from zptr.formats.gguf import OUTPUT, architecture, field_value, open_gguf
from zptr.formats.imatrix import Entry, Imatrix, read_imatrix
from zptr.jsonio import read_object

from .hparams import arch_params
from .merge import LM_HEAD
from .source import Source, load_source
from .tensors import gguf_tensors, hf_to_gguf_names

PathLike = Union[str, Path]
DEFAULT_CTX = 512
BLOCK_PREFIX = "blk."
_FLOAT_TYPES = {"F32", "F16", "BF16"}
_ROPE_FACTOR_TENSORS = {gguf.TENSOR_NAMES[kind] + ".weight" for kind in (
    gguf.MODEL_TENSOR.ROPE_FREQS, gguf.MODEL_TENSOR.ROPE_FACTORS_LONG, gguf.MODEL_TENSOR.ROPE_FACTORS_SHORT)}
TRAINER_STATE = Path("trainer_state") / "trainer_state.json"


# ------------------------------------------------------------------------------ fitting a model


def check_imatrix(imatrix: Imatrix, shapes: dict[str, tuple[int, ...]], where: str, model: str) -> None:
    """Refuse an imatrix that does not fit a model of GGUF tensor ``shapes`` (numpy order): every
    ``blk.*`` matrix needs an entry with its column count (times its expert count, as llama.cpp
    compares), and every entry must name a matrix of the model. The first mismatch is named."""
    for name, shape in shapes.items():
        if len(shape) < 2:
            continue
        entry = imatrix.entries.get(name)
        if entry is None:
            if name.startswith(BLOCK_PREFIX):
                raise ImatrixError(f"{where}: no entry for {name} of {model} (an imatrix of "
                                   "another model?)")
            continue
        columns = shape[-1] * (shape[0] if len(shape) == 3 else 1)
        if entry.size != columns:
            raise ImatrixError(f"{where}: entry {name} has {entry.size} columns, {model}'s "
                               f"tensor has {columns} (an imatrix of another model?)")
    extra = sorted(set(imatrix.entries) - set(shapes))
    if extra:
        raise ImatrixError(f"{where}: entry {extra[0]} names no tensor of {model} (an imatrix of "
                           "another model?)")


def gguf_shapes(path: PathLike) -> dict[str, tuple[int, ...]]:
    """GGUF tensor name -> numpy-order shape, in file order."""
    return {t.name: tuple(int(n) for n in reversed(t.shape)) for t in open_gguf(path).tensors}


def source_shapes(src: Source) -> dict[str, tuple[int, ...]]:
    """The shapes of the tensors the converter writes for ``src``, in writing order."""
    params = arch_params(src.family, src.model.config)
    return {t.name: tuple(t.shape) for t in gguf_tensors(src.family, src.model, params)}


def check_imatrix_for(imatrix_path: PathLike, model_gguf_path: PathLike) -> Imatrix:
    """The imatrix at ``imatrix_path``, refused unless it fits the model GGUF."""
    imatrix = read_imatrix(imatrix_path)
    check_imatrix(imatrix, gguf_shapes(model_gguf_path), str(imatrix_path), Path(model_gguf_path).name)
    return imatrix


# ------------------------------------------------------------------------------ the model


@dataclass
class CalibrationModel:
    """A float32 transformers model with the weights that get quantized, and how to name them."""

    lm: torch.nn.Module  # a causal LM; only its decoder (``lm.model``) runs
    tokenizer: object
    gguf_names: dict[str, str]  # nn.Linear module name -> GGUF tensor name (blk.* only)
    shapes: dict[str, tuple[int, ...]]  # every GGUF tensor of the model
    name: str

    @property
    def bos(self) -> Optional[int]:
        """The BOS id when the tokenizer puts one first (llama.cpp's add_bos), else None."""
        ids = self.tokenizer("", add_special_tokens=True)["input_ids"]
        bos = getattr(self.tokenizer, "bos_token_id", None)
        return bos if bos is not None and ids[:1] == [bos] else None


def _tokenizer(source: Path):
    from transformers import AutoTokenizer

    if source.is_file():
        return AutoTokenizer.from_pretrained(str(source.parent), gguf_file=source.name)
    return AutoTokenizer.from_pretrained(str(source))


def _linear_names(lm: torch.nn.Module, family, n_layer: int) -> dict[str, str]:
    linear = [name for name, module in lm.named_modules() if isinstance(module, torch.nn.Linear)]
    mapped = hf_to_gguf_names(family, [name + ".weight" for name in linear], n_layer)
    return {name: mapped[name + ".weight"] for name in linear
            if mapped[name + ".weight"].startswith(BLOCK_PREFIX)}


def model_from_source(src: Source) -> CalibrationModel:
    """The converter's model of ``src`` (merged, as written to GGUF) in transformers."""
    from transformers import AutoModelForCausalLM

    config = src.model.config
    lm = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    # lm_head is not needed: output.weight's input is the decoder's output.
    state = {name: src.model.tensor(name) for name in src.model.names() if name != LM_HEAD}
    missing, unexpected = lm.load_state_dict(state, strict=False)
    missing = [name for name in missing if name != LM_HEAD]
    if missing or unexpected:
        raise ConvertError(f"{src.name}: the merged weights do not fit {type(lm).__name__} "
                           f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    names = _linear_names(lm, src.family, config.num_hidden_layers)
    return CalibrationModel(lm.eval(), _tokenizer(Path(src.tokenizer_source)), names,
                            source_shapes(src), src.name)


def model_from_gguf(path: Path) -> CalibrationModel:
    """A float GGUF read back by transformers (its tensors are what llama-quantize reads)."""
    from zptr.models import load_base_model

    reader = open_gguf(path)
    quantized = sorted({t.tensor_type.name for t in reader.tensors} - _FLOAT_TYPES)
    if quantized:
        raise ConvertError(f"{path} holds {', '.join(quantized)} tensors: compute the imatrix on "
                           "the f32/f16 GGUF (or the checkpoint) that gets quantized")
    scaled = [t.name for t in reader.tensors if t.name in _ROPE_FACTOR_TENSORS]
    scaling = field_value(reader, gguf.Keys.Rope.SCALING_TYPE.format(arch=architecture(reader)))
    if scaled or scaling not in (None, "none"):
        # transformers (5.23) reads such a GGUF back with plain RoPE: its activations, and so the
        # statistic, would not be the model's.
        raise ConvertError(f"{path}: its RoPE scaling ({scaled[0] if scaled else scaling}) is lost when "
                           "transformers reads the GGUF; compute the imatrix on the checkpoint or HF "
                           "directory it was converted from")
    del reader
    try:
        lm = load_base_model(path)
    except Exception as err:  # transformers' GGUF loader raises many kinds for files it cannot map
        raise ConvertError(f"{path}: transformers cannot load this GGUF "
                           f"({error_summary(err, 160, with_type=True)})") from None
    family = family_of(getattr(lm.config, "model_type", None))
    names = _linear_names(lm, family, lm.config.num_hidden_layers)
    return CalibrationModel(lm, _tokenizer(path), names, gguf_shapes(path), path.name)


def calibration_model(model: PathLike, base_model: Optional[PathLike] = None) -> CalibrationModel:
    """MODEL of ``zptr imatrix``: a checkpoint, a HF directory, an f32/f16/bf16 GGUF, or
    'bundled' (the bundled SmolLM2's HF directory)."""
    from zptr.models import BUNDLED_ALIASES, smollm2_hf_dir

    path = smollm2_hf_dir() if str(model).lower() in BUNDLED_ALIASES else Path(model)
    if path.is_file() and path.suffix == ".gguf":
        if base_model is not None:
            raise ConvertError(f"{path} is a GGUF: --base-model applies to checkpoints only")
        return model_from_gguf(path)
    return model_from_source(load_source(path, base_model))


# ------------------------------------------------------------------------------ collecting


@contextlib.contextmanager
def _torch_threads(threads: Optional[int]) -> Iterator[None]:
    previous = torch.get_num_threads()
    torch.set_num_threads(threads or os.cpu_count() or previous)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


class _Sums:
    """Per-column sums of x^2 over tokens, float64, with the token count per matrix."""

    def __init__(self):
        self.sums: dict[str, torch.Tensor] = {}
        self.counts: dict[str, int] = {}

    def add(self, name: str, x: torch.Tensor) -> None:
        rows = x.reshape(-1, x.shape[-1]).float()
        squares = rows.square().sum(0, dtype=torch.float64)
        self.sums[name] = self.sums[name] + squares if name in self.sums else squares
        self.counts[name] = self.counts.get(name, 0) + rows.shape[0]

    def entries(self) -> dict[str, Entry]:
        return {name: Entry(self.sums[name].numpy().astype(np.float32).reshape(1, -1),
                            np.array([self.counts[name]], np.float64)) for name in self.sums}


def collect(model: CalibrationModel, chunks: list[list[int]], *, dataset: str,
            process_output: bool = False, threads: Optional[int] = None,
            progress: bool = True) -> Imatrix:
    """The imatrix of ``model`` over ``chunks`` (each decoded from an empty context)."""
    sums = _Sums()
    modules = dict(model.lm.named_modules())
    handles = [modules[module].register_forward_pre_hook(
        lambda _module, inputs, name=name: sums.add(name, inputs[0]))
        for module, name in model.gguf_names.items()]
    output = process_output and OUTPUT in model.shapes
    try:
        with _torch_threads(threads), torch.inference_mode():
            for chunk in tqdm(chunks, desc="imatrix", unit="chunk", disable=not progress):
                hidden = model.lm.model(input_ids=torch.tensor([chunk]), use_cache=False).last_hidden_state
                if output:  # the input of the output matrix: the final norm's output
                    sums.add(OUTPUT, hidden)
    finally:
        for handle in handles:
            handle.remove()
    imatrix = Imatrix(sums.entries(), [dataset], chunk_count=len(chunks),
                      chunk_size=len(chunks[0]) if chunks else 0)
    # The converter writes these tensors: the statistic must name each with its columns.
    check_imatrix(imatrix, model.shapes, "computed imatrix", model.name)
    return imatrix


def compute_imatrix(model: CalibrationModel, data: PathLike, *, ctx: int = DEFAULT_CTX,
                    chunks: Optional[int] = None, process_output: bool = False,
                    threads: Optional[int] = None, progress: bool = True,
                    dataset: Optional[str] = None) -> Imatrix:
    """The imatrix of ``model`` on the calibration file ``data`` (JSONL training data or text),
    recorded under ``dataset`` (default: ``data`` as given)."""
    limit = getattr(model.lm.config, "max_position_embeddings", None)
    if limit and ctx > limit:
        raise ConvertError(f"-c/--ctx-size {ctx} exceeds the model's context of {limit} tokens")
    ids = calibration_ids(data, model.tokenizer)
    windows = llama_chunks(ids, ctx, chunks, model.bos, min_chunks=1, where=str(data))
    return collect(model, windows, dataset=dataset or str(data), process_output=process_output,
                   threads=threads, progress=progress)


# ------------------------------------------------------------------------------ --imatrix auto


def training_data(src: Source) -> tuple[Path, str]:
    """(calibration file, why) for ``--imatrix auto``: the checkpoint's own training data when it
    is still there unchanged (sha256 as recorded at training), else the bundled sample corpus."""
    corpus = sample_corpus_path()
    if src.checkpoint is None:
        return corpus, f"the bundled sample corpus {corpus} ({src.name} is no checkpoint: no training data)"
    state_file = src.checkpoint.path / TRAINER_STATE
    if not state_file.is_file():
        return corpus, f"the bundled sample corpus {corpus} ({state_file} is missing)"
    state = read_object(state_file)
    data = state.object("config").get("data", Optional[str], None)
    recorded = state.get("data_sha256", Optional[str], None)
    if not data or not recorded:
        return corpus, f"the bundled sample corpus {corpus} ({state_file} records no training data)"
    path = Path(data)
    if not path.is_file():
        return corpus, f"the bundled sample corpus {corpus} (the training data {path} is gone)"
    if sha256_file(path) != recorded:
        return corpus, (f"the bundled sample corpus {corpus} (the training data {path} changed "
                        "since training: sha256 differs)")
    return path, f"the checkpoint's training data {path} (sha256 as at training)"


def auto_imatrix(src: Source, path: Path, chunks: Optional[int] = None, progress: bool = True) -> Imatrix:
    """Compute ``--imatrix auto`` for ``src`` into ``path`` (a temporary) on at most ``chunks``
    chunks, saying on stderr which data it calibrates on."""
    from zptr.formats.imatrix import write_imatrix

    data, why = training_data(src)
    print(f"imatrix: calibrating on {why}", file=sys.stderr, flush=True)
    model = model_from_source(src)
    limit = getattr(src.model.config, "max_position_embeddings", None) or DEFAULT_CTX
    imatrix = compute_imatrix(model, data, ctx=min(DEFAULT_CTX, limit), chunks=chunks, progress=progress)
    write_imatrix(path, imatrix)
    return imatrix


__all__ = ["CalibrationModel", "auto_imatrix", "calibration_model", "check_imatrix",
           "check_imatrix_for", "collect", "compute_imatrix", "gguf_shapes", "model_from_gguf",
           "model_from_source", "source_shapes", "training_data"]
