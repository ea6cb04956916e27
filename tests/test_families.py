"""Every family of the registry, end to end: plain HF -> f32 GGUF parity with transformers,
``zptr train`` -> ``zptr convert`` -> runtime parity with the PyTorch ZPTR head (Omega off and
exact), tokenization by llama.cpp equal to the HF tokenizer for every tokenizer kind, the
end-of-turn tokens llama.cpp stops at, added tokens with resized embeddings, RoPE variants, and
what llama.cpp cannot reproduce refused by name.

Every test is parametrized over the registry itself: a new entry is tested by all of them, and
fails the suite until its fixture passes.
"""

from __future__ import annotations

import json
import re
import shutil
import time
from pathlib import Path

import gguf
import llama_cpp
import numpy as np
import pytest
import torch
from transformers import AutoTokenizer

from zptr.app import cli
from zptr.convert import convert_model
from zptr.errors import ConfigError
from zptr.families import FAMILIES
from zptr.formats.gguf import field_value, open_gguf
from zptr.runtime.engine import ZptrLlama
from zptr.runtime.llama import open_llama, teacher_logits
from zptr.runtime.metrics import compare
from zptr.runtime.reference import TorchReference
from zptr.trained_tokenizers import CHAT_MARKUP
from convert_fixtures import assert_parity
from model_fixtures import (MIXED_TEXT, TINY_CONFIGS, TINY_TOKENIZERS, build_tokenizer, reference_model,
                            save_family_fixture, save_tiny_model, tiny_model, torch_logits)

F32_KL = 1e-6
N_TOKENS = 320
FAMILY_NAMES = list(FAMILIES)
CONVERSION_SECONDS: dict[str, float] = {}


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("families")


@pytest.fixture(scope="module")
def fixture(workdir):
    """family -> (HF directory, tokenizer, token ids of the mixed text), built once."""
    built = {}

    def get(name: str):
        if name not in built:
            base = save_family_fixture(name, workdir / name)
            tokenizer = AutoTokenizer.from_pretrained(str(base))
            ids = tokenizer(MIXED_TEXT, add_special_tokens=False).input_ids[:N_TOKENS]
            assert len(ids) == N_TOKENS
            built[name] = base, tokenizer, ids
        return built[name]

    return get


def test_registry_entries_are_complete():
    model_types = [t for f in FAMILIES.values() for t in f.model_types]
    assert len(model_types) == len(set(model_types))
    for name, family in FAMILIES.items():
        assert family.gguf_arch in gguf.MODEL_ARCH_NAMES.values(), name
        assert TINY_TOKENIZERS[name] in CHAT_MARKUP, name
        assert "default" in family.rope_kinds, name
        linear = {n.rsplit(".", 1)[-1] for n, m in tiny_model(name).named_modules()
                  if isinstance(m, torch.nn.Linear)}
        assert set(family.lora_targets) <= linear, name


def test_every_registry_entry_has_a_tiny_model():
    """The tiny models live with the tests, not in the registry: an entry without one would
    silently escape every parity test."""
    assert set(TINY_CONFIGS) == set(FAMILIES) == set(TINY_TOKENIZERS)


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_plain_hf_f32_parity(family, fixture, workdir):
    base, _, ids = fixture(family)
    started = time.perf_counter()
    result = convert_model(base, workdir / family / "plain.gguf", "f32", progress=False)
    CONVERSION_SECONDS[family] = time.perf_counter() - started
    figures = compare(torch_logits(reference_model(None, base), ids), teacher_logits(result.model_path, ids)[1])
    print(f"\n{family}: plain f32 {figures}, conversion {CONVERSION_SECONDS[family]:.2f} s")
    assert_parity(figures, family)
    assert field_value(open_gguf(result.model_path), gguf.Keys.General.ARCHITECTURE) == FAMILIES[family].gguf_arch


