"""Streaming GGUF writer: one block of rows in memory at a time, output appears only when complete.

gguf-py's writer lays out header, key/values and tensor infos first, then takes tensor data in
order; every block of a tensor's rows is produced, encoded (float types by numpy, the others by
ggml's quantizer, :mod:`.ggml`) and written before the next is loaded. A :class:`WritePlan` says
which type each tensor gets: for f32/f16/bf16/q8_0 the converter's own rule
(:func:`direct_plan`), for every other llama.cpp type llama.cpp's (:mod:`.pipeline`).
"""

from __future__ import annotations

import os
import queue
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator, Optional

import gguf
import numpy as np
from tqdm import tqdm

from zptr.errors import ConvertError
from .ggml import quantize_rows, row_bytes
from .tensors import GgufTensor

Q = gguf.GGMLQuantizationType
F = gguf.LlamaFileType
# Out types written by the converter's own rule: (type of 2-D weights, general.file_type).
DIRECT_TYPES: dict[str, tuple[gguf.GGMLQuantizationType, gguf.LlamaFileType]] = {
    "f32": (Q.F32, F.ALL_F32),
    "f16": (Q.F16, F.MOSTLY_F16),
    "bf16": (Q.BF16, F.MOSTLY_BF16),
    "q8_0": (Q.Q8_0, F.MOSTLY_Q8_0),
}
# Numpy-native types; the others are encoded to bytes by ggml.
_NUMPY = {Q.F32: np.float32, Q.F16: np.float16}


@dataclass
class WritePlan:
    """How a GGUF's tensors are encoded."""

    label: str  # the out type, for progress
    file_type: int  # general.file_type
    types: dict[str, gguf.GGMLQuantizationType]  # tensor name -> its type
    imatrix: Optional[dict[str, np.ndarray]] = None  # tensor name -> importance per column
    threads: int = field(default_factory=lambda: os.cpu_count() or 1)  # quantizer threads


def tensor_type(tensor: GgufTensor, qtype: gguf.GGMLQuantizationType) -> gguf.GGMLQuantizationType:
    """Norms, biases and other vectors stay float32; rows a block type cannot split become f16."""
    if len(tensor.shape) < 2:
        return Q.F32
    block = gguf.GGML_QUANT_SIZES[qtype][0]
    if tensor.shape[-1] % block != 0:
        return Q.F16
    return qtype


def direct_plan(tensors: list[GgufTensor], outtype: str) -> WritePlan:
    if outtype not in DIRECT_TYPES:
        raise ConvertError(f"out type {outtype!r} is not written directly; direct types: {', '.join(DIRECT_TYPES)}")
    qtype, file_type = DIRECT_TYPES[outtype]
    return WritePlan(outtype, int(file_type), {t.name: tensor_type(t, qtype) for t in tensors})


def encode(data: np.ndarray, qtype: gguf.GGMLQuantizationType, imatrix: Optional[np.ndarray] = None,
           threads: int = 1, name: str = "tensor") -> np.ndarray:
    if qtype in _NUMPY:
        return np.ascontiguousarray(data, dtype=_NUMPY[qtype])
    rows = data.reshape(-1, data.shape[-1])
    return quantize_rows(rows, qtype, imatrix, threads, name).reshape(*data.shape[:-1], -1)


def _declare(writer: gguf.GGUFWriter, tensor: GgufTensor, qtype: gguf.GGMLQuantizationType) -> None:
    if qtype in _NUMPY:
        dtype = np.dtype(_NUMPY[qtype])
        nbytes = int(np.prod(tensor.shape)) * dtype.itemsize
        writer.add_tensor_info(tensor.name, tensor.shape, dtype, nbytes)
    else:
        byte_shape = (*tensor.shape[:-1], row_bytes(qtype, tensor.shape[-1]))
        writer.add_tensor_info(tensor.name, byte_shape, np.dtype(np.uint8), int(np.prod(byte_shape)),
                               raw_dtype=qtype)


