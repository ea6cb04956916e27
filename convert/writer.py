"""Streaming GGUF writer: one tensor in memory at a time, output appears only when complete.

gguf-py's writer lays out header, key/values and tensor infos first, then takes tensor data in
order; every tensor's bytes are produced, encoded and written before the next is loaded.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import gguf
import numpy as np
from tqdm import tqdm

from zptr.errors import ConvertError
from .tensors import GgufTensor

Q = gguf.GGMLQuantizationType
F = gguf.LlamaFileType
# Out types written directly: (tensor type of 2-D weights, file type recorded in general.file_type).
DIRECT_TYPES: dict[str, tuple[gguf.GGMLQuantizationType, gguf.LlamaFileType]] = {
    "f32": (Q.F32, F.ALL_F32),
    "f16": (Q.F16, F.MOSTLY_F16),
    "bf16": (Q.BF16, F.MOSTLY_BF16),
    "q8_0": (Q.Q8_0, F.MOSTLY_Q8_0),
}
# Numpy-native types; the others are encoded to bytes by gguf-py's quantizers.
_NUMPY = {Q.F32: np.float32, Q.F16: np.float16}
_QUANT_CHUNK = 16 << 20  # bytes of float32 rows quantized at once


def tensor_type(tensor: GgufTensor, qtype: gguf.GGMLQuantizationType) -> gguf.GGMLQuantizationType:
    """Norms, biases and other vectors stay float32; rows a block type cannot split become f16."""
    if len(tensor.shape) < 2:
        return Q.F32
    block = gguf.GGML_QUANT_SIZES[qtype][0]
    if tensor.shape[-1] % block != 0:
        return Q.F16
    return qtype


def encode(data: np.ndarray, qtype: gguf.GGMLQuantizationType) -> np.ndarray:
    if qtype in _NUMPY:
        return np.ascontiguousarray(data, dtype=_NUMPY[qtype])
    # gguf-py's quantizers make several full-size float temporaries: go through rows in chunks
    # so the peak stays near the tensor itself.
    rows = data.reshape(-1, data.shape[-1])
    step = max(1, _QUANT_CHUNK // max(1, rows.shape[1] * 4))
    parts = [gguf.quants.quantize(np.ascontiguousarray(rows[i:i + step], dtype=np.float32), qtype)
             for i in range(0, rows.shape[0], step)]
    return np.concatenate(parts).reshape(*data.shape[:-1], -1)


def _declare(writer: gguf.GGUFWriter, tensor: GgufTensor, qtype: gguf.GGMLQuantizationType) -> None:
    if qtype in _NUMPY:
        dtype = np.dtype(_NUMPY[qtype])
        nbytes = int(np.prod(tensor.shape)) * dtype.itemsize
        writer.add_tensor_info(tensor.name, tensor.shape, dtype, nbytes)
    else:
        byte_shape = gguf.quant_shape_to_byte_shape(tensor.shape, qtype)
        writer.add_tensor_info(tensor.name, byte_shape, np.dtype(np.uint8), int(np.prod(byte_shape)),
                               raw_dtype=qtype)


def write_gguf(path: Path, arch: str, write_keys: Callable[[gguf.GGUFWriter], None],
               tensors: list[GgufTensor], outtype: str, progress: bool = True) -> Path:
    """Write ``tensors`` (loaded one by one) with the keys of ``write_keys`` to ``path``, which is
    the caller's temporary (the caller commits it: :class:`zptr.fileio.Outputs`)."""
    if outtype not in DIRECT_TYPES:
        raise ConvertError(f"out type {outtype!r} is not written directly; direct types: {', '.join(DIRECT_TYPES)}")
    qtype, file_type = DIRECT_TYPES[outtype]
    writer = gguf.GGUFWriter(path, arch)
    try:
        write_keys(writer)
        writer.add_file_type(file_type)
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        types = [tensor_type(t, qtype) for t in tensors]
        for tensor, kind in zip(tensors, types):
            _declare(writer, tensor, kind)
        writer.write_header_to_file(path)
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        bar = tqdm(zip(tensors, types), total=len(tensors), desc=f"writing {outtype} GGUF",
                   unit="tensor", disable=not progress)
        for tensor, kind in bar:
            _write_blocks(writer, tensor, kind)
    finally:
        writer.close()
    return Path(path)


def _write_blocks(writer: gguf.GGUFWriter, tensor: GgufTensor, kind: gguf.GGMLQuantizationType) -> None:
    """One tensor's data, block of rows by block, as ``GGUFWriter.write_tensor_data`` lays out a
    whole tensor (pinned gguf 0.19: aligned start, the data, padding to the alignment)."""
    fout = writer.fout[0]
    info = writer.tensors[0].pop(tensor.name)
    writer.write_padding(fout, fout.tell())
    written, rows = 0, 0
    for block in tensor.blocks():
        if tuple(block.shape[1:]) != tuple(tensor.shape[1:]):
            raise ConvertError(f"tensor {tensor.name}: produced rows of shape {block.shape[1:]}, "
                               f"declared {tensor.shape}")
        encoded = encode(block, kind)
        encoded.tofile(fout)
        written, rows = written + encoded.nbytes, rows + block.shape[0]
    if written != info.nbytes or rows != tensor.shape[0]:
        raise ConvertError(f"tensor {tensor.name}: produced {rows} rows, declared {tensor.shape}")
    writer.write_padding(fout, written)
    writer.state = gguf.gguf_writer.WriterState.WEIGHTS
