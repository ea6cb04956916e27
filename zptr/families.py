"""The architecture registry: every fact ZPTR needs about a model family, one entry per family.

Training (LoRA targets), conversion (GGUF architecture, tensor layout, RoPE kinds, sliding
windows, refusals) and the runtime all read these entries and nothing else. Adding a family is
one :class:`Family` here plus its tiny test model (tests/model_fixtures.py): the suite runs every
parity test over every entry and refuses an entry without a tiny model.

Each fact is about what llama.cpp's graph for the family reproduces of transformers' model:
anything else (a RoPE kind, an attention variant, soft-capping) is refused with a message that
names it, never approximated.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Callable, Mapping, Optional

from .errors import ConfigError

# Tensor layout transforms the converter applies per GGUF tensor kind (see zptr.convert.tensors).
PERMUTE_Q = "permute_q"  # llama.cpp rotates adjacent pairs where transformers rotates halves
PERMUTE_K = "permute_k"
PLUS_ONE = "plus_one"  # Gemma stores RMSNorm weights as w, the graph multiplies by 1 + w

# How llama.cpp's graph takes the family's sliding window (see zptr.convert.hparams).
WINDOW_NONE = "none"  # no sliding window in the graph: an active one is refused by a Refusal
WINDOW_SINGLE = "single"  # one window for every layer; 0 = none (Phi-3)
WINDOW_PATTERN = "pattern"  # a window and a per-layer pattern of sliding / full layers (Gemma 3)


@dataclass(frozen=True)
class Refusal:
    """A configuration llama.cpp's graph cannot reproduce: ``applies(hf_config)`` and why."""

    reason: str
    applies: Callable[[Any], bool]


def _active_window(config) -> bool:
    window = getattr(config, "sliding_window", None)
    return window is not None and window < config.max_position_embeddings


def _softcapped(config) -> bool:
    return bool(getattr(config, "final_logit_softcapping", None)
                or getattr(config, "attn_logit_softcapping", None))


def _query_scalar_differs(config) -> bool:
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return getattr(config, "query_pre_attn_scalar", head_dim) != head_dim


@dataclass(frozen=True)
class Family:
    """One model family: its names on both sides and every quirk between them."""

    name: str  # our name for the family: its canonical HF model_type
    model_types: tuple[str, ...]  # HF config.model_type values of this family
    gguf_arch: str  # llama.cpp's architecture name (gguf.MODEL_ARCH_NAMES)
    lora_targets: tuple[str, ...]  # default LoRA target modules (the attention projections)
    rope_kinds: tuple[str, ...]  # transformers rope_type values llama.cpp's graph reproduces
    tensor_layout: Mapping[str, str] = field(default_factory=dict)  # GGUF tensor kind -> transform
    sliding_window: str = WINDOW_NONE
    refusals: tuple[Refusal, ...] = ()
    # llama.cpp's CPU kernels compute this family's activation (GELU) through a float16 lookup
    # table: f32 GGUF logits then differ from transformers' by ~1e-4, enough to flip near-ties.
    fp16_activation: bool = False
    description: str = ""

    def check(self, config) -> None:
        """Refuse a configuration this family's llama.cpp graph cannot reproduce."""
        for refusal in self.refusals:
            if refusal.applies(config):
                raise ConfigError(f"{self.name}: {refusal.reason}")
        for kind in rope_types(config):
            if kind not in self.rope_kinds:
                raise ConfigError(f"{self.name}: RoPE type {kind!r} is not supported by llama.cpp's "
                                  f"{self.gguf_arch} graph; supported: {', '.join(self.rope_kinds)}")


def rope_parameters(config) -> dict[str, Any]:
    """The RoPE settings of a HF config as one dict, or for Gemma 3 one dict per attention kind
    (``full_attention`` / ``sliding_attention``); older configs' ``rope_scaling`` folded in."""
    rope = getattr(config, "rope_parameters", None) or {}
    if not rope and getattr(config, "rope_theta", None) is not None:
        rope = dict(getattr(config, "rope_scaling", None) or {}, rope_theta=config.rope_theta)
    return dict(rope)


def rope_types(config) -> list[str]:
    rope = rope_parameters(config)
    kinds = [rope[k] for k in ("full_attention", "sliding_attention") if k in rope] or [rope]
    return [kind.get("rope_type", kind.get("type", "default")) for kind in kinds if kind]


