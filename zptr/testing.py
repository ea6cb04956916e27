"""Tiny random-weight models of every supported architecture, for tests and quick experiments.

Each one exercises its family's layout quirks (Phi-3's fused projections, Qwen2's attention
biases, Gemma 3's extra norms and scaled embeddings, tied vs untied heads) in a few MB.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch

# Shared by all four: small enough to run in milliseconds, hidden size divisible by 8.
_COMMON = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, max_position_embeddings=1024,
               bos_token_id=1, eos_token_id=2, pad_token_id=0)

TINY_CONFIGS: dict[str, dict] = {
    "llama": dict(_COMMON, tie_word_embeddings=True, rms_norm_eps=1e-5),
    "qwen2": dict(_COMMON, tie_word_embeddings=False, rms_norm_eps=1e-6),
    "phi3": dict(_COMMON, tie_word_embeddings=False, rms_norm_eps=1e-5),
    "gemma3_text": dict(_COMMON, tie_word_embeddings=True, rms_norm_eps=1e-6, head_dim=16,
                        sliding_window=64, query_pre_attn_scalar=16),
}
ARCHITECTURES = tuple(TINY_CONFIGS)

# Short prompts of mixed kinds (English, Japanese, code, Q&A) for generation tests and benchmarks.
SAMPLE_PROMPTS = [
    "The capital of France is", "def fibonacci(n):", "東京は日本の", "Once upon a time",
    "The best way to learn a language", "import numpy as np\n", "Dear Sir or Madam,",
    "In 1969, the first", "Water boils at", "Here is a haiku about autumn:",
    "SELECT name FROM", "The mitochondria is", "私の趣味は", "To be or not to be",
    "The quick brown fox", "A recipe for pancakes:", "function add(a, b) {",
    "The theory of relativity", "My favourite colour is", "Q: What is 2+2?\nA:",
]


def tiny_config(architecture: str, vocab_size: int = 512, **overrides):
    from transformers import AutoConfig

    if architecture not in TINY_CONFIGS:
        raise ValueError(f"no tiny config for {architecture!r}; have {ARCHITECTURES}")
    kwargs = dict(TINY_CONFIGS[architecture], vocab_size=vocab_size, **overrides)
    return AutoConfig.for_model(architecture, **kwargs)


def tiny_model(architecture: str, vocab_size: int = 512, seed: int = 0, **overrides):
    """A float32 causal LM with random weights (norm weights randomised too, so they matter)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(architecture, vocab_size, **overrides),
                                             dtype=torch.float32)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.add_(torch.randn_like(param) * 0.1)
    return model.eval()


def save_tiny_model(architecture: str, directory: Path, tokenizer=None, vocab_size: Optional[int] = None,
                    seed: int = 0, **overrides) -> Path:
    """Write a tiny model (and a tokenizer, when given) as a HF directory."""
    if vocab_size is None:
        vocab_size = len(tokenizer) if tokenizer is not None else 512
    model = tiny_model(architecture, vocab_size, seed, **overrides)
    directory = Path(directory)
    model.save_pretrained(str(directory))
    if tokenizer is not None:
        tokenizer.save_pretrained(str(directory))
    return directory
