"""``zptr convert`` quantizes merged, folded rows straight into the GGUF, with no float
intermediate: every tensor must get the type and the bytes llama.cpp's own quantizer gives it.

The reference is ``llama_model_quantize`` (through ``zptr quantize``) of the float32 conversion of
the same checkpoint, so both sides quantize the same float32 rows. The fixtures are 256 columns
wide (k-quant blocks apply), with grouped-query attention (4 query heads per KV head) and 8 layers (so llama.cpp's
layer-dependent choices, attn_v and ffn_down with more bits in some layers, show).
"""

from __future__ import annotations

import gguf
import numpy as np
import pytest

from zptr.app import cli
from zptr.convert.ggml import IMATRIX_DEPENDENT_FTYPES, llama_order
from zptr.convert.quantize import QUANT_TYPES
from zptr.convert.writer import DIRECT_TYPES
from zptr.formats.gguf import field_value, open_gguf
from zptr.formats.imatrix import Entry, Imatrix, Keys, write_imatrix
from model_fixtures import make_checkpoint, save_family_fixture

Q = gguf.GGMLQuantizationType
SHAPE = dict(hidden_size=256, intermediate_size=512, num_hidden_layers=8, num_attention_heads=16,
             num_key_value_heads=4)
# llama.cpp types made only with an importance matrix: they put IQ1/IQ2/IQ3_XXS tensors in the
# model (iq3_xs: its attn_k), or Q2_K in q2_k_s.
WITH_IMATRIX = ("iq1_s", "iq1_m", "iq2_xxs", "iq2_xs", "iq2_s", "iq2_m", "iq3_xxs", "iq3_xs", "q2_k_s")
QUANTIZED = sorted(set(QUANT_TYPES) - set(DIRECT_TYPES))


def zptr(*argv) -> int:
    return cli.main([str(a) for a in argv])


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    w = tmp_path_factory.mktemp("direct")
    out = {"dir": w}
    for family in ("llama", "phi3"):
        base = save_family_fixture(family, w / family, **SHAPE)
        checkpoint = make_checkpoint(base, w / f"{family}-ckpt")
        f32 = w / f"{family}.f32.gguf"
        assert zptr("convert", checkpoint, "--outfile", f32, "--outtype", "f32", "--no-progress") == 0
        out[family] = (checkpoint, f32)
    reader = open_gguf(out["llama"][1])
    rng = np.random.default_rng(0)
    entries = {t.name: Entry(rng.gamma(2.0, 1.0, (1, int(t.shape[0]))).astype(np.float32) * 50,
                             np.array([50], dtype=np.float32))
               for t in reader.tensors if len(t.shape) == 2}
    out["imatrix"] = write_imatrix(w / "llama.imatrix.gguf", Imatrix(entries, ["calibration.txt"], 5, 64))
    return out


def _tensors(path) -> dict[str, tuple[Q, np.ndarray]]:
    return {t.name: (t.tensor_type, np.asarray(t.data)) for t in open_gguf(path).tensors}


def _assert_same(converted, reference) -> None:
    ours, theirs = _tensors(converted), _tensors(reference)
    assert set(ours) == set(theirs)
    for name in llama_order(list(theirs)):
        assert ours[name][0] == theirs[name][0], f"{name}: {ours[name][0].name} != {theirs[name][0].name}"
        np.testing.assert_array_equal(ours[name][1], theirs[name][1], err_msg=name)
    a, b = open_gguf(converted), open_gguf(reference)
    assert field_value(a, gguf.Keys.General.FILE_TYPE) == field_value(b, gguf.Keys.General.FILE_TYPE)
    for key in (Keys.Quantize.FILE, Keys.Quantize.DATASET, Keys.Quantize.ENTRIES_COUNT,
                Keys.Quantize.CHUNKS_COUNT):
        assert field_value(a, key) == field_value(b, key), key