def _train(base: Path, out: Path) -> Path:
    code = cli.main(["train", "--base-model", str(base), "--output-dir", str(out), "--max-steps", "4",
                     "--warmup-steps", "1", "--annealing-steps", "2", "--max-length", "48",
                     "--batch-size", "2", "--save-steps", "4", "--no-progress"])
    assert code == 0
    return out / "step_000004"


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_train_convert_runtime_parity(family, fixture, workdir):
    """4 steps of ``zptr train``, ``zptr convert``, then llama.cpp against the PyTorch ZPTR head:
    Omega off (the folded GGUF alone) and Omega exact (GGUF + sidecar, routes included)."""
    base, tokenizer, ids = fixture(family)
    checkpoint = _train(base, workdir / family / "run")
    out = workdir / family / "trained.gguf"
    assert cli.main(["convert", str(checkpoint), "--outfile", str(out), "--outtype", "f32", "--no-progress"]) == 0

    off = compare(torch_logits(reference_model(checkpoint, base), ids), teacher_logits(out, ids)[1])
    print(f"\n{family}: trained, Omega off {off}")
    assert_parity(off, family)

    reference = TorchReference(reference_model(checkpoint, base, omega=True), tokenizer)
    torch_out, torch_routes = reference.teacher_forced(ids)
    runtime = ZptrLlama(out, omega="exact", f32_kv=True, n_ctx=len(ids) + 16, n_batch=len(ids) + 16)
    try:
        llama_out, llama_routes, margins = runtime.teacher_forced(ids)
    finally:
        runtime.close()
    exact = compare(torch_out, llama_out)
    clear = margins > 1e-3  # a route decided by a score within 1e-3 of its threshold may flip
    print(f"{family}: trained, Omega exact {exact}; routes {np.bincount(llama_routes, minlength=4)}")
    assert_parity(exact, family)
    assert clear.mean() > 0.9
    np.testing.assert_array_equal(torch_routes[clear], llama_routes[clear])


# ------------------------------------------------------------------------------ tokenizers

TOKENIZER_KINDS = sorted(CHAT_MARKUP)
TEXTS = [MIXED_TEXT, "Pi is 3.14159265, a year 2024, x=1000000;\n\n   indented   spaces\tand\ttabs  ",
         "emoji 🌊🐙✨ and 絵文字 😊", *MIXED_TEXT.splitlines()]


@pytest.mark.parametrize("kind", TOKENIZER_KINDS)
def test_tokenization_matches_hf(kind, workdir):
    """llama.cpp on our GGUF tokenizes exactly as the HF tokenizer, special tokens included, and
    stops at the kind's end-of-turn token; the chat template travels in the GGUF."""
    directory = workdir / f"tok-{kind.replace(':', '-')}"
    tokenizer = build_tokenizer(kind, directory / "tokenizer")
    base = save_tiny_model("llama", directory / "model", tokenizer=tokenizer)
    result = convert_model(base, directory / "model.gguf", "f32", progress=False)
    reader = open_gguf(result.model_path)
    expected_model = "gpt2" if kind.startswith("bpe:") else "llama"
    assert field_value(reader, gguf.Keys.Tokenizer.MODEL) == expected_model
    if kind.startswith("bpe:"):
        assert field_value(reader, gguf.Keys.Tokenizer.PRE) == kind.split(":", 1)[1]
    assert field_value(reader, gguf.Keys.Tokenizer.CHAT_TEMPLATE) == CHAT_MARKUP[kind].template
    llm = open_llama(result.model_path, vocab_only=True)
    markup = CHAT_MARKUP[kind]
    prefixed = bool(field_value(reader, gguf.Keys.Tokenizer.ADD_PREFIX, False))
    # With a dummy prefix (Llama 2 / Mistral style), llama.cpp's SentencePiece tokenizer puts a ▁
    # before the text and after every special token, transformers' Metaspace ("prepend first")
    # only at the very start: texts that start with a space or continue after a special token
    # differ by that ▁ in llama.cpp itself. Gemma-style models (no prefix) match everywhere.
    special_text = (f"hello world{markup.end_of_turn}" if prefixed
                    else f"{markup.specials[-1]}hello{markup.end_of_turn}\nworld")
    for text in TEXTS + [special_text]:
        if prefixed and text[:1].isspace():
            continue
        expected = tokenizer(text, add_special_tokens=False).input_ids
        assert llm.tokenize(text.encode(), add_bos=False, special=True) == expected, text
    end_of_turn = tokenizer.convert_tokens_to_ids(markup.end_of_turn)
    assert llama_cpp.llama_vocab_is_eog(llm._model.vocab, end_of_turn), markup.end_of_turn


