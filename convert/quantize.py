"""Every llama.cpp type through llama.cpp's own quantizer, compiled into llama-cpp-python.

``llama_model_quantize`` runs in a child process (:mod:`.quantize_worker`), so Ctrl-C and
SIGTERM stop it at once: the child is killed, the temporary output removed, and the command
exits 130 / 143. Its log lines are summarised by :mod:`zptr.native_log`.

:func:`quantize_gguf` is ``zptr quantize``: re-quantize a float GGUF, re-pairing its Omega
sidecar with the new file (the pairing is by sha256, which quantization changes). Both outputs
appear together or not at all. With an importance matrix (:mod:`.imatrix`, checked against the
model before anything is written) the output records llama-quantize's ``quantize.imatrix.*`` keys.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Optional

import gguf

from zptr.errors import ConvertError
from zptr.fileio import Outputs, check_separate
from zptr.formats.gguf import arch_value, architecture, field_value, open_gguf
from zptr.formats.keys import Keys
from zptr.formats.sidecar import SIDECAR_ARCH, read_sidecar, sidecar_path_for, write_sidecar
from zptr.native_log import current, feed_relayed

from .ggml import producible

# ftypes whose own tensor type is at least as precise as what llama.cpp gives an output matrix.
_HIGH_PRECISION = ("f32", "f16", "bf16", "q8_0")
_FLOAT_INPUTS = {"F32", "F16", "BF16"}
_Q = gguf.GGMLQuantizationType
_NEED_IMATRIX = {_Q.IQ1_S, _Q.IQ1_M, _Q.IQ2_XXS, _Q.IQ2_XS, _Q.IQ2_S, _Q.IQ3_XXS}


def _llama_types() -> dict[str, int]:
    """Out type name -> llama_ftype, read from llama-cpp-python's constants (q4_k_m, q8_0, ...);
    only those llama.cpp's quantizer makes (the constants also name nvfp4, which it refuses)."""
    import llama_cpp

    prefix = "LLAMA_FTYPE_MOSTLY_"
    types = {name[len(prefix):].lower(): value for name, value in vars(llama_cpp).items()
             if name.startswith(prefix) and isinstance(value, int) and producible(value)}
    types["f32"] = llama_cpp.LLAMA_FTYPE_ALL_F32
    return types


QUANT_TYPES: dict[str, int] = _llama_types()


def check_outtype(outtype: str) -> str:
    outtype = str(outtype).lower()
    if outtype not in QUANT_TYPES:
        raise ConvertError(f"unknown out type {outtype!r}; llama.cpp types: {', '.join(sorted(QUANT_TYPES))}")
    return outtype


def untied_embedding_type(outtype: str, n_embd: int) -> Optional[int]:
    """The tensor type llama.cpp gives a tied embedding (it doubles as the output matrix there):
    Q6_K, or Q8_0 when rows do not split into 256-blocks. The fold unties the embedding; giving it
    the same type keeps the input embedding as precise as in the tied original."""
    if outtype in _HIGH_PRECISION:
        return None
    return int(gguf.GGMLQuantizationType.Q8_0 if n_embd % 256 else gguf.GGMLQuantizationType.Q6_K)


def needs_imatrix(name: str, qtype: gguf.GGMLQuantizationType, outtype: str) -> bool:
    """llama.cpp quantizes this tensor to ``qtype`` only with an importance matrix
    (``tensor_requires_imatrix``): the IQ1/IQ2 types and IQ3_XXS, and Q2_K inside a q2_k_s model;
    never the token embedding or the output matrix."""
    if name in ("token_embd.weight", "output.weight"):
        return False
    return qtype in _NEED_IMATRIX or (qtype == gguf.GGMLQuantizationType.Q2_K and outtype == "q2_k_s")


def check_imatrix_type(outtype: str, imatrix: Optional[Path]) -> None:
    """Refuse an imatrix for a type whose quantizer ignores it (float types and q8_0): the file
    would record an imatrix that changed nothing."""
    if imatrix is not None and outtype in _HIGH_PRECISION:
        raise ConvertError(f"--imatrix {imatrix}: {outtype} does not use an importance matrix "
                           f"(only quantized types below 8 bits do)")


