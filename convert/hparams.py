"""HF config -> llama.cpp hyper-parameter keys (and RoPE factor tensors), for every family.

One generic writer: what differs per family comes from its registry entry
(:mod:`zptr.families`): which RoPE kinds its graph reproduces and how it takes a sliding
window. Each RoPE kind is one writer in :data:`ROPE_WRITERS`, each sliding-window policy one in
:data:`WINDOW_WRITERS`.

transformers 5 keeps RoPE settings in ``config.rope_parameters``: one dict, or for Gemma 3 one
dict per attention kind (``full_attention`` / ``sliding_attention``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable

import gguf
import numpy as np

from zptr.errors import ConfigError, ConvertError
from zptr.families import WINDOW_NONE, WINDOW_PATTERN, WINDOW_SINGLE, Family, rope_parameters


@dataclass
class ArchParams:
    n_layer: int
    n_head: int
    n_head_kv: int
    head_dim: int
    rope_dims: int  # rotated dimensions per head (Phi-3: head_dim * partial_rotary_factor)
    rope: dict[str, Any] = field(default_factory=dict)  # the (full-attention) RoPE parameters
    rope_swa: dict[str, Any] = field(default_factory=dict)  # Gemma 3 sliding layers

    @property
    def rope_type(self) -> str:
        return self.rope.get("rope_type", self.rope.get("type", "default"))

    @property
    def theta(self) -> float:
        return float(self.rope.get("rope_theta", 10000.0))


def arch_params(family: Family, config) -> ArchParams:
    """The shapes and RoPE settings of a HF config, refused when llama.cpp cannot reproduce them."""
    try:
        family.check(config)
    except ConfigError as err:  # the registry's refusal, as the converter's error
        raise ConvertError(str(err)) from None
    n_head = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // n_head
    rope = rope_parameters(config)
    rope_swa: dict[str, Any] = {}
    if "full_attention" in rope:
        rope, rope_swa = dict(rope["full_attention"]), dict(rope.get("sliding_attention", {}))
    partial = rope.get("partial_rotary_factor", getattr(config, "partial_rotary_factor", None)) or 1.0
    return ArchParams(n_layer=config.num_hidden_layers, n_head=n_head,
                      n_head_kv=getattr(config, "num_key_value_heads", None) or n_head,
                      head_dim=head_dim, rope_dims=int(head_dim * float(partial)), rope=rope,
                      rope_swa=rope_swa)


# ------------------------------------------------------------------------------ RoPE kinds


def _original_context(config, params: ArchParams) -> int:
    return int(params.rope.get("original_max_position_embeddings")
               or getattr(config, "original_max_position_embeddings", None)
               or config.max_position_embeddings)


def _no_keys(w: gguf.GGUFWriter, config, params: ArchParams) -> None:
    """default; llama3 (its factors are a tensor, see :func:`rope_tensors`)."""


def _linear(w: gguf.GGUFWriter, config, params: ArchParams) -> None:
    w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
    w.add_rope_scaling_factor(float(params.rope["factor"]))


def _yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    return 1.0 if factor <= 1.0 else 0.1 * mscale * math.log(factor) + 1.0


def _yarn(w: gguf.GGUFWriter, config, params: ArchParams) -> None:
    rope = params.rope
    for unsupported in ("mscale", "mscale_all_dim"):
        if rope.get(unsupported):
            raise ConvertError(f"YaRN with {unsupported} is not reproduced by llama.cpp's graph for this family")
    if rope.get("truncate") is False:
        raise ConvertError("YaRN with truncate=false is not reproduced by llama.cpp (it floors/ceils "
                           "the correction range)")
    factor = float(rope["factor"])
    w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
    w.add_rope_scaling_factor(factor)
    w.add_rope_scaling_orig_ctx_len(_original_context(config, params))
    for key, add in (("beta_fast", w.add_rope_scaling_yarn_beta_fast),
                     ("beta_slow", w.add_rope_scaling_yarn_beta_slow)):
        if rope.get(key) is not None:
            add(float(rope[key]))
    if rope.get("attention_factor") is not None:
        # llama.cpp scales attention by mscale(factor) x rope.scaling.attn_factor; transformers by
        # attention_factor alone when the config gives one.
        w.add_rope_scaling_attn_factors(float(rope["attention_factor"]) / _yarn_mscale(factor))


def _longrope(w: gguf.GGUFWriter, config, params: ArchParams) -> None:
    original = _original_context(config, params)
    w.add_rope_scaling_orig_ctx_len(original)
    factor = params.rope.get("attention_factor")
    if factor is None:  # transformers' LongRoPE default: sqrt(1 + ln(s) / ln(L_orig))
        scale = config.max_position_embeddings / original
        factor = math.sqrt(1 + math.log(scale) / math.log(original)) if scale > 1.0 else 1.0
    w.add_rope_scaling_attn_factors(float(factor))


ROPE_WRITERS: dict[str, Callable[[gguf.GGUFWriter, Any, ArchParams], None]] = {
    "default": _no_keys, "linear": _linear, "llama3": _no_keys, "yarn": _yarn, "longrope": _longrope,
}


def _llama3_factors(params: ArchParams) -> np.ndarray:
    """Llama 3.x's per-frequency divisors, as llama.cpp's ``rope_freqs`` tensor holds them:
    1 for short wavelengths, ``factor`` for long ones, a smooth blend in between."""
    rope = params.rope
    factor, low, high = float(rope["factor"]), float(rope["low_freq_factor"]), float(rope["high_freq_factor"])
    original = float(rope["original_max_position_embeddings"])
    freqs = 1.0 / params.theta ** (np.arange(0, params.rope_dims, 2, dtype=np.float64) / params.rope_dims)
    wavelengths = 2 * math.pi / freqs
    smooth = (original / wavelengths - low) / (high - low)
    blended = 1.0 / ((1 - smooth) / factor + smooth)
    out = np.where(wavelengths < original / high, 1.0, np.where(wavelengths > original / low, factor, blended))
    return out.astype(np.float32)


def _longrope_factors(params: ArchParams) -> dict[str, np.ndarray]:
    out = {}
    for kind in ("long", "short"):
        values = np.asarray(params.rope[f"{kind}_factor"], dtype=np.float32)
        if values.shape != (params.rope_dims // 2,):
            raise ConvertError(f"LongRoPE {kind}_factor has {values.size} values, expected "
                               f"{params.rope_dims // 2} (half the rotary dimensions)")
        out[gguf.TENSOR_NAMES[getattr(gguf.MODEL_TENSOR, f"ROPE_FACTORS_{kind.upper()}")] + ".weight"] = values
    return out


def rope_tensors(params: ArchParams) -> dict[str, np.ndarray]:
    """The float32 tensors some RoPE kinds need next to their keys."""
    if params.rope_type == "llama3":
        return {gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight": _llama3_factors(params)}
    if params.rope_type == "longrope":
        return _longrope_factors(params)
    return {}


# ------------------------------------------------------------------------------ sliding windows


def _window_single(w: gguf.GGUFWriter, config, params: ArchParams) -> None:
    # 0 tells llama.cpp "no sliding window", as for Phi-3.5 / Phi-4.
    w.add_sliding_window(int(getattr(config, "sliding_window", None) or 0))


def _window_pattern(w: gguf.GGUFWriter, config, params: ArchParams) -> None:
    layer_types = getattr(config, "layer_types", None) or ["full_attention"] * params.n_layer
    window = getattr(config, "sliding_window", None)
    if window and "sliding_attention" in layer_types:
        w.add_sliding_window(int(window))
        w.add_sliding_window_pattern([kind == "sliding_attention" for kind in layer_types])
        w.add_rope_freq_base_swa(float(params.rope_swa.get("rope_theta", 10000.0)))


WINDOW_WRITERS: dict[str, Callable[[gguf.GGUFWriter, Any, ArchParams], None]] = {
    WINDOW_NONE: _no_keys, WINDOW_SINGLE: _window_single, WINDOW_PATTERN: _window_pattern,
}


def write_hparams(w: gguf.GGUFWriter, family: Family, config, params: ArchParams) -> None:
    w.add_context_length(config.max_position_embeddings)
    w.add_embedding_length(config.hidden_size)
    w.add_block_count(params.n_layer)
    w.add_feed_forward_length(config.intermediate_size)
    w.add_head_count(params.n_head)
    w.add_head_count_kv(params.n_head_kv)
    w.add_key_length(params.head_dim)
    w.add_value_length(params.head_dim)
    w.add_layer_norm_rms_eps(config.rms_norm_eps)
    w.add_rope_freq_base(params.theta)
    w.add_rope_dimension_count(params.rope_dims)
    ROPE_WRITERS[params.rope_type](w, config, params)
    WINDOW_WRITERS[family.sliding_window](w, config, params)
