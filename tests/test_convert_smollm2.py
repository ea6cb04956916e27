"""The real SmolLM2-135M (BPE, tied embeddings): parity, tokenization, q4_k_m folded vs unfolded,
and a folded GGUF that plain llama-cpp-python runs with no zptr code at all."""

from __future__ import annotations

import subprocess
import sys

import pytest

from zptr.convert import convert_model
from zptr.convert.hf_export import export_hf
from zptr.formats.gguf import open_gguf
from zptr.convert.merge import LoraAdapter, MergedModel, SafetensorsWeights
from convert_fixtures import MIXED_TEXT, compare, llama_logits, make_checkpoint, reference_model, torch_logits
from zptr.runtime.reference import unfolded_soul_logits
from zptr.models import smollm2_hf_dir

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smol(tmp_path_factory):
    """(workdir, base dir, checkpoint dir, token ids of the mixed text)."""
    from zptr.models import load_tokenizer

    work = tmp_path_factory.mktemp("smollm2")
    base = smollm2_hf_dir()
    ckpt = make_checkpoint(base, work / "ckpt")
    ids = load_tokenizer(base)(MIXED_TEXT, add_special_tokens=False).input_ids
    assert len(ids) >= 256
    return work, base, ckpt, ids


@pytest.fixture(scope="module")
def reference(smol):
    work, base, ckpt, ids = smol
    return torch_logits(reference_model(ckpt, base), ids)


def test_f32_and_f16_parity(smol, reference):
    work, base, ckpt, ids = smol
    f32 = convert_model(ckpt, work / "smol-f32.gguf", "f32", progress=False)
    figures = compare(reference, llama_logits(f32.model_path, ids))
    print("smollm2 f32", figures)
    assert figures["top1"] == 1.0 and figures["mean_kl"] <= 1e-5
    f16 = convert_model(ckpt, work / "smol-f16.gguf", "f16", progress=False)
    figures = compare(reference, llama_logits(f16.model_path, ids))
    print("smollm2 f16", figures)
    # f16 weights may flip near-ties (top-2 margin < 0.01) against a float32 reference; nothing else.
    assert figures["top1_non_tie"] == 1.0 and figures["top1"] >= 0.99 and figures["mean_kl"] <= 2e-5


def test_bpe_tokenization_matches_hf(smol):
    from zptr.runtime.llama import open_llama
    from zptr.models import load_tokenizer

    work, base, ckpt, ids = smol
    path = work / "smol-f16.gguf"
    if not path.exists():
        convert_model(ckpt, path, "f16", progress=False)
    reader = open_gguf(path)
    assert reader.get_field("tokenizer.ggml.model").contents() == "gpt2"
    assert reader.get_field("tokenizer.chat_template") is not None
    tokenizer = load_tokenizer(base)
    llm = open_llama(path, vocab_only=True)
    for text in [MIXED_TEXT, *MIXED_TEXT.splitlines(), "<|im_start|>user\nhi 👋<|im_end|>"]:
        expected = tokenizer(text, add_special_tokens=False).input_ids
        assert llm.tokenize(text.encode(), add_bos=False, special=True) == expected, text


def test_plain_llama_cpp_runs_folded_gguf(smol):
    """A fresh interpreter that imports only llama_cpp loads and generates from our file."""
    work, base, ckpt, ids = smol
    path = work / "smol-f16.gguf"
    if not path.exists():
        convert_model(ckpt, path, "f16", progress=False)
    script = (
        "import sys, llama_cpp\n"
        f"llm = llama_cpp.Llama({str(path)!r}, n_ctx=256, verbose=False)\n"
        "out = llm.create_chat_completion([{'role': 'user', 'content': 'Say hello.'}], max_tokens=8)\n"
        "assert out['choices'][0]['message']['content'] is not None\n"
        "assert not any(m.split('.')[0] in ('zptr', 'convert', 'runtime') for m in sys.modules)\n"
        "print('generated', out['usage']['completion_tokens'])\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd="/")
    assert done.returncode == 0, done.stderr[-2000:]
    assert "generated" in done.stdout


def test_q4_k_m_folded_vs_unfolded(smol, reference):
    """Folding must not make quantization worse. Unfolded = the same merged model converted the
    same way without the soul, the soul applied afterwards in float64 to llama.cpp's h_t and the
    GGUF's own quantised output matrix (what a runtime applying the soul would compute)."""
    from transformers import AutoConfig

    work, base, ckpt, ids = smol
    folded = convert_model(ckpt, work / "smol-q4_k_m.gguf", "q4_k_m", progress=False)
    folded_figures = compare(reference, llama_logits(folded.model_path, ids))
    types = {t.name: t.tensor_type.name for t in open_gguf(folded.model_path).tensors}
    # 576 columns do not split into 256-blocks: llama.cpp gives a tied embedding Q8_0, so does the fold.
    assert types["token_embd.weight"] == types["output.weight"] == "Q8_0"
    (work / "merged-unfolded").mkdir()
    unfolded_dir = export_hf(MergedModel(SafetensorsWeights(base), AutoConfig.from_pretrained(str(base)),
                                         LoraAdapter(ckpt)), base, work / "merged-unfolded", progress=False)
    unfolded = convert_model(unfolded_dir, work / "unfolded-q4_k_m.gguf", "q4_k_m", progress=False)
    unfolded_figures = compare(reference, unfolded_soul_logits(unfolded.model_path, ids, ckpt))
    print("q4_k_m folded", folded_figures, "unfolded", unfolded_figures)
    assert folded_figures["mean_kl"] <= 1.1 * unfolded_figures["mean_kl"]
