"""Importance matrices (imatrix) in llama.cpp's two file formats, both ways.

An imatrix holds, for every weight matrix llama.cpp quantizes, the sum over calibration tokens
of x_j^2 for each input column j of that matrix, and how many tokens were summed. The quantizer
weighs each column's rounding error by the mean x_j^2, so columns that carry large activations
are rounded more carefully.

GGUF format (what ``llama-imatrix`` writes today, ``tools/imatrix/imatrix.cpp``): no
architecture, ``general.type = "imatrix"``, ``imatrix.datasets`` (array of strings),
``imatrix.chunk_count`` and ``imatrix.chunk_size`` (uint32), and per matrix NAME, in sorted name
order, two F32 tensors: ``NAME.in_sum2`` of ggml shape [n_cols, n_mat] (the raw sums; n_mat is
the expert count of a 3-D expert tensor, else 1) and ``NAME.counts`` of ggml shape [1, n_mat]
(tokens summed per expert).

Legacy ``.dat`` format (little-endian, ``save_imatrix_legacy`` / ``common_imatrix_load_legacy``):
int32 entry count; per entry int32 name length, the name's bytes, int32 ncall, int32 nval and
nval float32 values, each (sum / count) * ncall; then, optionally, int32 chunk count, int32
dataset-name length and the name's bytes.

:meth:`Imatrix.means` gives what ``llama-quantize`` hands to ``llama_model_quantize``.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Union

import gguf
import numpy as np

from ..errors import ImatrixError, ModelLoadError
from ..fileio import check_file
from .gguf import MAGIC, field_value, open_gguf

PathLike = Union[str, Path]
GGUF_TYPE = gguf.GGUFType.IMATRIX
SUMS_SUFFIX = ".in_sum2"
COUNTS_SUFFIX = ".counts"


class Keys:
    """Every key of an imatrix file, and the ones ``llama-quantize --imatrix`` writes into the
    model it quantizes (``tools/quantize/quantize.cpp``)."""

    TYPE = gguf.Keys.General.TYPE
    DATASETS = gguf.Keys.IMatrix.DATASETS
    CHUNK_COUNT = gguf.Keys.IMatrix.CHUNK_COUNT
    CHUNK_SIZE = gguf.Keys.IMatrix.CHUNK_SIZE

    class Quantize:
        FILE = "quantize.imatrix.file"  # string: the imatrix path as given
        DATASET = "quantize.imatrix.dataset"  # string: its first dataset, when it names one
        ENTRIES_COUNT = "quantize.imatrix.entries_count"  # uint32
        CHUNKS_COUNT = "quantize.imatrix.chunks_count"  # uint32, only when > 0


@dataclass
class Entry:
    """The statistics of one weight matrix."""

    sums: np.ndarray  # (n_mat, n_cols) float32; legacy files: (1, nval) of (sum / count) * ncall
    counts: np.ndarray  # (n_mat,) tokens summed per expert; legacy files: (ncall,)

    @property
    def size(self) -> int:
        """Values per matrix set: what llama.cpp compares with the tensor's ne[0] * ne[2]."""
        return int(self.sums.size)


@dataclass
class Imatrix:
    entries: dict[str, Entry]
    datasets: list[str] = field(default_factory=list)
    chunk_count: int = 0
    chunk_size: int = 0  # 0 in legacy files, which do not record it
    legacy: bool = False

    def means(self) -> dict[str, np.ndarray]:
        """GGUF tensor name -> float32 values as llama-quantize passes them: per-column sums over
        counts per expert slice (1 where an expert saw no token); legacy: values / ncall."""
        out = {}
        for name, entry in self.entries.items():
            sums = entry.sums.astype(np.float32)
            counts = entry.counts.astype(np.float32)
            if self.legacy:
                ncall = counts[0]
                out[name] = (sums / ncall if ncall > 0 else sums).reshape(-1)
                continue
            means = np.where(counts[:, None] > 0, sums / np.where(counts > 0, counts, 1)[:, None],
                             np.float32(1.0))
            out[name] = np.ascontiguousarray(means, np.float32).reshape(-1)
        return out

    def quantize_keys(self, recorded_as: str) -> dict[str, Union[str, int]]:
        """The ``quantize.imatrix.*`` keys llama-quantize records in a model quantized with this
        imatrix, the file named ``recorded_as``."""
        keys: dict[str, Union[str, int]] = {Keys.Quantize.FILE: recorded_as}
        if self.datasets:
            keys[Keys.Quantize.DATASET] = self.datasets[0]
        keys[Keys.Quantize.ENTRIES_COUNT] = len(self.entries)
        if self.chunk_count > 0:
            keys[Keys.Quantize.CHUNKS_COUNT] = self.chunk_count
        return keys


def write_imatrix(path: PathLike, imatrix: Imatrix) -> Path:
    """Write ``imatrix`` in llama.cpp's GGUF layout to ``path`` (the caller's temporary)."""
    if imatrix.legacy:
        raise ImatrixError("a legacy imatrix stores means, not sums: it cannot be written as GGUF")
    if not imatrix.entries or not imatrix.datasets:
        # llama-quantize refuses a file without the datasets key (gguf-py skips empty arrays)
        raise ImatrixError("an imatrix needs entries and at least one dataset name to be written")
    # An empty architecture is no key at all: llama-imatrix writes none (the file describes
    # tensors, not a model).
    writer = gguf.GGUFWriter(str(path), arch="")
    try:
        writer.add_type(GGUF_TYPE)
        writer.add_array(Keys.DATASETS, list(imatrix.datasets))
        writer.add_uint32(Keys.CHUNK_COUNT, int(imatrix.chunk_count))
        writer.add_uint32(Keys.CHUNK_SIZE, int(imatrix.chunk_size))
        for name in sorted(imatrix.entries):
            entry = imatrix.entries[name]
            sums = np.ascontiguousarray(entry.sums, np.float32)
            writer.add_tensor(name + SUMS_SUFFIX, sums.reshape(len(entry.counts), -1))
            writer.add_tensor(name + COUNTS_SUFFIX,
                              np.asarray(entry.counts, np.float32).reshape(-1, 1))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
    finally:
        writer.close()
    return Path(path)