def test_added_tokens_and_resized_embeddings(workdir):
    """Tokens added during fine-tuning (special and plain) keep their ids; embedding rows past the
    tokenizer (resized to a multiple of 64) become unused placeholders."""
    directory = workdir / "added"
    tokenizer = build_tokenizer("sentencepiece", directory / "tokenizer")
    tokenizer.add_tokens(["<|persona|>", "lighthouse-keeper"])
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|tool|>"]})
    tokenizer.save_pretrained(str(directory / "tokenizer"))
    padded = -(-len(tokenizer) // 64) * 64
    assert padded > len(tokenizer)
    base = save_tiny_model("llama", directory / "model", tokenizer=tokenizer, vocab_size=padded)
    ids_text = "<|persona|> the lighthouse-keeper wrote <|tool|> 灯台 😊"
    result = convert_model(base, directory / "model.gguf", "f32", progress=False)
    reader = open_gguf(result.model_path)
    tokens = field_value(reader, gguf.Keys.Tokenizer.LIST)
    types = field_value(reader, gguf.Keys.Tokenizer.TOKEN_TYPE)
    assert len(tokens) == padded
    for text, kind in (("<|persona|>", gguf.TokenType.USER_DEFINED), ("<|tool|>", gguf.TokenType.CONTROL)):
        assert types[tokenizer.convert_tokens_to_ids(text)] == kind
    assert all(t == gguf.TokenType.UNUSED for t in types[len(tokenizer):])
    llm = open_llama(result.model_path, vocab_only=True)
    assert llm.tokenize(ids_text.encode(), add_bos=False, special=True) == \
        tokenizer(ids_text, add_special_tokens=False).input_ids
    ids = tokenizer(MIXED_TEXT, add_special_tokens=False).input_ids[:200]
    assert_parity(compare(torch_logits(reference_model(None, base), ids), teacher_logits(result.model_path, ids)[1]),
                  "llama")


# ------------------------------------------------------------------------------ RoPE variants

ROPE_VARIANTS = {
    "qwen2-yarn": ("qwen2", {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 128,
                             "rope_theta": 10000.0}),
    "qwen2-yarn-explicit": ("qwen2", {"rope_type": "yarn", "factor": 4.0, "rope_theta": 10000.0,
                                      "original_max_position_embeddings": 128, "attention_factor": 1.3,
                                      "beta_fast": 16.0, "beta_slow": 2.0}),
    "qwen3-yarn": ("qwen3", {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 128,
                             "rope_theta": 1000000.0}),
    "llama-linear": ("llama", {"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0}),
}


@pytest.mark.parametrize("variant", sorted(ROPE_VARIANTS))
def test_rope_variants(variant, workdir):
    """Each RoPE kind reproduced by llama.cpp — and the parity is not vacuous: the same weights
    without the scaling give other logits."""
    family, rope = ROPE_VARIANTS[variant]
    base = save_family_fixture(family, workdir / variant, rope_parameters=rope, max_position_embeddings=512)
    ids = AutoTokenizer.from_pretrained(str(base))(MIXED_TEXT, add_special_tokens=False).input_ids[:N_TOKENS]
    result = convert_model(base, workdir / variant / "model.gguf", "f32", progress=False)
    got = teacher_logits(result.model_path, ids)[1]
    scaled = compare(torch_logits(reference_model(None, base), ids), got)
    assert_parity(scaled, family)
    unscaled = workdir / variant / "unscaled"
    shutil.copytree(base, unscaled)
    config = json.loads((unscaled / "config.json").read_text())
    config["rope_parameters"] = {"rope_type": "default", "rope_theta": rope["rope_theta"]}
    (unscaled / "config.json").write_text(json.dumps(config))
    assert compare(torch_logits(reference_model(None, unscaled), ids), got)["max_abs"] > 100 * scaled["max_abs"]


def test_llama3_factors_matter(fixture, workdir):
    """The llama fixture's Llama 3.x RoPE: without llama.cpp's rope_freqs tensor the logits differ."""
    base, _, ids = fixture("llama")
    result = convert_model(base, workdir / "llama" / "llama3.gguf", "f32", progress=False)
    assert "rope_freqs.weight" in {t.name for t in open_gguf(result.model_path).tensors}
    default = workdir / "llama" / "no-llama3"
    shutil.copytree(base, default)
    config = json.loads((default / "config.json").read_text())
    config["rope_parameters"] = {"rope_type": "default", "rope_theta": 500000.0}
    (default / "config.json").write_text(json.dumps(config))
    got = teacher_logits(result.model_path, ids)[1]
    with_factors = compare(torch_logits(reference_model(None, base), ids), got)
    assert compare(torch_logits(reference_model(None, default), ids), got)["max_abs"] > 100 * with_factors["max_abs"]


# ------------------------------------------------------------------------------ refusals

REFUSED = {
    "llama-yarn": ("llama", {"rope_parameters": {"rope_type": "yarn", "factor": 2.0, "rope_theta": 1e4,
                                                 "original_max_position_embeddings": 512}},
                   r"RoPE type 'yarn' is not supported by llama.cpp's llama graph; supported: default, linear, llama3"),
    "qwen2-dynamic": ("qwen2", {"rope_parameters": {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 1e4}},
                      r"RoPE type 'dynamic'.*supported: default, linear, yarn"),
    "mistral-window": ("mistral", {"sliding_window": 128}, r"active sliding window"),
    "qwen2-window": ("qwen2", {"use_sliding_window": True, "sliding_window": 128}, r"use_sliding_window"),
    "gemma3-softcap": ("gemma3_text", {"final_logit_softcapping": 30.0}, r"soft-capping"),
}


@pytest.mark.parametrize("case", sorted(REFUSED))
def test_unreproducible_configs_refused(case, workdir, capsys):
    family, overrides, message = REFUSED[case]
    base = save_tiny_model(family, workdir / f"refused-{case}", **overrides)
    out = workdir / f"refused-{case}.gguf"
    capsys.readouterr()
    code = cli.main(["convert", str(base), "--outfile", str(out), "--outtype", "f32", "--no-progress"])
    err = capsys.readouterr().err
    assert code == 1 and len(err.strip().splitlines()) == 1, err
    assert re.search(message, err), err
    assert not out.exists()


def test_unknown_and_multimodal_families_refused(workdir, capsys):
    for model_type, hint in (("gpt2", ""), ("gemma3", "multimodal Gemma 3")):
        directory = workdir / f"type-{model_type}"
        directory.mkdir()
        (directory / "config.json").write_text(json.dumps({"model_type": model_type}))
        capsys.readouterr()
        code = cli.main(["convert", str(directory), "--outfile", str(directory / "x.gguf"), "--no-progress"])
        err = capsys.readouterr().err
        assert code == 1 and f"unsupported architecture '{model_type}'" in err and hint in err
        assert "supported: gemma3_text, llama, mistral, phi3, qwen2, qwen3" in err
    with pytest.raises(ConfigError, match="unsupported architecture"):
        convert_model(workdir / "type-gpt2", workdir / "y.gguf", "f32")


# PEFT says that it saves the resized embedding: the case this test builds on purpose.
@pytest.mark.filterwarnings("ignore:Setting `save_embedding_layers` to `True`:UserWarning")
def test_tokens_added_during_fine_tuning_with_modules_to_save(workdir):
    """The usual PEFT recipe for new tokens: add them, resize the embeddings, train LoRA with
    modules_to_save=[embed_tokens, lm_head], save the tokenizer with the adapter. The converter
    takes the resized matrices from the adapter and the tokenizer from the checkpoint; the
    original base stays as it was."""
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM

    from model_fixtures import seed_rotation

    directory = workdir / "modules-to-save"
    tokenizer = build_tokenizer("sentencepiece", directory / "tokenizer")
    base = save_tiny_model("qwen2", directory / "base", tokenizer=tokenizer)
    tokenizer.add_tokens(["<|persona|>"])
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|tool|>"]})
    torch.manual_seed(0)
    resized = AutoModelForCausalLM.from_pretrained(str(base))
    resized.resize_token_embeddings(len(tokenizer))
    peft = get_peft_model(resized, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                              modules_to_save=["embed_tokens", "lm_head"], init_lora_weights=False))
    with torch.no_grad():  # fine-tuning moved the new rows and the LoRA product
        for name, param in peft.named_parameters():
            if "modules_to_save" in name or "lora_B" in name:
                param.add_(torch.randn_like(param) * 0.05)
    seed = directory / "seed"
    peft.save_pretrained(str(seed))
    tokenizer.save_pretrained(str(seed))
    rotation = seed_rotation(64, moved=0.3)
    torch.save({"alpha": torch.tensor(1.618), "so8_rotation": rotation.state_dict(), "step": 7}, seed / "soul.pt")

    result = convert_model(seed, directory / "model.gguf", "f32", base_model=base, progress=False)
    text = "<|persona|> the harbour log <|tool|> wind 14 knots 灯台"
    ids = tokenizer(text + " " + MIXED_TEXT, add_special_tokens=False).input_ids[:200]
    assert {tokenizer.convert_tokens_to_ids("<|persona|>"), tokenizer.convert_tokens_to_ids("<|tool|>")} <= set(ids)
    reference_lm = AutoModelForCausalLM.from_pretrained(str(base))
    reference_lm.resize_token_embeddings(len(tokenizer))
    merged = PeftModel.from_pretrained(reference_lm, str(seed)).merge_and_unload().eval()
    with torch.no_grad():
        h = merged.model(torch.tensor([ids])).last_hidden_state[0].double()
        gate = 1 / (1 + np.exp(-1.618))
        reference = ((h + gate * h @ rotation.weight.double().T) @ merged.lm_head.weight.double().T).numpy()
    assert_parity(compare(reference, teacher_logits(result.model_path, ids)[1]), "qwen2")
    llm = open_llama(result.model_path, vocab_only=True)
    assert (llm.tokenize(text.encode(), add_bos=False, special=True)
            == tokenizer(text, add_special_tokens=False).input_ids)
