"""HF config -> llama.cpp hyper-parameter keys, per architecture (Phi-3 LongRoPE included).

transformers 5 keeps RoPE settings in ``config.rope_parameters``: one dict, or for Gemma 3 one
dict per attention kind (``full_attention`` / ``sliding_attention``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable

import gguf
import numpy as np

from .errors import ConvertError

# RoPE variants each family's llama.cpp graph reproduces; others are refused, not approximated.
SUPPORTED_ROPE = {
    "llama": ("default", "linear"),
    "qwen2": ("default", "linear"),
    "phi3": ("default", "longrope"),
    "gemma3_text": ("default", "linear"),
}


@dataclass
class ArchParams:
    n_layer: int
    n_head: int
    n_head_kv: int
    head_dim: int
    rope_dims: int  # rotated dimensions per head (Phi-3: head_dim * partial_rotary_factor)
    rope: dict[str, Any] = field(default_factory=dict)  # the (full-attention) RoPE parameters
    rope_swa: dict[str, Any] = field(default_factory=dict)  # Gemma 3 sliding layers


def _rope_parameters(config) -> dict[str, Any]:
    rope = getattr(config, "rope_parameters", None) or {}
    if not rope and getattr(config, "rope_theta", None) is not None:  # older configs
        rope = dict(getattr(config, "rope_scaling", None) or {}, rope_theta=config.rope_theta)
    return dict(rope)


def arch_params(arch: str, config) -> ArchParams:
    n_head = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // n_head
    rope = _rope_parameters(config)
    rope_swa: dict[str, Any] = {}
    if "full_attention" in rope:
        rope, rope_swa = dict(rope["full_attention"]), dict(rope.get("sliding_attention", {}))
    partial = rope.get("partial_rotary_factor", getattr(config, "partial_rotary_factor", None)) or 1.0
    params = ArchParams(n_layer=config.num_hidden_layers, n_head=n_head,
                        n_head_kv=getattr(config, "num_key_value_heads", None) or n_head,
                        head_dim=head_dim, rope_dims=int(head_dim * float(partial)), rope=rope,
                        rope_swa=rope_swa)
    for kind in (params.rope, params.rope_swa):
        rope_type = kind.get("rope_type", kind.get("type", "default"))
        if kind and rope_type not in SUPPORTED_ROPE[arch]:
            raise ConvertError(f"{arch}: RoPE type {rope_type!r} is not supported; supported: "
                               f"{', '.join(SUPPORTED_ROPE[arch])}")
    return params


def _rope_type(rope: dict[str, Any]) -> str:
    return rope.get("rope_type", rope.get("type", "default"))


def _common(w: gguf.GGUFWriter, config, params: ArchParams) -> None:
    w.add_context_length(config.max_position_embeddings)
    w.add_embedding_length(config.hidden_size)
    w.add_block_count(params.n_layer)
    w.add_feed_forward_length(config.intermediate_size)
    w.add_head_count(params.n_head)
    w.add_head_count_kv(params.n_head_kv)
    w.add_key_length(params.head_dim)
    w.add_value_length(params.head_dim)
    w.add_layer_norm_rms_eps(config.rms_norm_eps)
    w.add_rope_freq_base(float(params.rope.get("rope_theta", 10000.0)))
    if _rope_type(params.rope) == "linear":
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(float(params.rope["factor"]))


def _llama(w: gguf.GGUFWriter, config, params: ArchParams) -> None:
    _common(w, config, params)
    w.add_rope_dimension_count(params.head_dim)


def _qwen2(w: gguf.GGUFWriter, config, params: ArchParams) -> None:
    if getattr(config, "use_sliding_window", False):
        raise ConvertError("qwen2 with use_sliding_window=true is not supported by llama.cpp's qwen2 graph")
    _common(w, config, params)


def _phi3_original_context(config, params: ArchParams) -> int:
    return int(params.rope.get("original_max_position_embeddings")
               or getattr(config, "original_max_position_embeddings", None)
               or config.max_position_embeddings)


def _phi3(w: gguf.GGUFWriter, config, params: ArchParams) -> None:
    _common(w, config, params)
    w.add_rope_dimension_count(params.rope_dims)
    # 0 tells llama.cpp "no sliding window", as for Phi-3.5 / Phi-4.
    w.add_sliding_window(int(getattr(config, "sliding_window", None) or 0))
    if _rope_type(params.rope) != "longrope":
        return
    original = _phi3_original_context(config, params)
    w.add_rope_scaling_orig_ctx_len(original)
    factor = params.rope.get("attention_factor")
    if factor is None:  # transformers' LongRoPE default: sqrt(1 + ln(s) / ln(L_orig))
        scale = config.max_position_embeddings / original
        factor = math.sqrt(1 + math.log(scale) / math.log(original)) if scale > 1.0 else 1.0
    w.add_rope_scaling_attn_factors(float(factor))


def _gemma3(w: gguf.GGUFWriter, config, params: ArchParams) -> None:
    if getattr(config, "final_logit_softcapping", None) or getattr(config, "attn_logit_softcapping", None):
        raise ConvertError("gemma3 logit soft-capping is not supported by llama.cpp's gemma3 graph")
    scalar = getattr(config, "query_pre_attn_scalar", params.head_dim)
    if scalar != params.head_dim:
        raise ConvertError(f"gemma3 query_pre_attn_scalar {scalar} != head_dim {params.head_dim}: "
                           "llama.cpp scales queries by 1/sqrt(head_dim)")
    _common(w, config, params)
    layer_types = getattr(config, "layer_types", None) or ["full_attention"] * params.n_layer
    window = getattr(config, "sliding_window", None)
    if window and "sliding_attention" in layer_types:
        w.add_sliding_window(int(window))
        w.add_sliding_window_pattern([kind == "sliding_attention" for kind in layer_types])
        w.add_rope_freq_base_swa(float(params.rope_swa.get("rope_theta", 10000.0)))


HPARAM_WRITERS: dict[str, Callable[[gguf.GGUFWriter, Any, ArchParams], None]] = {
    "llama": _llama, "qwen2": _qwen2, "phi3": _phi3, "gemma3_text": _gemma3,
}


def write_hparams(w: gguf.GGUFWriter, arch: str, config, params: ArchParams) -> None:
    HPARAM_WRITERS[arch](w, config, params)


def rope_factor_tensors(arch: str, params: ArchParams) -> dict[str, np.ndarray]:
    """Phi-3 LongRoPE long/short factors as the float32 tensors llama.cpp reads."""
    if arch != "phi3" or _rope_type(params.rope) != "longrope":
        return {}
    out = {}
    for kind in ("long", "short"):
        values = np.asarray(params.rope[f"{kind}_factor"], dtype=np.float32)
        if values.shape != (params.rope_dims // 2,):
            raise ConvertError(f"phi3 LongRoPE {kind}_factor has {values.size} values, expected "
                               f"{params.rope_dims // 2} (half the rotary dimensions)")
        out[f"rope_factors_{kind}.weight"] = values
    return out