def read_imatrix(path: PathLike) -> Imatrix:
    """An imatrix file of either format; any defect raises :class:`ImatrixError` naming it."""
    path = check_file(path, ImatrixError, "no such imatrix file", "an imatrix file")
    with open(path, "rb") as handle:
        magic = handle.read(len(MAGIC))
    imatrix = _read_gguf(path) if magic == MAGIC else _read_legacy(path)
    for name, entry in imatrix.entries.items():
        if not (np.isfinite(entry.sums).all() and np.isfinite(entry.counts).all()):
            # llama_model_quantize refuses non-finite values half-way through a model
            raise ImatrixError(f"{path}: entry {name} holds NaN or Inf")
    return imatrix


def _read_gguf(path: Path) -> Imatrix:
    try:
        reader = open_gguf(path, "imatrix")
    except ModelLoadError as err:
        raise ImatrixError(str(err)) from None
    kind = field_value(reader, Keys.TYPE)
    if kind != GGUF_TYPE:
        raise ImatrixError(f"{path}: GGUF of type {kind!r}, not an imatrix ({GGUF_TYPE!r})")
    missing = [key for key in (Keys.DATASETS, Keys.CHUNK_COUNT, Keys.CHUNK_SIZE)
               if reader.get_field(key) is None]
    if missing:  # llama-quantize refuses such a file ("missing imatrix metadata")
        raise ImatrixError(f"{path}: imatrix metadata {', '.join(missing)} missing")
    tensors: dict[str, dict[str, gguf.ReaderTensor]] = {}
    for tensor in reader.tensors:
        for suffix in (SUMS_SUFFIX, COUNTS_SUFFIX):
            if tensor.name.endswith(suffix):
                tensors.setdefault(tensor.name[: -len(suffix)], {})[suffix] = tensor
    if not tensors:
        raise ImatrixError(f"{path}: no imatrix entries")
    entries = {}
    for name in sorted(tensors):
        pair = tensors[name]
        if len(pair) != 2:
            lacking = COUNTS_SUFFIX if SUMS_SUFFIX in pair else SUMS_SUFFIX
            raise ImatrixError(f"{path}: entry {name} has no {name}{lacking} tensor")
        if any(t.tensor_type != gguf.GGMLQuantizationType.F32 for t in pair.values()):
            raise ImatrixError(f"{path}: entry {name}: sums and counts must be F32")
        sums = np.array(pair[SUMS_SUFFIX].data, np.float32).reshape(-1)
        counts = np.rint(np.array(pair[COUNTS_SUFFIX].data, np.float64).reshape(-1))
        if counts.size == 0 or sums.size % counts.size:
            raise ImatrixError(f"{path}: entry {name} has {sums.size} sums for {counts.size} counts")
        entries[name] = Entry(sums.reshape(counts.size, -1), counts)
    return Imatrix(entries, [str(d) for d in field_value(reader, Keys.DATASETS)],
                   int(field_value(reader, Keys.CHUNK_COUNT)), int(field_value(reader, Keys.CHUNK_SIZE)))


class _Cursor:
    """Little-endian reads from a legacy file's bytes, each failure naming what was read."""

    def __init__(self, data: bytes, path: Path):
        self.data, self.at, self.path = data, 0, path

    def take(self, size: int, what: str) -> bytes:
        if size < 0 or self.at + size > len(self.data):
            raise ImatrixError(f"{self.path}: truncated legacy imatrix (reading {what} at byte {self.at})")
        chunk = self.data[self.at:self.at + size]
        self.at += size
        return chunk

    def int32(self, what: str) -> int:
        return struct.unpack("<i", self.take(4, what))[0]

    @property
    def left(self) -> int:
        return len(self.data) - self.at


def _read_legacy(path: Path) -> Imatrix:
    cursor = _Cursor(path.read_bytes(), path)
    n_entries = cursor.int32("the entry count")
    if n_entries < 1:
        raise ImatrixError(f"{path}: not an imatrix (neither GGUF nor a legacy file with entries)")
    entries = {}
    for index in range(n_entries):
        where = f"entry {index + 1} of {n_entries}"
        name = cursor.take(cursor.int32(f"the name length of {where}"), f"the name of {where}")
        ncall = cursor.int32(f"the call count of {where}")
        nval = cursor.int32(f"the value count of {where}")
        if nval < 1:
            raise ImatrixError(f"{path}: {where} has {nval} values")
        values = np.frombuffer(cursor.take(4 * nval, f"the values of {where}"), "<f4")
        entries[name.decode("utf-8", "replace")] = Entry(values.reshape(1, -1).astype(np.float32),
                                                         np.array([ncall], np.float64))
    chunk_count, datasets = 0, []
    if cursor.left:  # the trailing chunk count and dataset name are optional
        chunk_count = cursor.int32("the chunk count")
        if cursor.left >= 4:
            length = cursor.int32("the dataset name length")
            if length > 0:
                datasets.append(cursor.take(length, "the dataset name").decode("utf-8", "replace"))
    return Imatrix(entries, datasets, chunk_count, 0, legacy=True)


__all__ = ["Entry", "Imatrix", "Keys", "read_imatrix", "write_imatrix"]
