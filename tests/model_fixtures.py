"""Test models and references, built offline: tiny random models of every registry family with a
tokenizer of the family's kind, checkpoints whose every part matters, and the independent
PyTorch references the converter and runtime are compared with.

The test suite and the benchmarks use these (nothing here ships in the package). Nothing here
downloads anything.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from zptr.checkpoint import build_head, load_checkpoint, save_checkpoint
from zptr.config import GOLDEN_RATIO, ZptrConfig
from zptr.dataset import mixed_text_path
from zptr.families import FAMILIES, family_of
from zptr.model import ZptrModel
from zptr.trained_tokenizers import build_tokenizer

MIXED_TEXT = mixed_text_path().read_text(encoding="utf-8")
ARCHITECTURES = tuple(FAMILIES)

# Short prompts of mixed kinds (English, Japanese, code, Q&A) for generation tests and benchmarks.
SAMPLE_PROMPTS = [
    "The capital of France is", "def fibonacci(n):", "東京は日本の", "Once upon a time",
    "The best way to learn a language", "import numpy as np\n", "Dear Sir or Madam,",
    "In 1969, the first", "Water boils at", "Here is a haiku about autumn:",
    "SELECT name FROM", "The mitochondria is", "私の趣味は", "To be or not to be",
    "The quick brown fox", "A recipe for pancakes:", "function add(a, b) {",
    "The theory of relativity", "My favourite colour is", "Q: What is 2+2?\nA:",
]

# ------------------------------------------------------------------------------ tiny models

# The tiny random model of each registry family: HF config overrides of the family's defaults,
# and the kind of tokenizer (zptr.trained_tokenizers) its releases have.
_COMMON = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, max_position_embeddings=1024, bos_token_id=1, eos_token_id=2,
               pad_token_id=0)

TINY_CONFIGS: dict[str, dict[str, Any]] = {
    "llama": dict(_COMMON, tie_word_embeddings=True, rms_norm_eps=1e-5,
                  # Llama 3.x: per-frequency factors (llama.cpp's rope_freqs tensor)
                  rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                                   "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                   "original_max_position_embeddings": 256}),
    # head_dim apart from hidden_size / heads, as in Mistral Nemo
    "mistral": dict(_COMMON, head_dim=32, sliding_window=None, tie_word_embeddings=False,
                    rms_norm_eps=1e-5, rope_theta=1000000.0),
    "qwen2": dict(_COMMON, tie_word_embeddings=False, rms_norm_eps=1e-6),
    "qwen3": dict(_COMMON, head_dim=32, tie_word_embeddings=True, rms_norm_eps=1e-6),
    # Phi-4-mini: LongRoPE on 3/4 of each head, tied embeddings
    "phi3": dict(_COMMON, tie_word_embeddings=True, rms_norm_eps=1e-5,
                 partial_rotary_factor=0.75, original_max_position_embeddings=256,
                 rope_parameters={"rope_type": "longrope", "rope_theta": 10000.0,
                                  "partial_rotary_factor": 0.75,
                                  "original_max_position_embeddings": 256,
                                  "short_factor": [1.0 + 0.1 * i for i in range(6)],
                                  "long_factor": [1.5 + 0.5 * i for i in range(6)]}),
    "gemma3_text": dict(_COMMON, tie_word_embeddings=True, rms_norm_eps=1e-6, head_dim=16,
                        sliding_window=64, query_pre_attn_scalar=16,
                        layer_types=["sliding_attention", "full_attention"]),
}
TINY_TOKENIZERS: dict[str, str] = {
    "llama": "bpe:llama-bpe", "mistral": "sentencepiece-json", "qwen2": "bpe:qwen2", "qwen3": "bpe:qwen2",
    "phi3": "bpe:gpt-4o", "gemma3_text": "sentencepiece",
}


def tiny_config(family: str, vocab_size: int = 512, **overrides):
    from transformers import AutoConfig

    kwargs = dict(TINY_CONFIGS[family], vocab_size=vocab_size, **overrides)
    return AutoConfig.for_model(FAMILIES[family].model_types[0], **kwargs)


def tiny_model(family: str, vocab_size: int = 512, seed: int = 0, **overrides):
    """A float32 causal LM with random weights (norm weights randomised too, so they matter)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(family, vocab_size, **overrides),
                                             dtype=torch.float32)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.add_(torch.randn_like(param) * 0.1)
    return model.eval()


def save_tiny_model(family: str, directory: Path, tokenizer=None, vocab_size: Optional[int] = None,
                    seed: int = 0, **overrides) -> Path:
    """Write a tiny model (and a tokenizer, when given) as a HF directory. With a tokenizer the
    vocabulary and the bos / eos / pad ids are the tokenizer's."""
    if tokenizer is not None:
        vocab_size = vocab_size or len(tokenizer)
        for name in ("bos", "eos", "pad"):
            overrides.setdefault(f"{name}_token_id", getattr(tokenizer, f"{name}_token_id"))
    model = tiny_model(family, vocab_size or 512, seed, **overrides)
    directory = Path(directory)
    model.save_pretrained(str(directory))
    if tokenizer is not None:
        tokenizer.save_pretrained(str(directory))
        source = Path(tokenizer.name_or_path)
        if (source / "tokenizer.model").is_file():  # transformers saves only what it loaded from
            shutil.copy2(source / "tokenizer.model", directory / "tokenizer.model")
    return directory


