"""Importance matrices and ``zptr eval``: llama.cpp's imatrix file layout both ways, the statistic
against a hand computation, a legacy ``.dat`` file read, quantization that uses it (different
tensors, lower KL divergence on held-out text, llama-quantize's keys), refusal of an imatrix that
does not fit, ``--imatrix auto``, ``zptr eval``'s figures against NumPy, and bad input."""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from zptr.app import cli
from zptr.convert.imatrix import calibration_model, compute_imatrix
from zptr.dataset import sample_corpus_path
from zptr.errors import ImatrixError
from zptr.formats.gguf import field_value, open_gguf
from zptr.formats.imatrix import Entry, Imatrix, Keys, read_imatrix, write_imatrix
from zptr.runtime.engine import ZptrLlama
from model_fixtures import MIXED_TEXT, TINY_TOKENIZERS, build_tokenizer, make_checkpoint, save_tiny_model

CTX = 64
QUANT = "q4_0"  # 32-column blocks: every matrix of a 128-wide model is quantized, imatrix used
# llama.cpp's names of the tiny llama's matrices, written out by hand for the hand computation.
HF_TO_GGUF = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
              "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
              "mlp.down_proj": "ffn_down"}


def zptr(*argv) -> int:
    return cli.main([str(a) for a in argv])


