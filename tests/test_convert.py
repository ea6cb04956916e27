"""Converter parity on every architecture fixture: llama.cpp on our GGUF vs the PyTorch ZPTR head.

Each checkpoint has alpha = 1.618, a far-from-identity rotation and a LoRA adapter with non-zero
B; the reference merges LoRA with PEFT's own ``merge_and_unload``. Every test also checks that a
converter skipping the merge or the fold would have failed the same threshold.
"""

from __future__ import annotations

import json

import gguf
import pytest
import torch

from convert import convert_model
from convert.inspect import describe_gguf, open_gguf, zptr_metadata
from convert_fixtures import (MIXED_TEXT, compare, llama_logits, make_checkpoint, make_seed_checkpoint,
                              reference_model, save_tiny_with_tokenizer, sentencepiece_tokenizer, torch_logits)
from zptr.testing import ARCHITECTURES, save_tiny_model

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
            built[arch] = base, make_checkpoint(base, workdir / arch / "ckpt", arch)
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
    assert figures["top1"] == 1.0
    assert figures["mean_kl"] <= F32_KL
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
    assert figures["top1"] == 1.0 and figures["mean_kl"] <= 1e-5


@pytest.mark.parametrize("outtype, kl", [("bf16", 1e-3), ("q8_0", 1e-3), ("q4_0", 5e-2)])
def test_other_types_load_and_track(outtype, kl, tiny, ids, workdir):
    base, ckpt = tiny("qwen2")
    result = convert_model(ckpt, workdir / "qwen2" / f"model-{outtype}.gguf", outtype, progress=False)
    figures = compare(torch_logits(reference_model(ckpt, base), ids), llama_logits(result.model_path, ids))
    print(outtype, figures)
    assert figures["mean_kl"] <= kl
    assert describe_gguf(result.model_path)["file_type"] == f"MOSTLY_{outtype.upper()}"


