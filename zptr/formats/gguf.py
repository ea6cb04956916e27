"""Reading GGUF files: the one place that opens them.

:func:`open_gguf` checks the file (exists, is a file, GGUF magic, header parses, every tensor's
data inside the file) and turns every failure into a :class:`~zptr.errors.ModelLoadError` that
names the problem; :func:`check_model` checks a model's hyper-parameters before llama.cpp sees
them; :func:`field_value`, :func:`zptr_metadata` and :func:`read_tensor` read it.
Tensor names come from gguf-py's tables (``gguf.TENSOR_NAMES``), key names from gguf-py's
``Keys`` and our :class:`~zptr.formats.keys.Keys`.
"""

from __future__ import annotations

import re
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
    if not path.is_file():  # a FIFO or a device: reading it would block or never end
        raise ModelLoadError(f"{path}: not a regular file; give a GGUF {what} file")
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


MAX_LAYERS = 512  # llama.cpp's LLAMA_MAX_LAYERS: it aborts (GGML_ASSERT) past it, and at 0
_BLOCK = re.compile(r"^blk\.(\d+)\.")


def check_model(reader: gguf.GGUFReader, path: PathLike) -> None:
    """Refuse, naming the key, the hyper-parameters llama.cpp would abort on (an assertion kills
    the process without a word) or refuse to load: the block count against the ``blk.N`` tensors
    present, head counts, the embedding length against the tensor shapes, the vocabulary against
    the embedding rows. What llama.cpp reports as an error of its own is its to judge."""
    arch = architecture(reader)
    if not isinstance(arch, str) or not arch:
        raise ModelLoadError(f"{path}: no general.architecture: not a model GGUF")

    def key(template: str) -> str:
        return template.format(arch=arch)

    def counts(template: str, n_layer: int, required: bool = True) -> Optional[list[int]]:
        """A per-layer count: one integer for every layer, or an array of them."""
        value = field_value(reader, key(template))
        if value is None:
            if required:
                raise ModelLoadError(f"{path}: {key(template)} missing")
            return None
        values = value if isinstance(value, list) else [value] * n_layer
        if len(values) != n_layer or not all(isinstance(v, int) and v > 0 for v in values):
            raise ModelLoadError(f"{path}: {key(template)} must be a positive integer (or one per "
                                 f"each of the {n_layer} blocks), got {_short(value)}")
        return values

    n_layer = field_value(reader, key(gguf.Keys.LLM.BLOCK_COUNT))
    if not isinstance(n_layer, int) or not 1 <= n_layer <= MAX_LAYERS:
        raise ModelLoadError(f"{path}: {key(gguf.Keys.LLM.BLOCK_COUNT)} must lie in 1..{MAX_LAYERS}, "
                             f"got {_short(n_layer)}")
    blocks = {int(m.group(1)) for m in map(_BLOCK.match, (t.name for t in reader.tensors)) if m}
    if blocks != set(range(n_layer)):
        found = f"blk.0 .. blk.{max(blocks)} ({len(blocks)} blocks)" if blocks else "no blk.N tensors"
        raise ModelLoadError(f"{path}: {key(gguf.Keys.LLM.BLOCK_COUNT)} is {n_layer} but the file "
                             f"holds {found}")
    n_embd = field_value(reader, key(gguf.Keys.LLM.EMBEDDING_LENGTH))
    embd = find_tensor(reader, TOKEN_EMBD)
    if embd is None:
        raise ModelLoadError(f"{path}: no {TOKEN_EMBD} tensor")
    if not isinstance(n_embd, int) or n_embd != int(embd.shape[0]):
        raise ModelLoadError(f"{path}: {key(gguf.Keys.LLM.EMBEDDING_LENGTH)} is {_short(n_embd)} but "
                             f"{TOKEN_EMBD} has rows of {int(embd.shape[0])}")
    tokens = reader.get_field(gguf.Keys.Tokenizer.LIST)
    if tokens is not None and len(tokens.data) != int(embd.shape[1]):
        raise ModelLoadError(f"{path}: the vocabulary holds {len(tokens.data)} tokens but {TOKEN_EMBD} "
                             f"has {int(embd.shape[1])} rows")
    heads = counts(gguf.Keys.Attention.HEAD_COUNT, n_layer)
    heads_kv = counts(gguf.Keys.Attention.HEAD_COUNT_KV, n_layer, required=False) or heads
    for layer, (n_head, n_kv) in enumerate(zip(heads, heads_kv)):
        if n_kv > n_head or n_head % n_kv:
            raise ModelLoadError(f"{path}: block {layer} has {n_head} attention heads and {n_kv} "
                                 f"key/value heads ({key(gguf.Keys.Attention.HEAD_COUNT_KV)}): "
                                 "the heads must be a multiple of the key/value heads")
    head_dim = field_value(reader, key(gguf.Keys.Attention.KEY_LENGTH))
    if head_dim is None and n_embd % heads[0]:
        raise ModelLoadError(f"{path}: {key(gguf.Keys.LLM.EMBEDDING_LENGTH)} {n_embd} is not a "
                             f"multiple of {key(gguf.Keys.Attention.HEAD_COUNT)} {heads[0]}")
    head_dim = head_dim if head_dim is not None else n_embd // heads[0]
    for layer in range(n_layer):
        for name, n in (("attn_q", heads[layer]), ("attn_k", heads_kv[layer])):
            tensor = find_tensor(reader, f"blk.{layer}.{name}.weight")
            if tensor is not None and tuple(int(d) for d in tensor.shape[:2]) != (n_embd, n * head_dim):
                raise ModelLoadError(f"{path}: blk.{layer}.{name}.weight has shape "
                                     f"{tuple(int(d) for d in tensor.shape[:2])}, but {n} heads of "
                                     f"{head_dim} over an embedding of {n_embd} make ({n_embd}, {n * head_dim})")


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


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
