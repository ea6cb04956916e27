"""Test models and references, built offline from the registry: tiny random models of every
family with a tokenizer of the family's kind, checkpoints whose every part matters, and the
independent PyTorch references the converter and runtime are compared with.

Used by the test suite and the benchmarks (it ships with the package, as transformers ships
``testing_utils``). Nothing here downloads anything.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from .checkpoint import build_head, load_checkpoint, save_checkpoint
from .config import GOLDEN_RATIO, ZptrConfig
from .dataset import mixed_text_path
from .families import FAMILIES, SPLIT_RULES, family_of
from .model import ZptrModel

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


# ------------------------------------------------------------------------------ tokenizers


@dataclass(frozen=True)
class ChatMarkup:
    """The special tokens and chat template a fixture tokenizer carries (as its family's
    releases do), with the token that ends a turn."""

    bos: Optional[str]
    eos: str
    end_of_turn: str
    specials: tuple[str, ...]
    template: str


_LLAMA3 = ChatMarkup(
    "<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>",
    ("<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"),
    "{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
    "{{ m['content'] }}<|eot_id|>{% endfor %}{% if add_generation_prompt %}"
    "<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}")
_CHATML = ChatMarkup(
    None, "<|endoftext|>", "<|im_end|>", ("<|endoftext|>", "<|im_start|>", "<|im_end|>"),
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
_PHI = ChatMarkup(
    None, "<|endoftext|>", "<|end|>", ("<|endoftext|>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"),
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}")
_GEMMA = ChatMarkup(
    "<s>", "</s>", "<end_of_turn>", ("<start_of_turn>", "<end_of_turn>"),
    "{{ bos_token }}{% for m in messages %}<start_of_turn>{{ 'model' if m['role'] == 'assistant' "
    "else m['role'] }}\n{{ m['content'] }}<end_of_turn>\n{% endfor %}"
    "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}")
_MISTRAL = ChatMarkup(
    "<s>", "</s>", "</s>", ("[INST]", "[/INST]"),
    "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}[INST] {{ m['content'] }} "
    "[/INST]{% else %}{{ m['content'] }}{{ eos_token }}{% endif %}{% endfor %}")

# Tokenizer kind (a registry entry's ``tiny_tokenizer``) -> the chat markup its fixture carries.
CHAT_MARKUP: dict[str, ChatMarkup] = {
    "sentencepiece": _GEMMA, "sentencepiece-json": _MISTRAL, "bpe:llama-bpe": _LLAMA3,
    "bpe:qwen2": _CHATML, "bpe:gpt-4o": _PHI, "bpe:smollm": _CHATML, "bpe:gpt-2": _CHATML,
    "bpe:tekken": _MISTRAL,
}


def _lines() -> list[str]:
    return [line for line in MIXED_TEXT.splitlines() if line.strip()] * 4


def _sentencepiece(directory: Path, vocab_size: int, dummy_prefix: bool) -> None:
    """A byte-fallback SentencePiece BPE model trained on the mixed text: ``tokenizer.model``.
    ``dummy_prefix``: a ``▁`` before the text, as Llama 2 and Mistral have; Gemma has none."""
    import sentencepiece as spm

    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(_lines()), model_prefix=str(directory / "sp"), vocab_size=vocab_size,
        model_type="bpe", byte_fallback=True, character_coverage=1.0, unk_id=0, bos_id=1, eos_id=2,
        pad_id=-1, add_dummy_prefix=dummy_prefix, minloglevel=2)
    (directory / "sp.model").rename(directory / "tokenizer.model")
    (directory / "sp.vocab").unlink()
    # transformers' Gemma tokenizer honours a model without the dummy prefix; its Llama one adds it
    (directory / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "LlamaTokenizer" if dummy_prefix else "GemmaTokenizer", "bos_token": "<s>",
         "eos_token": "</s>", "unk_token": "<unk>"}))


def _byte_level_bpe(directory: Path, pre: str, markup: ChatMarkup, vocab_size: int) -> None:
    """A byte-level BPE trained on the mixed text with llama.cpp's pre-tokenizer ``pre``."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=pre == "gpt-2")
    if pre in SPLIT_RULES:
        tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Split(Regex(SPLIT_RULES[pre]), behavior="isolated"), byte_level])
    elif pre == "smollm":
        tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)])
    else:
        tokenizer.pre_tokenizer = byte_level
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(markup.specials),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tokenizer.train_from_iterator(_lines(), trainer)
    wrapped = PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token=markup.bos,
                                      eos_token=markup.eos, pad_token=markup.eos)
    wrapped.save_pretrained(str(directory))


def build_tokenizer(kind: str, directory: Path, vocab_size: int = 480):
    """A tokenizer of ``kind`` (see :data:`CHAT_MARKUP`) saved in ``directory``, with its chat
    template and special tokens; returns it loaded back through transformers."""
    from transformers import AutoTokenizer

    if kind not in CHAT_MARKUP:
        raise ValueError(f"no tokenizer fixture for {kind!r}; have {', '.join(CHAT_MARKUP)}")
    markup = CHAT_MARKUP[kind]
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    if kind.startswith("bpe:"):
        _byte_level_bpe(directory, kind.split(":", 1)[1], markup, vocab_size + 120)
    else:
        _sentencepiece(directory, vocab_size, dummy_prefix=kind == "sentencepiece-json")
    tokenizer = AutoTokenizer.from_pretrained(str(directory))
    if not kind.startswith("bpe:"):  # SentencePiece: the chat markup comes as added tokens
        tokenizer.add_special_tokens({"additional_special_tokens": list(markup.specials)})
    tokenizer.chat_template = markup.template
    tokenizer.save_pretrained(str(directory))
    if kind == "sentencepiece-json":  # what a fast tokenizer alone saves: tokenizer.json only
        (directory / "tokenizer.model").unlink(missing_ok=True)
        spec = json.loads((directory / "tokenizer.json").read_text(encoding="utf-8"))
        if not (spec["model"]["type"] == "BPE" and spec["model"].get("byte_fallback")):
            raise RuntimeError("transformers did not save a SentencePiece-style BPE tokenizer.json")
    return AutoTokenizer.from_pretrained(str(directory))


# ------------------------------------------------------------------------------ tiny models


def tiny_config(family: str, vocab_size: int = 512, **overrides):
    from transformers import AutoConfig

    entry = FAMILIES[family]
    kwargs = dict(entry.tiny, vocab_size=vocab_size, **overrides)
    return AutoConfig.for_model(entry.model_types[0], **kwargs)


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
    tokenizer = build_tokenizer(FAMILIES[family].tiny_tokenizer, directory / "tokenizer")
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
