"""Small tokenizers of the kinds model families use, trained offline on the bundled mixed text.

A kind is ``sentencepiece`` (no dummy prefix, as Gemma), ``sentencepiece-json`` (a fast
tokenizer saved as tokenizer.json only, as Mistral) or ``bpe:<pre>`` (byte-level BPE with
llama.cpp's pre-tokenizer ``<pre>``); each carries its family's special tokens and chat
template. The synthetic models (:data:`zptr.models.SYNTHETIC_MODELS`) and the test suite's tiny
models use them. Nothing here downloads anything.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from .dataset import mixed_text_path
from .families import SPLIT_RULES


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

# Tokenizer kind -> the chat markup a tokenizer of that kind carries.
CHAT_MARKUP: dict[str, ChatMarkup] = {
    "sentencepiece": _GEMMA, "sentencepiece-json": _MISTRAL, "bpe:llama-bpe": _LLAMA3,
    "bpe:qwen2": _CHATML, "bpe:gpt-4o": _PHI, "bpe:smollm": _CHATML, "bpe:gpt-2": _CHATML,
    "bpe:tekken": _MISTRAL,
}


def _lines() -> list[str]:
    text = mixed_text_path().read_text(encoding="utf-8")
    return [line for line in text.splitlines() if line.strip()] * 4


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
        raise ValueError(f"no tokenizer kind {kind!r}; have {', '.join(CHAT_MARKUP)}")
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
