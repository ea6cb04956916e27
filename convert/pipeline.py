"""``convert_model``: checkpoint (or plain HF model) -> GGUF with the soul folded + Omega sidecar.

Order of work: resolve and validate every input first (:mod:`.source`), refuse outputs that exist
or overlap an input, then stream the merged, folded tensors into the GGUF in their final types
(quantized on the way, :mod:`.writer`; through llama.cpp's quantizer and a bf16 intermediate only
where its type rules depend on the imatrix), write the sidecar paired with the final model bytes
and the optional HF export. All outputs are written under temporary names and appear together at the end
(:class:`zptr.fileio.Outputs`); a failure or interrupt anywhere leaves none of them.
"""

from __future__ import annotations

import contextlib
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional, Union

import gguf
import torch

from zptr.errors import ConvertError
from zptr.fileio import Outputs, check_separate, scratch_prefix
from zptr.formats.imatrix import Imatrix, read_imatrix
from zptr.formats.keys import Keys
from zptr.formats.sidecar import sidecar_path_for, write_sidecar

from .ggml import IMATRIX_DEPENDENT_FTYPES, TypeModel, llama_tensor_types, type_choice_available
from .hf_export import export_hf as write_hf_export
from .hparams import ArchParams, arch_params, write_hparams
from .merge import EMBED
from .quantize import (QUANT_TYPES, check_imatrix_type, check_outtype, llama_quantize, needs_imatrix,
                       untied_embedding_type)
from .source import Source, load_source
from .tensors import GgufTensor, gguf_tensors
from .vocab import write_vocab
from .writer import DIRECT_TYPES, WritePlan, direct_plan, write_gguf

PathLike = Union[str, Path]
Q = gguf.GGMLQuantizationType
INTERMEDIATE = "bf16"  # what llama.cpp's quantizer reads
AUTO_IMATRIX = "auto"  # --imatrix auto: computed from the checkpoint's own training data
IMATRIX_SUFFIX = ".imatrix.gguf"


@dataclass
class ConvertResult:
    model_path: Path
    sidecar_path: Optional[Path]
    export_dir: Optional[Path] = None
    imatrix_path: Optional[Path] = None  # written by --imatrix auto


def imatrix_path_for(model_path: Path) -> Path:
    """``X.gguf`` -> ``X.imatrix.gguf``: where ``--imatrix auto`` keeps what it computed."""
    stem = model_path.name[:-len(".gguf")] if model_path.name.endswith(".gguf") else model_path.name
    return model_path.with_name(stem + IMATRIX_SUFFIX)


# Python type -> GGUF writer method; bool before int (bool is an int in Python).
_KEY_WRITERS = ((bool, "add_bool"), (int, "add_uint32"), (float, "add_float32"), (str, "add_string"))


def write_zptr_keys(w: gguf.GGUFWriter, metadata: dict[str, Any]) -> None:
    for key, value in metadata.items():
        method = next(name for kind, name in _KEY_WRITERS if isinstance(value, kind))
        getattr(w, method)(key, value)