def save_family_fixture(family: str, directory: Path, seed: int = 0, **overrides) -> Path:
    """A tiny model of ``family`` with a tokenizer of the family's kind: a complete HF directory."""
    directory = Path(directory)
    tokenizer = build_tokenizer(TINY_TOKENIZERS[family], directory / "tokenizer")
    return save_tiny_model(family, directory / "model", tokenizer=tokenizer, seed=seed, **overrides)


# ------------------------------------------------------------------------------ checkpoints


def make_checkpoint(base_dir: Path, out_dir: Path, rotation: str = "so8", omega: bool = True,
                    seed: int = 0, lora_alpha: int = 8, **lora_options) -> Path:
    """A checkpoint whose every part matters: alpha = 1.618, a far-from-identity rotation, a LoRA
    adapter with random non-zero B, and (optionally) an Omega router with a large gate.
    ``lora_options`` go to PEFT's LoraConfig (use_rslora, rank_pattern, ...)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    base = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32)
    family = family_of(base.config.model_type)
    lora = LoraConfig(r=4, lora_alpha=lora_alpha, lora_dropout=0.0, target_modules=list(family.lora_targets),
                      init_lora_weights=False, **lora_options)
    peft_model = get_peft_model(base, lora)
    with torch.no_grad():  # PEFT's random init of B is tiny; scale it so the merge moves logits
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.05)
    config = ZptrConfig(hidden_size=base.config.hidden_size, rotation=rotation)
    config.omega.enabled = omega
    zm = ZptrModel(peft_model, config)
    with torch.no_grad():
        zm.set_alpha(GOLDEN_RATIO)
        if rotation == "so8":
            zm.head.soul.rotation.generator.normal_(0, 0.5)
        if zm.head.omega is not None:
            zm.head.omega.gate.fill_(0.0)
    return save_checkpoint(out_dir, zm.head, base_model=str(Path(base_dir).resolve()),
                           architecture=family.name, step=450, adapter_writer=peft_model.save_pretrained)


def seed_rotation(hidden: int, moved: float = 0.02, seed: int = 1) -> torch.nn.Module:
    """The seed's soul rotation built its way (``orthogonal`` on a float32 bias-free Linear),
    moved away from its initial rotation as training moves it: each entry of the generator by
    about ``moved`` (a few hundred AdamW steps at lr 2e-4 move entries by ~0.01-0.02)."""
    torch.manual_seed(seed)
    rotation = torch.nn.utils.parametrizations.orthogonal(torch.nn.Linear(hidden, hidden, bias=False))
    with torch.no_grad():
        original = rotation.parametrizations.weight.original
        original.add_(torch.randn_like(original) * moved)
    return rotation


def make_seed_checkpoint(base_dir: Path, out_dir: Path, seed: int = 1, moved: float = 0.02,
                         rotation: Optional[torch.nn.Module] = None) -> Path:
    """A seed-format directory: the PEFT adapter plus ``soul.pt`` with a dense orthogonal rotation."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    base = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32)
    family = family_of(base.config.model_type)
    peft_model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=list(family.lora_targets),
                                                 init_lora_weights=False))
    out_dir = Path(out_dir)
    peft_model.save_pretrained(str(out_dir))
    rotation = rotation if rotation is not None else seed_rotation(base.config.hidden_size, moved, seed)
    torch.save({"alpha": torch.tensor(GOLDEN_RATIO), "so8_rotation": rotation.state_dict(), "step": 300},
               out_dir / "soul.pt")
    return out_dir


# ------------------------------------------------------------------------------ references


def reference_model(checkpoint_dir: Optional[Path], base_dir: Path, merge: bool = True,
                    soul: bool = True, omega: bool = False) -> torch.nn.Module:
    """PyTorch ground truth, built independently of the converter: PEFT's own merge_and_unload,
    then the ZPTR head (the hook applies Omega, when asked, and the soul before the untouched
    lm_head). ``merge=False`` / ``soul=False`` build what a converter skipping that step would
    match."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32)
    merged = base
    if checkpoint_dir is not None and merge and (Path(checkpoint_dir) / "adapter_config.json").exists():
        merged = PeftModel.from_pretrained(base, str(checkpoint_dir)).merge_and_unload()
    if checkpoint_dir is None or not soul:
        return merged.eval()
    ckpt = load_checkpoint(checkpoint_dir)
    config = ZptrConfig.from_dict(ckpt.config.to_dict())
    config.omega.enabled = omega and ckpt.config.omega.enabled
    zm = ZptrModel(merged, config)
    zm.head.load_state_dict(build_head(ckpt).state_dict(), strict=False)
    return zm.eval()


@torch.no_grad()
def torch_logits(model: torch.nn.Module, ids: list[int]) -> np.ndarray:
    return model(torch.tensor([ids])).logits[0].double().numpy()