def test_phi3_longrope_factors(workdir, sp_tokenizer, ids):
    head_dim = 16
    rope = {"rope_type": "longrope", "rope_theta": 10000.0, "original_max_position_embeddings": 512,
            "short_factor": [1.0 + 0.25 * i for i in range(head_dim // 2)],
            "long_factor": [2.0 + 0.5 * i for i in range(head_dim // 2)]}
    base = save_tiny_with_tokenizer("phi3", workdir / "phi3-longrope" / "base", workdir / "sp",
                                    max_position_embeddings=4096, original_max_position_embeddings=512,
                                    rope_parameters=rope)
    ckpt = make_checkpoint(base, workdir / "phi3-longrope" / "ckpt", "phi3", omega=False)
    result = convert_model(ckpt, workdir / "phi3-longrope" / "model.gguf", "f32", progress=False)
    reader = open_gguf(result.model_path)
    assert {t.name for t in reader.tensors} >= {"rope_factors_long.weight", "rope_factors_short.weight"}
    assert reader.get_field("phi3.rope.scaling.original_context_length").contents() == 512
    assert result.sidecar_path is None
    got = llama_logits(result.model_path, ids)
    figures = compare(torch_logits(reference_model(ckpt, base), ids), got)
    print("phi3 longrope", figures)
    assert figures["top1"] == 1.0 and figures["mean_kl"] <= F32_KL


def test_seed_format_dense_rotation(workdir, ids):
    base = save_tiny_with_tokenizer("llama", workdir / "seed" / "base", workdir / "sp")
    seed = make_seed_checkpoint(base, workdir / "seed" / "ckpt", "llama")
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


def test_sentencepiece_tokenization_matches_hf(tiny, sp_tokenizer, workdir):
    from runtime.llama import open_llama

    base, ckpt = tiny("llama")
    path = workdir / "llama" / "model.gguf"
    if not path.exists():
        convert_model(ckpt, path, "f32", progress=False)
    assert open_gguf(path).get_field("tokenizer.ggml.model").contents() == "llama"
    llm = open_llama(path, vocab_only=True)
    # Texts starting with a space are left out: transformers' Metaspace ("prepend first") adds no
    # dummy prefix there while llama.cpp's SentencePiece tokenizer always does.
    lines = [line for line in MIXED_TEXT.splitlines() if line and not line[0].isspace()]
    for text in [MIXED_TEXT, *lines]:
        expected = sp_tokenizer(text, add_special_tokens=False).input_ids
        assert llm.tokenize(text.encode(), add_bos=False, special=False) == expected, text


BYTE_LEVEL = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
SPLIT_THEN_BYTES = [{"type": "Split", "behavior": "Isolated", "invert": False},
                    dict(BYTE_LEVEL, use_regex=False, trim_offsets=False)]


def _pre_tokenizer_spec(name: str) -> dict:
    """A tokenizer.json pre_tokenizer for each llama.cpp pre-tokenizer name the converter knows."""
    from convert.vocab import _LLAMA3_SPLIT, _QWEN2_SPLIT

    split = {"qwen2": _QWEN2_SPLIT, "llama-bpe": _LLAMA3_SPLIT}
    if name == "gpt-2":
        return BYTE_LEVEL
    if name == "smollm":
        return {"type": "Sequence", "pretokenizers": [{"type": "Digits", "individual_digits": True}, BYTE_LEVEL]}
    steps = [dict(SPLIT_THEN_BYTES[0], pattern={"Regex": split[name]}), SPLIT_THEN_BYTES[1]]
    return {"type": "Sequence", "pretokenizers": steps}


@pytest.mark.parametrize("pre", ["gpt-2", "smollm", "qwen2", "llama-bpe"])
def test_bpe_pre_tokenizer_table(pre, workdir):
    """The SmolLM2 vocabulary under each recognised pre-tokenizer: llama.cpp, told the name the
    converter picked, splits text exactly like the HF tokenizer (numbers, spaces, newlines, CJK)."""
    from transformers import AutoTokenizer

    from runtime.llama import open_llama
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
    """--base-model a .gguf: transformers dequantises it, its tokenizer keys are carried over."""
    base, ckpt = tiny("llama")
    base_gguf = convert_model(base, workdir / "llama-base.gguf", "f32", progress=False).model_path
    result = convert_model(ckpt, workdir / "from-gguf-base.gguf", "f32", base_model=base_gguf, progress=False)
    figures = compare(torch_logits(reference_model(ckpt, base), ids), llama_logits(result.model_path, ids))
    assert figures["top1"] == 1.0 and figures["mean_kl"] <= F32_KL
    tokens = [open_gguf(p).get_field("tokenizer.ggml.tokens").contents() for p in (base_gguf, result.model_path)]
    assert tokens[0] == tokens[1]


def test_gemma3_sliding_window_pattern(workdir, ids):
    """A full-attention layer after a sliding one: llama.cpp must take the per-layer pattern from
    the file (its built-in default would make both layers sliding, 64 tokens, and diverge)."""
    base = save_tiny_with_tokenizer("gemma3_text", workdir / "gemma-pattern" / "base", workdir / "sp",
                                    layer_types=["sliding_attention", "full_attention"])
    ckpt = make_checkpoint(base, workdir / "gemma-pattern" / "ckpt", "gemma3_text", omega=False)
    result = convert_model(ckpt, workdir / "gemma-pattern" / "model.gguf", "f32", progress=False)
    figures = compare(torch_logits(reference_model(ckpt, base), ids), llama_logits(result.model_path, ids))
    print("gemma3 pattern", figures)
    assert figures["top1"] == 1.0 and figures["mean_kl"] <= F32_KL


def test_lora_scaling_options_match_peft(workdir, ids):
    """rsLoRA and per-module rank/alpha patterns merge with PEFT's own scale."""
    base = save_tiny_with_tokenizer("qwen2", workdir / "lora-options" / "base", workdir / "sp")
    ckpt = make_checkpoint(base, workdir / "lora-options" / "ckpt", "qwen2", omega=False, use_rslora=True,
                           rank_pattern={"k_proj": 8}, alpha_pattern={"v_proj": 32})
    result = convert_model(ckpt, workdir / "lora-options" / "model.gguf", "f32", progress=False)
    figures = compare(torch_logits(reference_model(ckpt, base), ids), llama_logits(result.model_path, ids))
    assert figures["top1"] == 1.0 and figures["mean_kl"] <= F32_KL
