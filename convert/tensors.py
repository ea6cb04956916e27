"""HF tensor names -> GGUF tensors, per architecture, with each family's layout quirks.

Names come from gguf-py's own name tables (``TensorNameMap``). What differs per family is the
data: llama.cpp's LLAMA graph applies rotary embeddings to adjacent pairs where transformers
rotates halves (Q/K rows are permuted), Gemma stores RMSNorm weights as w where the graph needs
1 + w, Phi-3 ships its LongRoPE factors as tensors. Phi-3's fused ``qkv_proj`` and ``gate_up_proj``
already match llama.cpp's ``attn_qkv`` and ``ffn_up`` (gate first, then up).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import gguf
import numpy as np
import torch

from .errors import ConvertError
from .hparams import ArchParams, rope_factor_tensors
from .merge import MergedModel

GGUF_ARCHS: dict[str, gguf.MODEL_ARCH] = {
    "llama": gguf.MODEL_ARCH.LLAMA,
    "qwen2": gguf.MODEL_ARCH.QWEN2,
    "phi3": gguf.MODEL_ARCH.PHI3,
    "gemma3_text": gguf.MODEL_ARCH.GEMMA3,
}


@dataclass
class GgufTensor:
    name: str
    shape: tuple[int, ...]  # row-major (numpy) shape
    load: Callable[[], np.ndarray]  # float32 data, produced on demand


def _pairs_interleaved(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """Rows of each head from [first halves | second halves] to interleaved (x0, x1) pairs."""
    rows = weight.shape[0]
    return (weight.reshape(heads, 2, rows // heads // 2, *weight.shape[1:])
            .transpose(1, 2).reshape(weight.shape))


def _plus_one(weight: torch.Tensor) -> torch.Tensor:
    return weight + 1.0


def _transforms(arch: str, params: ArchParams) -> dict[str, Callable[[torch.Tensor], torch.Tensor]]:
    """GGUF tensor kind (name without ``blk.N.`` and suffix) -> data transform."""
    if arch == "llama":
        return {"attn_q": lambda w: _pairs_interleaved(w, params.n_head),
                "attn_k": lambda w: _pairs_interleaved(w, params.n_head_kv)}
    if arch == "gemma3_text":
        norms = ("attn_norm", "post_attention_norm", "ffn_norm", "post_ffw_norm", "attn_q_norm",
                 "attn_k_norm", "output_norm")
        return {kind: _plus_one for kind in norms}
    return {}


def _kind(gguf_name: str) -> str:
    parts = gguf_name.split(".")
    return parts[2] if parts[0] == "blk" else parts[0]


def gguf_tensors(arch: str, model: MergedModel, params: ArchParams) -> list[GgufTensor]:
    """Every tensor of the GGUF file in writing order, each loaded only when written."""
    name_map = gguf.get_tensor_name_map(GGUF_ARCHS[arch], params.n_layer)
    transforms = _transforms(arch, params)
    tensors: list[GgufTensor] = []
    for hf_name in model.names():
        gguf_name = name_map.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if gguf_name is None:
            raise ConvertError(f"tensor {hf_name!r} has no GGUF counterpart for architecture {arch}")
        transform: Optional[Callable] = transforms.get(_kind(gguf_name))

        def load(hf_name=hf_name, transform=transform) -> np.ndarray:
            data = model.tensor(hf_name)
            if transform is not None:
                data = transform(data)
            return data.contiguous().numpy()

        tensors.append(GgufTensor(gguf_name, model.shape(hf_name), load))
    for gguf_name, values in rope_factor_tensors(arch, params).items():
        tensors.append(GgufTensor(gguf_name, values.shape, lambda values=values: values))
    return tensors