@contextlib.contextmanager
def _single_thread() -> Iterator[None]:
    """Per-tensor work is small and I/O bound: a torch thread pool's synchronisation costs more
    than it saves (LoRA merges of SmolLM2 took 30x longer with 2 threads on a busy machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _quantized_plan(src: Source, tensors: list[GgufTensor], outtype: str, params: ArchParams,
                    embedding_type: Optional[int], imatrix: Optional[Imatrix]) -> Optional[WritePlan]:
    """llama.cpp's types for ``outtype`` on these tensors, with the imatrix they are quantized
    with; None where only ``llama_model_quantize`` itself can tell (see :mod:`.ggml`)."""
    if not type_choice_available() or (imatrix is not None and outtype in IMATRIX_DEPENDENT_FTYPES):
        return None
    config = src.model.config
    model = TypeModel(src.family.gguf_arch, config.hidden_size, config.intermediate_size, params.n_layer,
                      params.n_head, params.n_head_kv, params.head_dim)
    types = llama_tensor_types(model, {t.name: t.shape for t in tensors}, QUANT_TYPES[outtype], Q.BF16,
                               embedding_type)
    means = imatrix.means() if imatrix is not None else {}
    for name, kind in types.items():
        if needs_imatrix(name, kind, outtype) and name not in means:
            raise ConvertError(f"{outtype} quantizes {name} to {kind.name}, which needs an importance "
                               f"matrix{' entry for it' if means else ''}: pass --imatrix FILE or --imatrix auto")
    return WritePlan(outtype, QUANT_TYPES[outtype], types, means or None)


def _write_model(src: Source, path: Path, outtype: str, metadata: dict[str, Any],
                 imatrix: Optional[Path], imatrix_name: Optional[str], progress: bool) -> None:
    """The GGUF of ``src`` at ``path`` (a temporary): written directly in its final types, or,
    where only llama.cpp's quantizer knows them, through a bf16 intermediate it quantizes."""
    config = src.model.config
    params = arch_params(src.family, config)
    n_vocab = src.model.shape(EMBED)[0]
    tensors = gguf_tensors(src.family, src.model, params)
    # The fold unties a tied embedding: it keeps the type llama.cpp gives the tied matrix.
    untied = src.model.tied and src.model.folded
    embedding_type = untied_embedding_type(outtype, config.hidden_size) if untied else None
    matrix = read_imatrix(imatrix) if imatrix is not None else None
    if outtype in DIRECT_TYPES:
        plan: Optional[WritePlan] = direct_plan(tensors, outtype)
    else:
        plan = _quantized_plan(src, tensors, outtype, params, embedding_type, matrix)
    if plan is not None and matrix is not None:
        metadata = {**metadata, **matrix.quantize_keys(imatrix_name or str(imatrix))}

    def write_keys(w: gguf.GGUFWriter) -> None:
        w.add_name(src.name)
        write_hparams(w, src.family, config, params)
        w.add_vocab_size(n_vocab)
        write_vocab(w, src.tokenizer_source, n_vocab)
        write_zptr_keys(w, metadata)

    if plan is not None:
        write_gguf(path, src.family.gguf_arch, write_keys, tensors, plan, progress)
        return
    with tempfile.TemporaryDirectory(prefix=scratch_prefix(path), suffix=".tmp", dir=path.parent) as work:
        # bfloat16 for the quantizer's input: half the bytes of float32 to write and read back,
        # float32's range (no overflow), and a rounding (2^-9) far below any type it quantizes to.
        intermediate = write_gguf(Path(work) / "bf16.gguf", src.family.gguf_arch, write_keys, tensors,
                                  direct_plan(tensors, INTERMEDIATE), progress)
        if progress:
            print(f"quantizing to {outtype} with llama.cpp", file=sys.stderr, flush=True)
        llama_quantize(intermediate, path, outtype, embedding_type=embedding_type, imatrix=imatrix,
                       imatrix_name=imatrix_name)


def convert_model(source: PathLike, outfile: PathLike, outtype: str = "q4_k_m",
                  base_model: Optional[PathLike] = None, overwrite: bool = False,
                  export_hf: Optional[PathLike] = None, progress: bool = True,
                  imatrix: Optional[PathLike] = None, auto_chunks: Optional[int] = None) -> ConvertResult:
    """Convert a checkpoint, seed-format directory or HF directory to GGUF (+ sidecar, + HF export).

    ``imatrix``: an imatrix file for llama.cpp's quantizer, or ``"auto"`` to compute one from
    the checkpoint's training data (kept next to the model as ``X.imatrix.gguf``) on at most
    ``auto_chunks`` chunks (default: all of it).
    """
    outfile = Path(outfile)
    outtype = check_outtype(outtype)
    auto = imatrix is not None and str(imatrix) == AUTO_IMATRIX
    given = Path(imatrix) if imatrix is not None and not auto else None
    check_imatrix_type(outtype, imatrix)
    export_dir = Path(export_hf) if export_hf is not None else None
    with _single_thread():
        src = load_source(source, base_model)
        sidecar_path = sidecar_path_for(outfile) if src.omega else None
        imatrix_out = imatrix_path_for(outfile) if auto else None
        check_separate([*src.inputs, src.tokenizer_source, given],
                       [outfile, sidecar_path, export_dir, imatrix_out])
        if given is not None:
            from .imatrix import check_imatrix, source_shapes

            check_imatrix(read_imatrix(given), source_shapes(src), str(given), outfile.name)
        metadata = dict(src.metadata)
        if sidecar_path is not None:
            metadata[Keys.Omega.SIDECAR] = sidecar_path.name
        with Outputs(overwrite) as outputs:
            model_tmp = outputs.file(outfile)
            sidecar_tmp = outputs.file(sidecar_path) if sidecar_path is not None else None
            export_tmp = outputs.directory(export_dir) if export_dir is not None else None
            imatrix_tmp = outputs.file(imatrix_out) if imatrix_out is not None else None
            if imatrix_tmp is not None:
                from .imatrix import auto_imatrix

                auto_imatrix(src, imatrix_tmp, chunks=auto_chunks, progress=progress)
            _write_model(src, model_tmp, outtype, metadata, imatrix_tmp or given,
                         str(imatrix_out or given) if imatrix is not None else None, progress)
            if sidecar_tmp is not None:
                ckpt = src.checkpoint
                write_sidecar(sidecar_tmp, src.omega, ckpt.config.omega, ckpt.config.hidden_size,
                              model_path=model_tmp, model_name=outfile.name)
            if export_tmp is not None:
                write_hf_export(src.model, src.tokenizer_source, export_tmp, progress)
    return ConvertResult(outfile, sidecar_path, export_dir, imatrix_out)
