"""Glue for the converter and runtime tests: tokenizer + tiny model in one call, llama.cpp logits.

The builders and references themselves live in :mod:`model_fixtures` (shared with the benchmarks).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from transformers import AutoTokenizer

from zptr.families import FAMILIES
from zptr.runtime.llama import teacher_logits
from zptr.runtime.metrics import compare  # noqa: F401  (re-exported for the tests)
from model_fixtures import (MIXED_TEXT, build_tokenizer, make_checkpoint,  # noqa: F401
                          make_seed_checkpoint, reference_model, save_tiny_model, torch_logits)


def sentencepiece_tokenizer(directory: Path):
    """A SentencePiece tokenizer (``tokenizer.model``) trained on the mixed text."""
    return build_tokenizer("sentencepiece", directory)


def save_tiny_with_tokenizer(arch: str, directory: Path, tokenizer_dir: Path, **overrides) -> Path:
    """A tiny model of ``arch`` whose vocabulary is the tokenizer's in ``tokenizer_dir``."""
    return save_tiny_model(arch, directory, tokenizer=AutoTokenizer.from_pretrained(str(tokenizer_dir)),
                           **overrides)


def llama_logits(gguf_path: Path, ids: list[int], f32_cache: bool = True) -> np.ndarray:
    return teacher_logits(gguf_path, ids, f32_kv=f32_cache)[1]


def assert_parity(figures: dict, family: str, kl: float = 1e-6) -> None:
    """f32 parity: mean KL within ``kl`` and the same top-1 token everywhere — at near-ties
    (top-2 margin < 0.01) too, unless llama.cpp computes the family's activation through a
    float16 table (then rounding may flip a near-tie, and only the clear positions count)."""
    assert figures["mean_kl"] <= kl, figures
    assert figures["top1_non_tie"] == 1.0, figures
    if not FAMILIES[family].fp16_activation:
        assert figures["top1"] == 1.0, figures
