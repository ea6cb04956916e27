"""``convert_model``: checkpoint (or plain HF model) -> GGUF with the soul folded + Omega sidecar.

Order of work: resolve and validate every input first (:mod:`.source`), refuse outputs that exist
or overlap an input, then stream the merged, folded tensors into the GGUF, quantize when the type
is not written directly, write the sidecar paired with the final model bytes and the optional HF
export. All outputs are written under temporary names and appear together at the end
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

from zptr.fileio import Outputs, check_separate
from zptr.formats.imatrix import read_imatrix
from zptr.formats.keys import Keys
from zptr.formats.sidecar import sidecar_path_for, write_sidecar

from .hf_export import export_hf as write_hf_export
from .hparams import arch_params, write_hparams
from .merge import EMBED
from .quantize import check_imatrix_type, check_outtype, llama_quantize, untied_embedding_type
from .source import Source, load_source
from .tensors import gguf_tensors
from .vocab import write_vocab
from .writer import DIRECT_TYPES, write_gguf

PathLike = Union[str, Path]
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


def _write_model(src: Source, path: Path, outtype: str, metadata: dict[str, Any],
                 imatrix: Optional[Path], imatrix_name: Optional[str], progress: bool) -> None:
    """The GGUF of ``src`` at ``path`` (a temporary): written directly, or through a bf16
    intermediate and llama.cpp's quantizer."""
    config = src.model.config
    params = arch_params(src.family, config)
    n_vocab = src.model.shape(EMBED)[0]

    def write_keys(w: gguf.GGUFWriter) -> None:
        w.add_name(src.name)
        write_hparams(w, src.family, config, params)
        w.add_vocab_size(n_vocab)
        write_vocab(w, src.tokenizer_source, n_vocab)
        write_zptr_keys(w, metadata)

    tensors = gguf_tensors(src.family, src.model, params)
    if outtype in DIRECT_TYPES:
        write_gguf(path, src.family.gguf_arch, write_keys, tensors, outtype, progress)
        return
    with tempfile.TemporaryDirectory(prefix=".zptr-convert-", dir=path.parent) as work:
        # bfloat16 for the quantizer's input: half the bytes of float32 to write and read back,
        # float32's range (no overflow), and a rounding (2^-9) far below any type it quantizes to.
        intermediate = write_gguf(Path(work) / "bf16.gguf", src.family.gguf_arch, write_keys, tensors,
                                  INTERMEDIATE, progress)
        untied = src.model.tied and src.model.folded
        embedding_type = untied_embedding_type(outtype, config.hidden_size) if untied else None
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
