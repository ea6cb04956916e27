"""Converter parity on every architecture fixture: llama.cpp on our GGUF vs the PyTorch ZPTR head.

Each checkpoint has alpha = 1.618, a far-from-identity rotation and a LoRA adapter with non-zero
B; the reference merges LoRA with PEFT's own ``merge_and_unload``. Every test also checks that a
converter skipping the merge or the fold would have failed the same threshold.
"""

from __future__ import annotations

import json

import pytest
import torch

from zptr.convert import convert_model
from zptr.app.inspect import describe_gguf
from zptr.formats.gguf import open_gguf, zptr_metadata
from convert_fixtures import (MIXED_TEXT, assert_parity, compare, llama_logits, make_checkpoint,
                              make_seed_checkpoint, reference_model, save_tiny_with_tokenizer,
                              sentencepiece_tokenizer, torch_logits)
from model_fixtures import ARCHITECTURES, save_tiny_model

F32_KL = 1e-6
N_TOKENS = 320


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("convert")


@pytest.fixture(scope="module")
def sp_tokenizer(workdir):
    return sentencepiece_tokenizer(workdir / "sp")


@pytest.fixture(scope="module")
def ids(sp_tokenizer):
    ids = sp_tokenizer(MIXED_TEXT, add_special_tokens=False).input_ids[:N_TOKENS]
    assert len(ids) >= 256
    return ids


@pytest.fixture(scope="module")
def tiny(workdir, sp_tokenizer):
    """arch -> (base dir, checkpoint dir), built once per module."""
    built = {}

    def get(arch):
        if arch not in built:
            base = save_tiny_with_tokenizer(arch, workdir / arch / "base", workdir / "sp")
            built[arch] = base, make_checkpoint(base, workdir / arch / "ckpt")
        return built[arch]

    return get


def _skipped_step_kl(ckpt, base, ids, got):
    """Mean KL llama.cpp output would show against references lacking the merge or the fold."""
    return (compare(torch_logits(reference_model(ckpt, base, merge=False), ids), got)["mean_kl"],
            compare(torch_logits(reference_model(ckpt, base, soul=False), ids), got)["mean_kl"])


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_f32_parity_every_architecture(arch, tiny, ids, workdir):
    base, ckpt = tiny(arch)
    result = convert_model(ckpt, workdir / arch / "model.gguf", "f32", progress=False)
    got = llama_logits(result.model_path, ids)
    figures = compare(torch_logits(reference_model(ckpt, base), ids), got)
    print(arch, figures)
    assert figures["n"] >= 256
    assert_parity(figures, arch)
    without_merge, without_fold = _skipped_step_kl(ckpt, base, ids, got)
    assert without_merge > 100 * F32_KL and without_fold > 100 * F32_KL
    meta = zptr_metadata(open_gguf(result.model_path))
    assert meta["soul.folded"] is True and meta["soul.phase"] == "golden"
    assert meta["omega.sidecar"] == result.sidecar_path.name and result.sidecar_path.is_file()


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_f16_top1(arch, tiny, ids, workdir):
    base, ckpt = tiny(arch)
    result = convert_model(ckpt, workdir / arch / "model-f16.gguf", "f16", progress=False)
    figures = compare(torch_logits(reference_model(ckpt, base), ids),
                      llama_logits(result.model_path, ids, f32_cache=False))
    print("f16", arch, figures)
    assert figures["top1_non_tie"] == 1.0 and figures["mean_kl"] <= 1e-5


@pytest.mark.parametrize("outtype, kl", [("bf16", 1e-3), ("q8_0", 1e-3), ("q4_0", 5e-2)])
def test_other_types_load_and_track(outtype, kl, tiny, ids, workdir):
    base, ckpt = tiny("qwen2")
    result = convert_model(ckpt, workdir / "qwen2" / f"model-{outtype}.gguf", outtype, progress=False)
    figures = compare(torch_logits(reference_model(ckpt, base), ids), llama_logits(result.model_path, ids))
    print(outtype, figures)
    assert figures["mean_kl"] <= kl
    assert describe_gguf(result.model_path)["file_type"] == f"MOSTLY_{outtype.upper()}"


def test_seed_format_dense_rotation(workdir, ids):
    base = save_tiny_with_tokenizer("llama", workdir / "seed" / "base", workdir / "sp")
    seed = make_seed_checkpoint(base, workdir / "seed" / "ckpt")
    result = convert_model(seed, workdir / "seed" / "model.gguf", "f32", base_model=base, progress=False)
    got = llama_logits(result.model_path, ids)
    figures = compare(torch_logits(reference_model(seed, base), ids), got)
    assert figures["top1"] == 1.0 and figures["mean_kl"] <= F32_KL
    assert result.sidecar_path is None  # seed checkpoints carry no Omega router
    meta = zptr_metadata(open_gguf(result.model_path))
    assert meta["soul.rotation"] == "dense" and meta["source.step"] == 300


def test_plain_hf_straight_conversion(tiny, ids, workdir):
    base, _ = tiny("llama")  # tied embeddings: llama.cpp reuses token_embd, no output tensor
    result = convert_model(base, workdir / "plain.gguf", "f32", progress=False)
    reader = open_gguf(result.model_path)
    assert "output.weight" not in {t.name for t in reader.tensors}
    assert zptr_metadata(reader)["soul.folded"] is False and result.sidecar_path is None
    figures = compare(torch_logits(reference_model(None, base), ids), llama_logits(result.model_path, ids))
    assert figures["top1"] == 1.0 and figures["mean_kl"] <= F32_KL


