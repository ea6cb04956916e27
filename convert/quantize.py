"""``zptr quantize IN OUT TYPE``: any llama.cpp type through llama-cpp-python's own quantizer.

``llama_model_quantize`` is llama.cpp's quantizer compiled into llama-cpp-python: no checkout,
no compiler. The output appears only when complete; an Omega sidecar next to IN is re-paired
with OUT (the pairing is by sha256, which quantization changes).
"""

from __future__ import annotations

import argparse
import ctypes
import logging
from pathlib import Path

import gguf

from zptr.checkpoint import atomic_file
from zptr.config import ZptrConfig

from .errors import ConvertError
from .inspect import field_value, open_gguf
from .sidecar import read_sidecar, sidecar_path_for, write_sidecar
from .writer import unwind_on_sigterm

SIDECAR_KEY = "zptr.omega.sidecar"
UNTIED_KEY = "zptr.soul.untied_embedding"
# ftypes whose own tensor type is at least as precise as what llama.cpp gives an output matrix.
_HIGH_PRECISION = ("f32", "f16", "bf16", "q8_0")
_FLOAT_INPUTS = {"F32", "F16", "BF16"}


def untied_embedding_type(outtype: str, n_embd: int) -> int | None:
    """The tensor type llama.cpp gives a tied embedding (it doubles as the output matrix there):
    Q6_K, or Q8_0 when rows do not split into 256-blocks. The fold unties the embedding; giving it
    the same type keeps the input embedding as precise as in the tied original."""
    if outtype in _HIGH_PRECISION:
        return None
    return int(gguf.GGMLQuantizationType.Q8_0 if n_embd % 256 else gguf.GGMLQuantizationType.Q6_K)


def _llama_types() -> dict[str, int]:
    """Out type name -> llama_ftype, read from llama-cpp-python's constants (q4_k_m, q8_0, ...)."""
    import llama_cpp

    prefix = "LLAMA_FTYPE_MOSTLY_"
    types = {name[len(prefix):].lower(): value for name, value in vars(llama_cpp).items()
             if name.startswith(prefix) and isinstance(value, int)}
    types["f32"] = llama_cpp.LLAMA_FTYPE_ALL_F32
    return types


QUANT_TYPES: dict[str, int] = _llama_types()


def _string_override(key: str, value: str):
    """A null-terminated array of one llama_model_kv_override setting a string key."""
    import llama_cpp

    overrides = (llama_cpp.llama_model_kv_override * 2)()
    overrides[0].tag = llama_cpp.LLAMA_KV_OVERRIDE_TYPE_STR
    overrides[0].key = key.encode()
    overrides[0].value.val_str = value.encode()
    return overrides


def llama_quantize(infile: Path, outfile: Path, outtype: str, sidecar_name: str | None = None,
                   embedding_type: int | None = None) -> None:
    """Run llama.cpp's quantizer from ``infile`` to ``outfile`` (no atomicity, no checks)."""
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = QUANT_TYPES[outtype]
    params.nthread = 0  # all cores
    if embedding_type is not None:
        params.token_embedding_type = embedding_type
    overrides = None
    if sidecar_name is not None:
        overrides = _string_override(SIDECAR_KEY, sidecar_name)
        params.kv_overrides = ctypes.cast(overrides, ctypes.POINTER(llama_cpp.llama_model_kv_override))
    # llama.cpp logs every tensor through llama-cpp-python's logger: keep only errors.
    logger = logging.getLogger("llama-cpp-python")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        status = llama_cpp.llama_model_quantize(str(infile).encode(), str(outfile).encode(), ctypes.byref(params))
    finally:
        logger.setLevel(level)
    if status != 0:
        raise ConvertError(f"llama.cpp could not quantize {infile} to {outtype} (status {status})")


def check_outtype(outtype: str) -> str:
    outtype = outtype.lower()
    if outtype not in QUANT_TYPES:
        raise ConvertError(f"unknown out type {outtype!r}; llama.cpp types: {', '.join(sorted(QUANT_TYPES))}")
    return outtype


def quantize_gguf(infile: Path, outfile: Path, outtype: str, overwrite: bool = False) -> Path:
    """Quantize a GGUF to ``outtype``; re-pair IN's Omega sidecar with OUT when there is one."""
    infile, outfile = Path(infile), Path(outfile)
    outtype = check_outtype(outtype)
    if infile.resolve() == outfile.resolve():
        raise ConvertError(f"{outfile}: the output must differ from the input")
    reader = open_gguf(infile)
    quantized = sorted({t.tensor_type.name for t in reader.tensors} - _FLOAT_INPUTS)
    if quantized:
        raise ConvertError(f"{infile} already holds {', '.join(quantized)} tensors; llama.cpp re-quantizes only "
                           "from f32/f16/bf16 (convert again with --outtype f32 or f16)")
    in_sidecar = sidecar_path_for(infile)
    sidecar = read_sidecar(in_sidecar) if in_sidecar.exists() else None
    out_sidecar = sidecar_path_for(outfile)
    for target in (outfile, out_sidecar if sidecar else None):
        if target is not None and target.exists() and not overwrite:
            raise FileExistsError(f"{target} exists (pass --overwrite to replace it)")
    has_key = field_value(reader, SIDECAR_KEY) is not None
    embedding_type = None
    if field_value(reader, UNTIED_KEY, False):
        arch = field_value(reader, "general.architecture")
        embedding_type = untied_embedding_type(outtype, int(field_value(reader, f"{arch}.embedding_length")))
    del reader  # release the memory map before llama.cpp reads the file
    with atomic_file(outfile, overwrite) as tmp:
        llama_quantize(infile, tmp, outtype, out_sidecar.name if (sidecar or has_key) else None, embedding_type)
    if sidecar is not None:
        config = ZptrConfig(hidden_size=sidecar.hidden_size, rotation="dense", omega=sidecar.config)
        write_sidecar(out_sidecar, sidecar.tensors, config, outfile)
    return outfile


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("infile", help="input GGUF (f32, f16, bf16 or q8_0 for a faithful result)")
    parser.add_argument("outfile", help="output GGUF")
    parser.add_argument("type", help="llama.cpp type: q4_k_m, q5_k_m, q6_k, q8_0, q4_0, ...")
    parser.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")


def main(args: argparse.Namespace) -> int:
    unwind_on_sigterm()
    out = quantize_gguf(Path(args.infile), Path(args.outfile), args.type, overwrite=args.overwrite)
    print(f"wrote {out}")
    sidecar = sidecar_path_for(out)
    if sidecar.exists():
        print(f"wrote {sidecar}")
    return 0
