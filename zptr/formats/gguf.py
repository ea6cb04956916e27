"""Reading GGUF files: the one place that opens them.

:func:`open_gguf` checks the file (exists, is a file, GGUF magic, header parses, every tensor's
data inside the file) and turns every failure into a :class:`~zptr.errors.ModelLoadError` that
names the problem; :func:`field_value`, :func:`zptr_metadata` and :func:`read_tensor` read it.
Tensor names come from gguf-py's tables (``gguf.TENSOR_NAMES``), key names from gguf-py's
``Keys`` and our :class:`~zptr.formats.keys.Keys`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional, Union

import gguf
import numpy as np

from ..errors import ModelLoadError
from .keys import PREFIX

MAGIC = b"GGUF"
OUTPUT = gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.OUTPUT] + ".weight"
TOKEN_EMBD = gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.TOKEN_EMBD] + ".weight"
PathLike = Union[str, Path]


def check_gguf_file(path: PathLike, what: str = "model") -> Path:
    """A cheap check before anything opens ``path``: it exists, is a file, starts with GGUF."""
    path = Path(path)
    if path.is_dir():
        raise ModelLoadError(f"{path}: is a directory, not a GGUF {what} file")
    if not path.exists():
        raise ModelLoadError(f"{path}: no such {what} file")
    try:
        with open(path, "rb") as handle:
            magic = handle.read(4)
    except OSError as err:
        raise ModelLoadError(f"{path}: cannot be read ({err.strerror})") from None
    if magic != MAGIC:
        raise ModelLoadError(f"{path}: not a GGUF file (starts with {magic!r}, not {MAGIC!r})")
    return path


def open_gguf(path: PathLike, what: str = "model") -> gguf.GGUFReader:
    """A reader over a complete, well-formed GGUF file."""
    path = check_gguf_file(path, what)
    try:
        reader = gguf.GGUFReader(str(path))
    except Exception as err:  # the reader raises ValueError/IndexError/... on corrupt headers
        raise ModelLoadError(f"{path}: truncated or corrupt GGUF header "
                             f"({type(err).__name__}: {str(err)[:120]})") from None
    size = path.stat().st_size
    for tensor in reader.tensors:
        if tensor.data_offset + tensor.n_bytes > size:
            raise ModelLoadError(f"{path}: truncated GGUF file (tensor {tensor.name} runs past the "
                                 f"end: {size} bytes on disk)")
    return reader


def field_value(reader: gguf.GGUFReader, key: str, default: Any = None) -> Any:
    found = reader.get_field(key)
    return default if found is None else found.contents()


def architecture(reader: gguf.GGUFReader) -> Optional[str]:
    return field_value(reader, gguf.Keys.General.ARCHITECTURE)


def arch_value(reader: gguf.GGUFReader, key_template: str, default: Any = None) -> Any:
    """A per-architecture key such as ``gguf.Keys.LLM.EMBEDDING_LENGTH`` (``{arch}.…``)."""
    return field_value(reader, key_template.format(arch=architecture(reader)), default)


def zptr_metadata(reader: gguf.GGUFReader) -> dict[str, Any]:
    """Every ``zptr.*`` key without the prefix."""
    return {key[len(PREFIX):]: found.contents() for key, found in reader.fields.items()
            if key.startswith(PREFIX)}


def find_tensor(reader: gguf.GGUFReader, name: str) -> Optional[gguf.ReaderTensor]:
    return next((t for t in reader.tensors if t.name == name), None)


def read_tensor(tensor: gguf.ReaderTensor) -> np.ndarray:
    """A tensor's data dequantised to float32, in numpy (row-major) shape."""
    from gguf.quants import dequantize

    shape = tuple(int(n) for n in reversed(tensor.shape))
    data = dequantize(tensor.data, tensor.tensor_type)
    return np.ascontiguousarray(data.reshape(shape), dtype=np.float32)


def output_matrix(model: Union[PathLike, gguf.GGUFReader]) -> np.ndarray:
    """W': the model's output matrix (``output.weight``, or ``token_embd.weight`` when tied),
    float32 (n_vocab, n_embd): row v is W'_v. ``model`` is a path or a reader already open
    (parsing a large vocabulary's metadata takes seconds, so a caller that has one passes it)."""
    reader = model if isinstance(model, gguf.GGUFReader) else open_gguf(model)
    tensor = find_tensor(reader, OUTPUT) or find_tensor(reader, TOKEN_EMBD)
    if tensor is None:
        raise ModelLoadError(f"{reader.data.filename}: neither {OUTPUT} nor {TOKEN_EMBD} found")
    return read_tensor(tensor)