# The split rules (regexes of the published tokenizer.json files) of byte-level BPE tokenizers, by
# the name of llama.cpp's pre-tokenizer that reproduces each (llama-vocab.cpp).
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                 r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_GPT4O_SPLIT = (r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
                r"(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
                r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
                r"(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
                r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_TEKKEN_SPLIT = (r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
                 r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
                 r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")
SPLIT_RULES = {"qwen2": _QWEN2_SPLIT, "llama-bpe": _LLAMA3_SPLIT, "gpt-4o": _GPT4O_SPLIT,
               "tekken": _TEKKEN_SPLIT}

FAMILIES: Mapping[str, Family] = MappingProxyType({f.name: f for f in (
    Family(
        name="llama", model_types=("llama",), gguf_arch="llama",
        description="Llama 2, Llama 3.x, SmolLM",
        lora_targets=("q_proj", "k_proj", "v_proj", "o_proj"),
        rope_kinds=("default", "linear", "llama3"),
        tensor_layout={"attn_q": PERMUTE_Q, "attn_k": PERMUTE_K},
    ),
    Family(
        name="mistral", model_types=("mistral",), gguf_arch="llama",
        description="Mistral 7B v0.2/v0.3, Mistral Nemo (llama.cpp runs them as llama)",
        lora_targets=("q_proj", "k_proj", "v_proj", "o_proj"),
        rope_kinds=("default",),
        tensor_layout={"attn_q": PERMUTE_Q, "attn_k": PERMUTE_K},
        refusals=(Refusal("an active sliding window (sliding_window < max_position_embeddings) is "
                          "not implemented by llama.cpp's llama graph", _active_window),),
    ),
    Family(
        name="qwen2", model_types=("qwen2",), gguf_arch="qwen2",
        description="Qwen2, Qwen2.5 (YaRN included)",
        lora_targets=("q_proj", "k_proj", "v_proj", "o_proj"),
        rope_kinds=("default", "linear", "yarn"),
        refusals=(Refusal("use_sliding_window=true is not implemented by llama.cpp's qwen2 graph",
                          lambda c: bool(getattr(c, "use_sliding_window", False))),),
    ),
    Family(
        name="qwen3", model_types=("qwen3",), gguf_arch="qwen3",
        description="Qwen3 (per-head q_norm / k_norm)",
        lora_targets=("q_proj", "k_proj", "v_proj", "o_proj"),
        rope_kinds=("default", "linear", "yarn"),
        refusals=(Refusal("use_sliding_window=true is not implemented by llama.cpp's qwen3 graph",
                          lambda c: bool(getattr(c, "use_sliding_window", False))),),
    ),
    Family(
        name="phi3", model_types=("phi3",), gguf_arch="phi3",
        description="Phi-3, Phi-3.5, Phi-4-mini (LongRoPE, partial rotary, fused qkv / gate_up)",
        lora_targets=("qkv_proj", "o_proj"),  # fused: q/k/v/o would silently train o_proj alone
        rope_kinds=("default", "longrope"),
        sliding_window=WINDOW_SINGLE,
    ),
    Family(
        name="gemma3_text", model_types=("gemma3_text",), gguf_arch="gemma3",
        description="Gemma 3 text models (1B; the text model of the larger ones)",
        lora_targets=("q_proj", "k_proj", "v_proj", "o_proj"),
        rope_kinds=("default", "linear"),
        tensor_layout={kind: PLUS_ONE for kind in (
            "attn_norm", "post_attention_norm", "ffn_norm", "post_ffw_norm", "attn_q_norm",
            "attn_k_norm", "output_norm")},
        sliding_window=WINDOW_PATTERN,
        fp16_activation=True,
        refusals=(Refusal("logit soft-capping is not implemented by llama.cpp's gemma3 graph",
                          _softcapped),
                  Refusal("query_pre_attn_scalar != head_dim: llama.cpp scales queries by "
                          "1/sqrt(head_dim)", _query_scalar_differs)),
    ),
)})

# model_types users meet that no entry covers, with what to do instead.
NOT_SUPPORTED: Mapping[str, str] = MappingProxyType({
    "gemma3": "the multimodal Gemma 3 (vision + text); train and convert its text model "
              "(Gemma3ForCausalLM, model_type gemma3_text)",
})

_BY_MODEL_TYPE = {model_type: family for family in FAMILIES.values()
                  for model_type in family.model_types}


def family_of(model_type: Optional[str]) -> Family:
    """The family of a HF ``model_type``; an error listing the supported ones otherwise."""
    if model_type in _BY_MODEL_TYPE:
        return _BY_MODEL_TYPE[model_type]
    supported = ", ".join(sorted(_BY_MODEL_TYPE))
    hint = f": {NOT_SUPPORTED[model_type]}" if model_type in NOT_SUPPORTED else ""
    raise ConfigError(f"unsupported architecture {model_type!r}{hint}; supported: {supported}")