@pytest.mark.parametrize("outtype", [t for t in QUANTIZED if t not in WITH_IMATRIX])
def test_every_type_equals_llama_quantize(work, tmp_path, outtype):
    checkpoint, f32 = work["llama"]
    converted, reference = tmp_path / "converted.gguf", tmp_path / "reference.gguf"
    assert zptr("convert", checkpoint, "--outfile", converted, "--outtype", outtype, "--no-progress") == 0
    assert zptr("quantize", f32, reference, outtype) == 0
    _assert_same(converted, reference)


@pytest.mark.parametrize("outtype", ["q4_k_m", "iq2_xxs", "q2_k_s", "iq4_xs"])
def test_with_an_imatrix_equals_llama_quantize(work, tmp_path, outtype):
    """Including iq4_xs, whose ffn_down types depend on the imatrix: that type goes through
    llama.cpp's quantizer itself, from a bfloat16 intermediate (IMATRIX_DEPENDENT_FTYPES); the
    others are written directly from float32 rows."""
    checkpoint, f32 = work["llama"]
    converted, reference = tmp_path / "converted.gguf", tmp_path / "reference.gguf"
    imatrix = work["imatrix"]
    assert zptr("convert", checkpoint, "--outfile", converted, "--outtype", outtype, "--imatrix", imatrix,
                "--no-progress") == 0
    if outtype in IMATRIX_DEPENDENT_FTYPES:
        f32 = tmp_path / "bf16.gguf"
        assert zptr("convert", checkpoint, "--outfile", f32, "--outtype", "bf16", "--no-progress") == 0
    assert zptr("quantize", f32, reference, outtype, "--imatrix", imatrix) == 0
    _assert_same(converted, reference)
    types = {kind for kind, _ in _tensors(converted).values()}
    assert outtype != "iq2_xxs" or Q.IQ2_XXS in types


def test_fused_qkv_gets_llama_cpps_type(work, tmp_path):
    """Phi-3's fused attn_qkv counts as attn_v in llama.cpp's rules: q4_k_m gives it Q6_K in the
    layers that get more bits (0, 3, 6 and 7 of 8), Q4_K in the others."""
    checkpoint, f32 = work["phi3"]
    converted, reference = tmp_path / "converted.gguf", tmp_path / "reference.gguf"
    assert zptr("convert", checkpoint, "--outfile", converted, "--outtype", "q4_k_m", "--no-progress") == 0
    assert zptr("quantize", f32, reference, "q4_k_m") == 0
    _assert_same(converted, reference)
    types = _tensors(converted)
    assert [types[f"blk.{i}.attn_qkv.weight"][0] for i in range(8)] == [Q.Q6_K, Q.Q4_K, Q.Q4_K, Q.Q6_K,
                                                                        Q.Q4_K, Q.Q4_K, Q.Q6_K, Q.Q6_K]


@pytest.mark.parametrize("outtype", WITH_IMATRIX)
def test_types_that_need_an_imatrix_are_refused_without_one(work, tmp_path, capsys, outtype):
    checkpoint, _ = work["llama"]
    out = tmp_path / "m.gguf"
    assert zptr("convert", checkpoint, "--outfile", out, "--outtype", outtype, "--no-progress") != 0
    err = capsys.readouterr().err
    assert "needs an importance matrix" in err and "--imatrix" in err and "Traceback" not in err
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_fallback_types_are_summarised_in_one_line(tmp_path, capsys):
    """64 columns split into no 256-block: llama.cpp's rules log a fallback per tensor, which
    ZPTR counts into one line (``-v`` shows them all)."""
    base = save_family_fixture("llama", tmp_path / "tiny")
    out = tmp_path / "m.gguf"
    capsys.readouterr()
    assert zptr("convert", base, "--outfile", out, "--outtype", "q4_k_m", "--no-progress") == 0
    err = capsys.readouterr().err
    matrices = sum(len(t.shape) == 2 for t in open_gguf(out).tensors)
    assert f"llama.cpp: {matrices - 1} tensors fell back to q5_0 / q8_0" in err, err
    assert "not divisible" not in err