def write_gguf(path: Path, arch: str, write_keys: Callable[[gguf.GGUFWriter], None],
               tensors: list[GgufTensor], plan: WritePlan, progress: bool = True) -> Path:
    """Write ``tensors`` (loaded one by one) as ``plan`` says with the keys of ``write_keys`` to
    ``path``, which is the caller's temporary (the caller commits it: :class:`zptr.fileio.Outputs`)."""
    writer = gguf.GGUFWriter(path, arch)
    try:
        write_keys(writer)
        writer.add_file_type(plan.file_type)
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        for tensor in tensors:
            _declare(writer, tensor, plan.types[tensor.name])
        writer.write_header_to_file(path)
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        bar = tqdm(total=len(tensors), desc=f"writing {plan.label} GGUF", unit="tensor", disable=not progress)
        with bar, _Prefetch(tensors) as blocks:
            for tensor in tensors:
                _write_blocks(writer, tensor, plan, blocks.next_tensor())
                bar.update()
    finally:
        writer.close()
    return Path(path)


class _Prefetch:
    """Produces the blocks of every tensor, in order, on a background thread, one block ahead of
    the writer: reading, merging and folding the next block overlaps encoding this one (torch,
    numpy and ggml's quantizer all run without the GIL). An error in the producer is raised in
    the writer; leaving the context early stops the producer."""

    _END = object()

    def __init__(self, tensors: list[GgufTensor], depth: int = 1):
        self._tensors = tensors
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._produce, name="zptr-convert-blocks", daemon=True)

    def _put(self, item) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _produce(self) -> None:
        try:
            for tensor in self._tensors:
                for block in tensor.blocks():
                    if not self._put(block):
                        return
                if not self._put(self._END):
                    return
        except BaseException as err:  # handed to the writer, which raises it
            self._put(err)

    def next_tensor(self) -> Iterator[np.ndarray]:
        """The blocks of the next tensor, in the order the tensors were given."""
        while True:
            item = self._queue.get()
            if isinstance(item, BaseException):
                raise item
            if item is self._END:
                return
            yield item

    def __enter__(self) -> "_Prefetch":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def _write_blocks(writer: gguf.GGUFWriter, tensor: GgufTensor, plan: WritePlan,
                  blocks: Iterable[np.ndarray]) -> None:
    """One tensor's data, block of rows by block, as ``GGUFWriter.write_tensor_data`` lays out a
    whole tensor (pinned gguf 0.19: aligned start, the data, padding to the alignment)."""
    kind = plan.types[tensor.name]
    # llama.cpp quantizes without the importance of a matrix it has none for, or of another shape
    # (ggml would read past a shorter one).
    imatrix = (plan.imatrix or {}).get(tensor.name)
    if imatrix is not None and imatrix.size != tensor.shape[-1]:
        imatrix = None
    fout = writer.fout[0]
    info = writer.tensors[0].pop(tensor.name)
    writer.write_padding(fout, fout.tell())
    written, rows = 0, 0
    for block in blocks:
        if tuple(block.shape[1:]) != tuple(tensor.shape[1:]):
            raise ConvertError(f"tensor {tensor.name}: produced rows of shape {block.shape[1:]}, "
                               f"declared {tensor.shape}")
        encoded = encode(block, kind, imatrix, plan.threads, tensor.name)
        # Through the file object, not numpy's tofile: a full disk then raises ENOSPC, where
        # tofile says only "N requested and M written".
        fout.write(memoryview(encoded).cast("B"))
        written, rows = written + encoded.nbytes, rows + block.shape[0]
    if written != info.nbytes or rows != tensor.shape[0]:
        raise ConvertError(f"tensor {tensor.name}: produced {rows} rows, declared {tensor.shape}")
    writer.write_padding(fout, written)
    writer.state = gguf.gguf_writer.WriterState.WEIGHTS