def llama_quantize(infile: Path, outfile: Path, outtype: str, *, embedding_type: Optional[int] = None,
                   kv_overrides: Optional[dict[str, str]] = None, imatrix: Optional[Path] = None,
                   imatrix_name: Optional[str] = None, threads: int = 0) -> None:
    """Run llama.cpp's quantizer from ``infile`` to ``outfile`` in a child process (no checks, no
    atomicity: ``outfile`` is the caller's temporary). An interrupt kills the child and re-raises.
    ``imatrix_name`` is the imatrix path recorded in ``quantize.imatrix.file`` when ``imatrix``
    is a temporary (default: ``imatrix`` itself)."""
    job = {"infile": str(infile), "outfile": str(outfile), "ftype": QUANT_TYPES[outtype],
           "threads": threads, "embedding_type": embedding_type, "kv_overrides": kv_overrides or {},
           "imatrix": str(imatrix) if imatrix else None, "imatrix_name": imatrix_name}
    log = current()
    tail: list[str] = []
    # The context closes the child's stderr pipe and waits for it, on an interrupt too.
    with subprocess.Popen([sys.executable, "-m", "zptr.convert.quantize_worker", json.dumps(job)],
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                          encoding="utf-8", errors="replace") as proc:
        try:
            for line in proc.stderr:
                feed_relayed(log, line)
                tail = (tail + [line.partition("|")[2] or line])[-5:]
            status = proc.wait()
        except BaseException:
            proc.kill()
            raise
    if status != 0:
        detail = " ".join(line.strip() for line in tail if line.strip())[-300:]
        raise ConvertError(f"llama.cpp could not quantize {infile} to {outtype}"
                           f"{': ' + detail if detail else f' (exit {status})'}")


def _check_quantizable(reader: gguf.GGUFReader, path: Path) -> None:
    arch = architecture(reader)
    if arch == SIDECAR_ARCH:
        raise ConvertError(f"{path} is an Omega sidecar, not a model: quantize the model it pairs with")
    if not reader.tensors:
        raise ConvertError(f"{path} holds no tensors: nothing to quantize")
    quantized = sorted({t.tensor_type.name for t in reader.tensors} - _FLOAT_INPUTS)
    if quantized:
        raise ConvertError(f"{path} already holds {', '.join(quantized)} tensors; llama.cpp re-quantizes "
                           "faithfully only from f32/f16/bf16 (convert again with --outtype f32 or f16)")


def quantize_gguf(infile: Path, outfile: Path, outtype: str, overwrite: bool = False,
                  imatrix: Optional[Path] = None) -> Path:
    """Quantize a float GGUF to ``outtype``; re-pair IN's Omega sidecar with OUT when there is one."""
    infile, outfile = Path(infile), Path(outfile)
    outtype = check_outtype(outtype)
    check_imatrix_type(outtype, imatrix)
    reader = open_gguf(infile)
    _check_quantizable(reader, infile)
    if imatrix is not None:
        from .imatrix import check_imatrix_for

        check_imatrix_for(imatrix, infile)
    in_sidecar = sidecar_path_for(infile)
    sidecar = read_sidecar(in_sidecar) if in_sidecar.exists() else None
    out_sidecar = sidecar_path_for(outfile)
    check_separate([infile, in_sidecar if sidecar else None, imatrix],
                   [outfile, out_sidecar if sidecar else None])
    overrides = {}
    if sidecar is not None or field_value(reader, Keys.Omega.SIDECAR) is not None:
        overrides[Keys.Omega.SIDECAR] = out_sidecar.name
    embedding_type = None
    if field_value(reader, Keys.Soul.UNTIED_EMBEDDING, False):
        embedding_type = untied_embedding_type(outtype, int(arch_value(reader, gguf.Keys.LLM.EMBEDDING_LENGTH)))
    del reader  # release the memory map before llama.cpp reads the file
    with Outputs(overwrite) as outputs:
        model_tmp = outputs.file(outfile)
        sidecar_tmp = outputs.file(out_sidecar) if sidecar is not None else None
        llama_quantize(infile, model_tmp, outtype, embedding_type=embedding_type,
                       kv_overrides=overrides, imatrix=imatrix)
        if sidecar is not None:
            write_sidecar(sidecar_tmp, sidecar.tensors, sidecar.config, sidecar.hidden_size,
                          model_path=model_tmp, model_name=outfile.name)
    return outfile


__all__ = ["QUANT_TYPES", "check_imatrix_type", "check_outtype", "llama_quantize", "needs_imatrix", "quantize_gguf",
           "untied_embedding_type"]