def corpus_texts() -> list[str]:
    lines = sample_corpus_path().read_text(encoding="utf-8").splitlines()
    return [json.loads(line)["text"] for line in lines if '"text"' in line]


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """A tiny llama with outlier channels (norm weights spread over two decades, as real models
    have), a ZPTR checkpoint on it, its f32 GGUF, a calibration text and a held-out text."""
    w = tmp_path_factory.mktemp("imatrix")
    tokenizer = build_tokenizer(TINY_TOKENIZERS["llama"], w / "tokenizer")
    base = save_tiny_model("llama", w / "base", tokenizer=tokenizer, hidden_size=128, intermediate_size=256)
    model = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.copy_(torch.exp(torch.randn(param.shape, generator=generator)))
    model.save_pretrained(str(base))
    checkpoint = make_checkpoint(base, w / "checkpoint")
    texts = corpus_texts()
    calibration, held_out = w / "calibration.txt", w / "held_out.txt"
    calibration.write_text("\n".join(texts[: len(texts) // 2]), encoding="utf-8")
    held_out.write_text("\n".join(texts[len(texts) // 2:]), encoding="utf-8")
    assert zptr("convert", checkpoint, "--outfile", w / "f32.gguf", "--outtype", "f32", "--no-progress") == 0
    imatrix = w / "calibration.imatrix.gguf"
    assert zptr("imatrix", checkpoint, "--data", calibration, "-o", imatrix, "-c", CTX,
                "--process-output", "--no-progress") == 0
    return {"dir": w, "base": base, "checkpoint": checkpoint, "f32": w / "f32.gguf",
            "calibration": calibration, "held_out": held_out, "imatrix": imatrix}


@pytest.fixture(scope="module")
def quantized(work):
    w = work["dir"]
    plain, weighted = w / f"{QUANT}.gguf", w / f"{QUANT}.imatrix-weighted.gguf"
    assert zptr("quantize", work["f32"], plain, QUANT) == 0
    assert zptr("quantize", work["f32"], weighted, QUANT, "--imatrix", work["imatrix"]) == 0
    return plain, weighted


# ------------------------------------------------------------------------------ the file


def test_written_file_has_llama_cpp_layout(work):
    reader = gguf.GGUFReader(str(work["imatrix"]))
    keys = {k for k in reader.fields if not k.startswith("GGUF.")}
    assert keys == {"general.type", "imatrix.datasets", "imatrix.chunk_count", "imatrix.chunk_size"}
    assert field_value(reader, "general.type") == "imatrix"
    assert field_value(reader, "imatrix.datasets") == [str(work["calibration"])]
    assert reader.get_field("imatrix.chunk_count").types == [gguf.GGUFValueType.UINT32]
    assert field_value(reader, "imatrix.chunk_size") == CTX
    chunks = field_value(reader, "imatrix.chunk_count")
    matrices = sorted({f"blk.{i}.{kind}.weight" for i in range(2) for kind in HF_TO_GGUF.values()}
                      | {"output.weight"})
    assert [t.name for t in reader.tensors] == [n + s for n in matrices for s in (".in_sum2", ".counts")]
    columns = {"ffn_down": 256}
    for tensor in reader.tensors:
        assert tensor.tensor_type == gguf.GGMLQuantizationType.F32
        name = tensor.name.rsplit(".", 1)[0]
        if tensor.name.endswith(".counts"):
            assert list(tensor.shape) == [1, 1]  # ggml ne: [1, n_mat]
            assert tensor.data.reshape(-1).tolist() == [chunks * CTX]
        else:
            kind = name.split(".")[-2]
            assert list(tensor.shape) == [columns.get(kind, 128), 1]  # ggml ne: [n_cols, n_mat]


def test_values_equal_a_hand_computation(work):
    """Mean x^2 per input column over the calibration chunks, from hooks of this test's own on
    the plain transformers model with PEFT's merge (the checkpoint's LoRA changes the inputs of
    later matrices)."""
    from peft import PeftModel

    base = AutoModelForCausalLM.from_pretrained(str(work["base"]), dtype=torch.float32)
    model = PeftModel.from_pretrained(base, str(work["checkpoint"])).merge_and_unload().eval()
    tokenizer = AutoTokenizer.from_pretrained(str(work["base"]))
    ids = tokenizer(work["calibration"].read_text(encoding="utf-8"))["input_ids"]
    assert ids[0] != tokenizer.bos_token_id  # this tokenizer adds no BOS: chunks are plain windows
    sums: dict[str, torch.Tensor] = {}

    def hook(name):
        def record(module, inputs, output):
            x = inputs[0].reshape(-1, inputs[0].shape[-1]).double()
            sums[name] = sums.get(name, 0) + (x * x).sum(0)
        return record

    for i, layer in enumerate(model.model.layers):
        for hf, kind in HF_TO_GGUF.items():
            layer.get_submodule(hf).register_forward_hook(hook(f"blk.{i}.{kind}.weight"))
    model.lm_head.register_forward_hook(hook("output.weight"))
    n_chunks = len(ids) // CTX
    with torch.no_grad():
        for c in range(n_chunks):
            model(torch.tensor([ids[c * CTX:(c + 1) * CTX]]))
    means = read_imatrix(work["imatrix"]).means()
    assert set(means) == set(sums)
    for name, total in sums.items():
        np.testing.assert_allclose(means[name], (total / (n_chunks * CTX)).numpy(), rtol=2e-5, err_msg=name)


def test_gguf_model_gives_the_hf_models_statistic(work, tmp_path, capsys):
    """MODEL may be a float GGUF: transformers reads it back and the statistic is that of the
    HF model it was converted from. A GGUF whose RoPE scaling transformers would drop (the tiny
    llama's Llama 3 rope_freqs) is refused instead."""
    hf = save_tiny_model("qwen2", tmp_path / "qwen2", tokenizer=AutoTokenizer.from_pretrained(str(work["base"])))
    f32 = tmp_path / "qwen2.gguf"
    assert zptr("convert", hf, "--outfile", f32, "--outtype", "f32", "--no-progress") == 0
    outputs = {}
    for name, model in (("gguf", f32), ("hf", hf)):
        outputs[name] = tmp_path / f"{name}.imatrix.gguf"
        assert zptr("imatrix", model, "--data", work["calibration"], "-o", outputs[name], "-c", CTX,
                    "--chunks", 4, "--no-progress") == 0
    from_gguf, from_hf = (read_imatrix(outputs[n]).means() for n in ("gguf", "hf"))
    assert set(from_gguf) == set(from_hf)
    for name, values in from_gguf.items():
        np.testing.assert_allclose(values, from_hf[name], rtol=1e-4, err_msg=name)
    capsys.readouterr()
    assert zptr("imatrix", work["f32"], "--data", work["calibration"], "-o", tmp_path / "x.gguf",
                "--no-progress") == 1
    assert "rope_freqs.weight) is lost when transformers reads the GGUF" in capsys.readouterr().err
    assert not (tmp_path / "x.gguf").exists()


def test_round_trip_with_experts(tmp_path):
    """Per-expert sums and counts survive writing and reading; an expert no token reached gets
    ones, as llama-quantize gives it."""
    sums = np.arange(12, dtype=np.float32).reshape(3, 4)
    imatrix = Imatrix({"blk.0.ffn_up_exps.weight": Entry(sums, np.array([2.0, 0.0, 4.0])),
                       "blk.0.attn_q.weight": Entry(np.ones((1, 4), np.float32), np.array([8.0]))},
                      ["data.txt"], chunk_count=3, chunk_size=16)
    path = write_imatrix(tmp_path / "x.imatrix.gguf", imatrix)
    back = read_imatrix(path)
    assert (back.datasets, back.chunk_count, back.chunk_size, back.legacy) == (["data.txt"], 3, 16, False)
    np.testing.assert_array_equal(back.entries["blk.0.ffn_up_exps.weight"].sums, sums)
    experts = back.means()["blk.0.ffn_up_exps.weight"].reshape(3, 4)
    np.testing.assert_array_equal(experts, [sums[0] / 2, np.ones(4), sums[2] / 4])
    assert list(gguf.GGUFReader(str(path)).get_tensor(0).shape) == [4, 1]


def _legacy_bytes(entries: dict[str, tuple[int, list[float]]], trailer: bool) -> bytes:
    """llama-imatrix's --output-format dat, byte by byte: int32 entry count; per entry int32 name
    length, name, int32 ncall, int32 nval, nval float32; then int32 chunk count, int32 dataset
    name length and the name."""
    out = struct.pack("<i", len(entries))
    for name, (ncall, values) in entries.items():
        out += struct.pack("<i", len(name)) + name.encode() + struct.pack("<ii", ncall, len(values))
        out += struct.pack(f"<{len(values)}f", *values)
    if trailer:
        out += struct.pack("<i", 7) + struct.pack("<i", 8) + b"wiki.txt"
    return out


def test_legacy_dat_is_read(tmp_path):
    path = tmp_path / "imatrix.dat"
    path.write_bytes(_legacy_bytes({"blk.0.attn_q.weight": (4, [8.0, 4.0, 2.0]),
                                    "output.weight": (2, [1.0, 3.0])}, trailer=True))
    imatrix = read_imatrix(path)
    assert imatrix.legacy and imatrix.chunk_count == 7 and imatrix.datasets == ["wiki.txt"]
    means = imatrix.means()
    np.testing.assert_array_equal(means["blk.0.attn_q.weight"], [2.0, 1.0, 0.5])  # values / ncall
    np.testing.assert_array_equal(means["output.weight"], [0.5, 1.5])
    path.write_bytes(_legacy_bytes({"blk.0.attn_q.weight": (1, [1.0])}, trailer=False))
    assert read_imatrix(path).chunk_count == 0  # the trailer is optional
    path.write_bytes(_legacy_bytes({"blk.0.attn_q.weight": (4, [8.0, 4.0, 2.0])}, trailer=False)[:-3])
    with pytest.raises(ImatrixError, match="truncated legacy imatrix"):
        read_imatrix(path)


# ------------------------------------------------------------------------------ quantizing


def test_imatrix_changes_tensors_and_records_llama_quantize_keys(work, quantized):
    plain, weighted = (open_gguf(p) for p in quantized)
    name = "blk.0.attn_q.weight"
    a = next(t for t in plain.tensors if t.name == name)
    b = next(t for t in weighted.tensors if t.name == name)
    assert a.tensor_type == b.tensor_type == gguf.GGMLQuantizationType.Q4_0
    assert not np.array_equal(a.data, b.data)
    assert field_value(plain, Keys.Quantize.FILE) is None
    assert field_value(weighted, Keys.Quantize.FILE) == str(work["imatrix"])
    assert field_value(weighted, Keys.Quantize.DATASET) == str(work["calibration"])
    assert field_value(weighted, Keys.Quantize.ENTRIES_COUNT) == 15
    chunks = read_imatrix(work["imatrix"]).chunk_count
    assert field_value(weighted, Keys.Quantize.CHUNKS_COUNT) == chunks > 0
    for key in (Keys.Quantize.ENTRIES_COUNT, Keys.Quantize.CHUNKS_COUNT):
        assert weighted.get_field(key).types == [gguf.GGUFValueType.UINT32]


def test_imatrix_lowers_kl_divergence_on_held_out_text(work, quantized):
    from zptr.runtime.evaluate import evaluate

    plain, weighted = (evaluate(p, work["held_out"], kl_base=work["f32"], ctx=CTX, chunks=40,
                                progress=False) for p in quantized)
    print(f"\n{QUANT} mean KLD without imatrix {plain['kld_mean']:.5f}, with {weighted['kld_mean']:.5f}")
    assert weighted["kld_mean"] < 0.9 * plain["kld_mean"]
    assert weighted["same_top"] >= plain["same_top"] - 0.02


def test_convert_with_imatrix_equals_quantize_with_it(work, tmp_path):
    """convert --imatrix quantizes its bfloat16 intermediate: the same as quantize --imatrix of a
    bfloat16 conversion."""
    out, bf16, requantized = tmp_path / "converted.gguf", tmp_path / "bf16.gguf", tmp_path / "quantized.gguf"
    assert zptr("convert", work["checkpoint"], "--outfile", out, "--outtype", QUANT, "--imatrix",
                work["imatrix"], "--no-progress") == 0
    assert zptr("convert", work["checkpoint"], "--outfile", bf16, "--outtype", "bf16", "--no-progress") == 0
    assert zptr("quantize", bf16, requantized, QUANT, "--imatrix", work["imatrix"]) == 0
    converted, weighted = open_gguf(out), open_gguf(requantized)
    assert field_value(converted, Keys.Quantize.FILE) == str(work["imatrix"])
    for tensor in converted.tensors:
        np.testing.assert_array_equal(tensor.data, weighted.get_tensor(
            [t.name for t in weighted.tensors].index(tensor.name)).data, err_msg=tensor.name)


# ------------------------------------------------------------------------------ refusals


def _other_model_imatrix(work) -> Path:
    """An imatrix of a tiny qwen2 (hidden 64): names that match, columns that do not."""
    other = save_tiny_model("qwen2", work["dir"] / "other",
                            tokenizer=AutoTokenizer.from_pretrained(str(work["base"])))
    path = work["dir"] / "other.imatrix.gguf"
    if not path.exists():
        imatrix = compute_imatrix(calibration_model(other), work["calibration"], ctx=CTX, chunks=2,
                                  progress=False, dataset="other")
        write_imatrix(path, imatrix)
    return path


def test_imatrix_of_another_model_is_refused(work, tmp_path, capsys):
    other = _other_model_imatrix(work)
    out = tmp_path / "q.gguf"
    capsys.readouterr()
    assert zptr("quantize", work["f32"], out, QUANT, "--imatrix", other) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    # the first of the model's matrices in file order, with both column counts
    assert "entry blk.0.ffn_down.weight has 128 columns, f32.gguf's tensor has 256" in err, err
    assert list(tmp_path.iterdir()) == []
    assert zptr("convert", work["checkpoint"], "--outfile", out, "--outtype", QUANT, "--imatrix",
                other, "--no-progress") == 1
    assert "entry blk.0.ffn_down.weight has 128 columns" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_wrong_columns_and_missing_entries_are_refused(work, tmp_path, capsys):
    imatrix = read_imatrix(work["imatrix"])
    imatrix.entries["blk.1.ffn_down.weight"] = Entry(np.ones((1, 255), np.float32), np.array([64.0]))
    wrong = write_imatrix(tmp_path / "wrong.imatrix.gguf", imatrix)
    out = tmp_path / "out" / "q.gguf"
    assert zptr("quantize", work["f32"], out, QUANT, "--imatrix", wrong) == 1
    assert "entry blk.1.ffn_down.weight has 255 columns, f32.gguf's tensor has 256" in capsys.readouterr().err
    del imatrix.entries["blk.1.ffn_down.weight"]
    missing = write_imatrix(tmp_path / "missing.imatrix.gguf", imatrix)
    assert zptr("quantize", work["f32"], out, QUANT, "--imatrix", missing) == 1
    assert "no entry for blk.1.ffn_down.weight" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_imatrix_with_a_float_type_is_refused(work, tmp_path, capsys):
    assert zptr("quantize", work["f32"], tmp_path / "f16.gguf", "f16", "--imatrix", work["imatrix"]) == 1
    assert "f16 does not use an importance matrix" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------------------ --imatrix auto


def test_auto_calibrates_on_the_training_data_or_says_why_not(work, tmp_path, capsys):
    data = tmp_path / "train.jsonl"
    shutil.copy(sample_corpus_path(), data)
    run = tmp_path / "run"
    assert zptr("train", "--base-model", work["base"], "--data", data, "--output-dir", run,
                "--max-steps", "2", "--warmup-steps", "1", "--annealing-steps", "1",
                "--max-length", "32", "--save-steps", "2", "--no-progress") == 0
    checkpoint = run / "step_000002"
    out = tmp_path / "auto.gguf"
    capsys.readouterr()
    assert zptr("convert", checkpoint, "--outfile", out, "--outtype", QUANT, "--imatrix", "auto",
                "--no-progress") == 0
    captured = capsys.readouterr()
    assert f"the checkpoint's training data {data.resolve()}" in captured.err
    imatrix = tmp_path / "auto.imatrix.gguf"
    assert f"wrote {imatrix}" in captured.out
    assert read_imatrix(imatrix).datasets == [str(data.resolve())]
    assert field_value(open_gguf(out), Keys.Quantize.FILE) == str(imatrix)

    data.write_text(data.read_text(encoding="utf-8") + '{"text": "one more line"}\n', encoding="utf-8")
    assert zptr("convert", checkpoint, "--outfile", out, "--outtype", QUANT, "--imatrix", "auto",
                "--no-progress", "--overwrite") == 0
    err = capsys.readouterr().err
    assert "the bundled sample corpus" in err and "changed since training" in err
    assert read_imatrix(imatrix).datasets == [str(sample_corpus_path())]


# ------------------------------------------------------------------------------ zptr eval


def _llama_chunks_and_logits(path: Path, text: str, n_chunks: int) -> tuple[list, list]:
    llm = ZptrLlama(path, omega="off", n_ctx=CTX, n_batch=CTX, n_ubatch=CTX, n_threads=1, n_threads_batch=1)
    try:
        tokens = llm.llm.tokenize(text.encode(), add_bos=True, special=False)
        bos = llm.llm.token_bos()
        chunks = [tokens[i * CTX:(i + 1) * CTX] for i in range(n_chunks)]
        if tokens[0] == bos:  # the vocabulary adds BOS: every chunk starts with it
            chunks = [[bos] + chunk[1:] for chunk in chunks]
        return chunks, [llm.llm.decode_all(chunk)[1].astype(np.float64) for chunk in chunks]
    finally:
        llm.close()


def _percentile(values: list[float], fraction: float) -> float:
    """llama-perplexity's: linear interpolation between sorted values at fraction * (n - 1)."""
    ordered = np.sort(values)
    at = fraction * (len(ordered) - 1)
    low = int(at)
    return (1 - (at - low)) * ordered[low] + (at - low) * ordered[min(low + 1, len(ordered) - 1)]


def test_eval_figures_equal_numpy(work, quantized, capsys):
    """llama-perplexity's scoring written out in NumPy: the second half of each chunk, position
    i predicting token i + 1; KL(base || model), same argmax, exp(mean NLL)."""
    plain, _ = quantized
    assert zptr("eval", plain, "-f", work["held_out"], "--kl-base", work["f32"], "-c", CTX,
                "--chunks", 6, "--json", "-t", 1, "--no-progress") == 0
    result = json.loads(capsys.readouterr().out)
    text = work["held_out"].read_text(encoding="utf-8")
    chunks, model = _llama_chunks_and_logits(plain, text, 6)
    _, base = _llama_chunks_and_logits(work["f32"], text, 6)
    nll, nll_base, kld, same = [], [], [], []
    for chunk, q, p in zip(chunks, model, base):
        for i in range(CTX // 2, CTX - 1):
            lq = q[i] - q[i].max() - np.log(np.exp(q[i] - q[i].max()).sum())
            lp = p[i] - p[i].max() - np.log(np.exp(p[i] - p[i].max()).sum())
            nll.append(-lq[chunk[i + 1]])
            nll_base.append(-lp[chunk[i + 1]])
            kld.append(np.sum(np.exp(lp) * (lp - lq)))
            same.append(np.argmax(p[i]) == np.argmax(q[i]))
    assert result["chunks"] == 6 and result["positions"] == len(kld) == 6 * (CTX // 2 - 1)
    np.testing.assert_allclose(result["kld_mean"], np.mean(kld), rtol=1e-9)
    np.testing.assert_allclose(result["kld_median"], np.median(kld), rtol=1e-9)
    for fraction in (0.9, 0.95, 0.99, 0.999):
        np.testing.assert_allclose(result[f"kld_p{100 * fraction:g}"], _percentile(kld, fraction), rtol=1e-9)
    assert result["same_top"] == pytest.approx(np.mean(same), abs=1e-12)
    np.testing.assert_allclose(result["ppl"], np.exp(np.mean(nll)), rtol=1e-9)
    np.testing.assert_allclose(result["ppl_base"], np.exp(np.mean(nll_base)), rtol=1e-9)
    standard_error = np.sqrt((np.mean(np.square(kld)) - np.mean(kld) ** 2) / (len(kld) - 1))
    np.testing.assert_allclose(result["kld_mean_error"], standard_error, rtol=1e-6)


def test_eval_against_the_checkpoint_with_omega(work, capsys):
    """The f32 GGUF + sidecar against its own checkpoint on the PyTorch path, Omega on both
    sides: what conversion loses is float rounding."""
    assert zptr("eval", work["f32"], "-f", work["held_out"], "--kl-base", work["checkpoint"], "-c", CTX,
                "--chunks", 3, "--omega", "exact", "--json", "--no-progress") == 0
    result = json.loads(capsys.readouterr().out)
    assert result["omega"] == "exact" and result["kld_mean"] < 1e-4 and result["same_top"] > 0.95


# ------------------------------------------------------------------------------ bad input


@pytest.mark.parametrize("case", ["missing data", "empty data", "bad -c", "too little data", "existing output"])
def test_imatrix_cli_bad_input(work, tmp_path, capsys, case):
    out = tmp_path / "out.imatrix.gguf"
    data = tmp_path / "data.txt"
    data.write_text(MIXED_TEXT, encoding="utf-8")
    args = ["imatrix", work["checkpoint"], "--data", data, "-o", out, "-c", CTX, "--no-progress"]
    expected = {"missing data": "no such data file", "empty data": "empty text",
                "bad -c": "-c/--ctx-size must be at least 2", "too little data": "fewer than the",
                "existing output": "exists (pass --overwrite"}[case]
    if case == "missing data":
        data.unlink()
    elif case == "empty data":
        data.write_text("  \n", encoding="utf-8")
    elif case == "bad -c":
        args[-2] = "0"
    elif case == "too little data":
        args[-2] = "1024"
    else:
        out.write_bytes(b"keep")
    assert zptr(*args) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and expected in err, err
    if case == "existing output":
        assert out.read_bytes() == b"keep"
    else:
        assert not out.exists()
    assert {p.name for p in tmp_path.iterdir()} <= {"data.txt", out.name}  # no temporary left


@pytest.mark.parametrize("case", ["missing text", "bad -c", "short text", "bad base"])
def test_eval_cli_bad_input(work, quantized, tmp_path, capsys, case):
    text = tmp_path / "text.txt"
    text.write_text(MIXED_TEXT[:200], encoding="utf-8")
    args = ["eval", quantized[0], "-f", text, "-c", "16", "--no-progress"]
    expected = {"missing text": "no such data file", "bad -c": "-c/--ctx-size must be at least 2",
                "short text": "fewer than the", "bad base": "must be a GGUF file or a checkpoint"}[case]
    if case == "missing text":
        args[3] = tmp_path / "absent.txt"
    elif case == "bad -c":
        args[5] = "1"
    elif case == "short text":
        args[5] = "512"
    else:
        args += ["--kl-base", tmp_path]
    assert zptr(*args) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and expected in err, err
