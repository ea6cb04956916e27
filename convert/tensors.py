"""HF tensor names -> GGUF tensors, with each family's layout quirks.

Names come from gguf-py's own name tables (``TensorNameMap``). What differs per family is the
data, and the family's registry entry (``tensor_layout``) names the transform per GGUF tensor
kind: llama.cpp's LLAMA graph rotates adjacent pairs where transformers rotates halves (Q/K rows
are permuted), Gemma stores RMSNorm weights as w where the graph multiplies by 1 + w. Phi-3's
fused ``qkv_proj`` and ``gate_up_proj`` already match llama.cpp's ``attn_qkv`` and ``ffn_up``
(gate first, then up). RoPE factor tensors (Llama 3.x, LongRoPE) come from :mod:`.hparams`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator, Optional

import gguf
import numpy as np
import torch

from zptr.errors import ConvertError
from zptr.families import PERMUTE_K, PERMUTE_Q, PLUS_ONE, Family

from .hparams import ArchParams, rope_tensors
from .merge import MergedModel


# Tensors larger than this (as float32) stream in blocks of rows: peak memory stays near one
# block, not a whole embedding matrix. A multiple of 32 rows keeps every block's bytes aligned.
BLOCK_BYTES = 64 << 20


@dataclass
class GgufTensor:
    name: str
    shape: tuple[int, ...]  # row-major (numpy) shape
    blocks: Callable[[], Iterator[np.ndarray]]  # float32 data in blocks of rows, produced on demand


def _row_blocks(shape: tuple[int, ...]) -> list[slice]:
    rows, row_bytes = shape[0], 4 * int(np.prod(shape[1:]))
    step = max(32, (BLOCK_BYTES // max(1, row_bytes)) // 32 * 32)
    return [slice(start, min(rows, start + step)) for start in range(0, rows, step)]


def gguf_arch(family: Family) -> gguf.MODEL_ARCH:
    return next(arch for arch, name in gguf.MODEL_ARCH_NAMES.items() if name == family.gguf_arch)


def _pairs_interleaved(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """Rows of each head from [first halves | second halves] to interleaved (x0, x1) pairs."""
    rows = weight.shape[0]
    return (weight.reshape(heads, 2, rows // heads // 2, *weight.shape[1:])
            .transpose(1, 2).reshape(weight.shape))


def _transform(name: str, params: ArchParams) -> Callable[[torch.Tensor], torch.Tensor]:
    return {PERMUTE_Q: lambda w: _pairs_interleaved(w, params.n_head),
            PERMUTE_K: lambda w: _pairs_interleaved(w, params.n_head_kv),
            PLUS_ONE: lambda w: w + 1.0}[name]


def _kind(gguf_name: str) -> str:
    parts = gguf_name.split(".")
    return parts[2] if parts[0] == "blk" else parts[0]


def hf_to_gguf_names(family: Family, names: list[str], n_layer: int) -> dict[str, str]:
    """HF tensor name -> GGUF tensor name; a tensor without a GGUF counterpart is refused."""
    name_map = gguf.get_tensor_name_map(gguf_arch(family), n_layer)
    out = {}
    for hf_name in names:
        gguf_name = name_map.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if gguf_name is None:
            raise ConvertError(f"tensor {hf_name!r} has no GGUF counterpart for architecture "
                               f"{family.gguf_arch}")
        out[hf_name] = gguf_name
    return out


def gguf_tensors(family: Family, model: MergedModel, params: ArchParams) -> list[GgufTensor]:
    """Every tensor of the GGUF file in writing order, each loaded only when written."""
    tensors: list[GgufTensor] = []
    for hf_name, gguf_name in hf_to_gguf_names(family, model.names(), params.n_layer).items():
        kind = family.tensor_layout.get(_kind(gguf_name))
        transform: Optional[Callable] = _transform(kind, params) if kind else None
        shape = model.shape(hf_name)
        # A layout transform works on whole heads: such tensors come whole (they are small).
        streamed = transform is None and len(shape) == 2 and 4 * shape[0] * shape[1] > BLOCK_BYTES

        def blocks(hf_name=hf_name, transform=transform, streamed=streamed,
                   shape=shape) -> Iterator[np.ndarray]:
            if streamed:
                for rows in _row_blocks(shape):
                    yield model.tensor(hf_name, rows).contiguous().numpy()
                return
            data = model.tensor(hf_name)
            yield (transform(data) if transform is not None else data).contiguous().numpy()

        tensors.append(GgufTensor(gguf_name, shape, blocks))
    for gguf_name, values in rope_tensors(params).items():
        tensors.append(GgufTensor(gguf_name, values.shape, lambda values=values: iter([values])))
    return tensors
