"""The README's main-job command, ``zptr demo``, run for real (CLI in a subprocess) at reduced size
on the bundled SmolLM2-135M: every stage delivers and every output it names exists and is usable."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from zptr.checkpoint import load_checkpoint
from zptr.config import CLUSTERS

pytestmark = pytest.mark.slow


def zptr(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "zptr", *argv], capture_output=True, text=True,
                          env={**os.environ, "PYTHONUNBUFFERED": "1"})


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "zptr-demo"
    proc = zptr("demo", "--quick", "--output-dir", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, proc.stdout, json.loads((out / "demo.json").read_text(encoding="utf-8"))


def test_every_stage_ran_and_outputs_listed(demo):
    out, stdout, summary = demo
    for stage in range(1, 6):
        assert f"[{stage}/5]" in stdout
    assert "outputs:" in stdout
    for name, path in summary["outputs"].items():
        if name != "base model (HF dir, cached)":
            assert Path(path).exists(), name
        assert str(path) in stdout
    assert summary["timings_s"]["total"] > 0


def test_training_reached_golden(demo):
    _, _, summary = demo
    checkpoint = load_checkpoint(Path(summary["outputs"]["checkpoint"]))
    assert checkpoint.phase == "golden"
    assert checkpoint.step == summary["steps"] == 4
    assert checkpoint.adapter_dir is not None


@pytest.mark.parametrize("outtype", ["f16", "q4_k_m"])
def test_ggufs_inspect_golden_and_load_in_plain_llama_cpp(demo, outtype):
    import llama_cpp

    _, _, summary = demo
    model = summary["outputs"][f"GGUF {outtype}"]
    proc = zptr("inspect", model, "--json")
    assert proc.returncode == 0, proc.stderr
    info = json.loads(proc.stdout)
    assert info["phase"] == "golden"
    assert info["sidecar"]["paired"] is True
    assert Path(info["sidecar"]["path"]) == Path(summary["outputs"][f"Omega sidecar {outtype}"])
    llm = llama_cpp.Llama(model, n_ctx=32, verbose=False)  # stock llama.cpp, no zptr code
    try:
        bos = llm.token_bos()
        llm.eval([bos])  # one token: fine whatever the CPU's extra buffer types do
        assert llm.n_tokens == 1 and llm.n_vocab() == 49152
    finally:
        llm.close()


def test_generation_shows_routes(demo):
    out, stdout, summary = demo
    generation = summary["generation"]
    assert generation["text"].strip()
    assert generation["routes"] and set(generation["routes"]) <= set(CLUSTERS)
    assert sum(generation["route_counts"].values()) == len(generation["routes"])
    text = (out / "generation.txt").read_text(encoding="utf-8")
    assert text.count("⟨") >= len(generation["routes"])
    assert "routes:" in stdout


def test_bench_ran_on_both_paths(demo):
    out, _, summary = demo
    document = json.loads((out / "bench" / "bench.json").read_text())
    paths = {row["path"] for row in document["rows"]}
    assert paths == {"torch-f32", "llama-q4_k_m"}
    assert "q4_k_m_over_torch_f32_decode" in summary["bench_summary"]
    q4_off = next(r for r in document["rows"] if r["path"] == "llama-q4_k_m" and r["omega"] == "off")
    assert q4_off["top1"] >= 0.8  # a 4-bit model still agrees with the float32 head mostly


def test_existing_outputs_are_kept(demo):
    out, _, _ = demo
    before = (out / "demo.json").stat().st_mtime_ns
    proc = zptr("demo", "--quick", "--output-dir", str(out))
    assert proc.returncode == 1
    assert "--overwrite" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert (out / "demo.json").stat().st_mtime_ns == before


def test_too_few_steps_refused(tmp_path):
    proc = zptr("demo", "--steps", "2", "--output-dir", str(tmp_path / "d"))
    assert proc.returncode == 1
    assert "--steps must be at least 3" in proc.stderr
    assert not (tmp_path / "d").exists()