def test_export_hf_matches_reference(tiny, ids, workdir):
    from transformers import AutoModelForCausalLM

    base, ckpt = tiny("gemma3_text")
    out = workdir / "gemma-export"
    convert_model(ckpt, workdir / "gemma-export.gguf", "f32", export_hf=out, progress=False)
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is False
    exported = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
    figures = compare(torch_logits(reference_model(ckpt, base), ids), torch_logits(exported, ids))
    assert figures["top1"] == 1.0 and figures["max_abs"] < 1e-3


BYTE_LEVEL = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
SPLIT_THEN_BYTES = [{"type": "Split", "behavior": "Isolated", "invert": False},
                    dict(BYTE_LEVEL, use_regex=False, trim_offsets=False)]


def _pre_tokenizer_spec(name: str) -> dict:
    """A tokenizer.json pre_tokenizer for each llama.cpp pre-tokenizer name the converter knows."""
    from zptr.families import SPLIT_RULES as split

    if name == "gpt-2":
        return BYTE_LEVEL
    if name == "smollm":
        return {"type": "Sequence", "pretokenizers": [{"type": "Digits", "individual_digits": True}, BYTE_LEVEL]}
    steps = [dict(SPLIT_THEN_BYTES[0], pattern={"Regex": split[name]}), SPLIT_THEN_BYTES[1]]
    return {"type": "Sequence", "pretokenizers": steps}


@pytest.mark.parametrize("pre", ["gpt-2", "smollm", "qwen2", "llama-bpe", "gpt-4o", "tekken"])
def test_bpe_pre_tokenizer_table(pre, workdir):
    """The SmolLM2 vocabulary under each recognised pre-tokenizer: llama.cpp, told the name the
    converter picked, splits text exactly like the HF tokenizer (numbers, spaces, newlines, CJK)."""
    from transformers import AutoTokenizer

    from zptr.runtime.llama import open_llama
    from zptr.models import smollm2_hf_dir

    source = smollm2_hf_dir()
    tok_dir = workdir / f"bpe-{pre}"
    tok_dir.mkdir()
    spec = json.loads((source / "tokenizer.json").read_text(encoding="utf-8"))
    spec["pre_tokenizer"] = _pre_tokenizer_spec(pre)
    (tok_dir / "tokenizer.json").write_text(json.dumps(spec), encoding="utf-8")
    (tok_dir / "tokenizer_config.json").write_text((source / "tokenizer_config.json").read_text())
    tokenizer = AutoTokenizer.from_pretrained(str(tok_dir))
    base = save_tiny_model("llama", workdir / f"bpe-{pre}-model", tokenizer=tokenizer)
    result = convert_model(base, workdir / f"bpe-{pre}.gguf", "f32", progress=False)
    assert open_gguf(result.model_path).get_field("tokenizer.ggml.pre").contents() == pre
    llm = open_llama(result.model_path, vocab_only=True)
    texts = [MIXED_TEXT, "Pi is 3.14159265, a year 2024, x=1000000;\n\n   indented   spaces\tand\ttabs  "]
    for text in texts + MIXED_TEXT.splitlines():
        expected = tokenizer(text, add_special_tokens=False).input_ids
        assert llm.tokenize(text.encode(), add_bos=False, special=False) == expected, text


def test_gguf_base_model(tiny, ids, workdir):
    """--base-model a .gguf: transformers dequantises it, its tokenizer keys are carried over.
    (mistral: transformers' GGUF loader does not restore Llama 3.x RoPE factors, so a llama3
    base read back from GGUF is another model in transformers.)"""
    base, ckpt = tiny("mistral")
    base_gguf = convert_model(base, workdir / "mistral-base.gguf", "f32", progress=False).model_path
    result = convert_model(ckpt, workdir / "from-gguf-base.gguf", "f32", base_model=base_gguf, progress=False)
    figures = compare(torch_logits(reference_model(ckpt, base), ids), llama_logits(result.model_path, ids))
    assert figures["top1"] == 1.0 and figures["mean_kl"] <= F32_KL
    tokens = [open_gguf(p).get_field("tokenizer.ggml.tokens").contents() for p in (base_gguf, result.model_path)]
    assert tokens[0] == tokens[1]


def test_lora_scaling_options_match_peft(workdir, ids):
    """rsLoRA and per-module rank/alpha patterns merge with PEFT's own scale."""
    base = save_tiny_with_tokenizer("qwen2", workdir / "lora-options" / "base", workdir / "sp")
    ckpt = make_checkpoint(base, workdir / "lora-options" / "ckpt", omega=False, use_rslora=True,
                           rank_pattern={"k_proj": 8}, alpha_pattern={"v_proj": 32})
    result = convert_model(ckpt, workdir / "lora-options" / "model.gguf", "f32", progress=False)
    figures = compare(torch_logits(reference_model(ckpt, base), ids), llama_logits(result.model_path, ids))
    assert figures["top1"] == 1.0 and figures["mean_kl"] <= F32_KL
