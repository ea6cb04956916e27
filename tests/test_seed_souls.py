"""Seed-format souls at the seed's own widths (Phi-3.5's 3072, Llama's 4096): built exactly as the
seed builds them (``orthogonal`` on a float32 Linear), moved as training moves them. Their float32
rounding is accepted, their fold is exact, and a matrix that is not a rotation is still refused."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

from zptr.checkpoint import orthogonality_tolerance
from zptr.config import GOLDEN_RATIO
from zptr.convert import convert_model
from zptr.errors import CheckpointError
from zptr.head import rotation_errors
from zptr.runtime.llama import teacher_logits
from zptr.runtime.metrics import compare
from model_fixtures import MIXED_TEXT, build_tokenizer, make_seed_checkpoint, save_tiny_model, seed_rotation

# Wide but shallow: hidden size D with 4 heads of 64, one layer (the soul only cares about D).
WIDE = dict(head_dim=64, num_attention_heads=4, num_key_value_heads=2, intermediate_size=64,
            num_hidden_layers=1)


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("seed-tokenizer")
    build_tokenizer("sentencepiece", directory)
    return directory


@torch.no_grad()
def seed_reference(base, seed, rotation: torch.Tensor, ids: list[int]) -> np.ndarray:
    """The seed's model, built without the converter or our checkpoint reader: PEFT's merge, then
    W (h + sigmoid(alpha) R h) with R the seed's own parametrised matrix."""
    lm = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32),
                                   str(seed)).merge_and_unload()
    h = lm.model(torch.tensor([ids])).last_hidden_state[0].double()
    gate = 1 / (1 + math.exp(-GOLDEN_RATIO))
    return ((h + gate * h @ rotation.double().T) @ lm.lm_head.weight.double().T).numpy()


@pytest.mark.parametrize("hidden", [3072, 4096])
def test_seed_soul_at_full_width_converts_with_fold_parity(hidden, tokenizer_dir, tmp_path):
    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    base = save_tiny_model("llama", tmp_path / "base", tokenizer=tokenizer, hidden_size=hidden, **WIDE)
    module = seed_rotation(hidden, moved=0.02)
    rotation = module.weight.detach()
    error = rotation_errors(rotation)[0]
    print(f"\nD={hidden}: max |R^T R - I| = {error:.3g}, tolerance {orthogonality_tolerance(hidden):.3g}")
    assert 1e-4 < error < orthogonality_tolerance(hidden)  # the old fixed 1e-4 refused it
    seed = make_seed_checkpoint(base, tmp_path / "seed", rotation=module)

    result = convert_model(seed, tmp_path / "model.gguf", "f32", progress=False)
    ids = tokenizer(MIXED_TEXT, add_special_tokens=False).input_ids[:256]
    figures = compare(seed_reference(base, seed, rotation, ids), teacher_logits(result.model_path, ids)[1])
    print(f"D={hidden}: fold parity {figures}")
    assert figures["top1"] == 1.0 and figures["mean_kl"] <= 1e-6


def test_rotation_one_percent_off_is_refused(tokenizer_dir, tmp_path):
    """The same seed soul at D = 3072 scaled by 1.01 (through the parametrisation's base)."""
    hidden = 3072
    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    base = save_tiny_model("llama", tmp_path / "base", tokenizer=tokenizer, hidden_size=hidden, **WIDE)
    module = seed_rotation(hidden, moved=0.02)
    with torch.no_grad():
        module.parametrizations.weight[0].base *= 1.01
    seed = make_seed_checkpoint(base, tmp_path / "seed", rotation=module)
    with pytest.raises(CheckpointError, match=r"not orthogonal \(max \|R\^T R - I\| = 0.02"):
        convert_model(seed, tmp_path / "scaled.gguf", "f32", progress=False)
    assert not (tmp_path / "scaled.gguf").exists()
