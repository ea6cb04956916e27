"""Bad input a user can give, one test per class of defect: a one-line error naming the problem,
a non-zero exit code, no traceback, nothing half-written, nothing lost."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from zptr.app.cli import main as zptr_main
from zptr.checkpoint import CONFIG_FILE
from zptr.convert import convert_model
from zptr.fileio import sha256_file
from zptr.formats.sidecar import sidecar_path_for
from model_fixtures import build_tokenizer, make_checkpoint, save_tiny_model

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A tiny llama (SentencePiece vocabulary), a checkpoint with LoRA, soul and Omega, its f32
    GGUF with sidecar, and a 2-step training run (for --resume)."""
    root = tmp_path_factory.mktemp("hardening")
    tokenizer = build_tokenizer("sentencepiece", root / "tokenizer")
    base = save_tiny_model("llama", root / "base", tokenizer=tokenizer)
    ckpt = make_checkpoint(base, root / "ckpt")
    model = convert_model(ckpt, root / "model.gguf", "f32", progress=False).model_path
    assert zptr_main(["train", "--base-model", str(base), "--output-dir", str(root / "run"), "--max-steps", "2",
                      "--max-length", "24", "--save-steps", "2", "--no-progress"]) == 0
    return {"root": root, "base": base, "ckpt": ckpt, "model": model, "trained": root / "run" / "step_000002"}


def snapshot(*paths: Path) -> dict:
    """Every file under ``paths`` with its sha256: inputs must come out byte-identical."""
    files = {}
    for path in paths:
        for file in ([path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())):
            files[str(file)] = sha256_file(file)
    return files


def fails(capsys, argv: list, *names: str, code: int = 1) -> str:
    """Run ``zptr argv`` expecting exit ``code`` and one line on stderr naming each of ``names``."""
    capsys.readouterr()
    assert zptr_main([str(a) for a in argv]) == code
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    assert code == 70 or "internal error" not in err, err
    for name in names:
        assert str(name) in lines[0], (name, err)
    return lines[0]


def tampered(ckpt: Path, dest: Path, edit) -> Path:
    """A copy of ``ckpt`` changed by ``edit(dir)``, its recorded sha256 updated."""
    shutil.copytree(ckpt, dest)
    edit(dest)
    meta = json.loads((dest / CONFIG_FILE).read_text())
    if isinstance(meta, dict) and isinstance(meta.get("files"), dict):
        meta["files"] = {n: sha256_file(dest / n) for n in meta["files"] if (dest / n).is_file()}
        (dest / CONFIG_FILE).write_text(json.dumps(meta))
    return dest


def edit_config(change):
    def edit(directory: Path) -> None:
        meta = json.loads((directory / CONFIG_FILE).read_text())
        (directory / CONFIG_FILE).write_text(json.dumps(change(meta)))
    return edit


# ------------------------------------------------------------------------------ 1. tracebacks

def test_prompts_that_do_not_fit_or_are_not_text(world, capsys):
    model = world["model"]
    fails(capsys, ["run", model, "-p", "word " * 400, "-n", "2", "-c", "64", "--raw"], "the prompt is",
          "the context holds 64")
    # llama.cpp pads its context to 256 tokens, llama-cpp-python's buffers hold what was asked
    fails(capsys, ["run", model, "-p", "word " * 40, "-n", "2", "-c", "8"], "the context holds 8")
    fails(capsys, ["run", model, "-p", "", "-n", "2"], "empty")
    fails(capsys, ["run", model, "-p", "\udcff\udcfe", "-n", "2", "-c", "512", "--raw"], "UTF-8")
    capsys.readouterr()
    assert zptr_main(["run", str(model), "-p", "the sea", "-n", "500", "-c", "32", "--raw"]) == 0
    assert "end of the context (32 tokens" in capsys.readouterr().err


CONFIG_DEFECTS = {
    "null": (lambda m: None, "top level must be an object"),
    "a list": (lambda m: [m], "top level must be an object"),
    "omega yes": (lambda m: {**m, "zptr": {**m["zptr"], "omega": "yes"}}, "zptr.omega must be an object"),
    "schedule null": (lambda m: {**m, "zptr": {**m["zptr"], "schedule": None}}, "zptr.schedule must be an object"),
    "step forty": (lambda m: {**m, "step": "forty"}, "step must be an integer"),
    "step negative": (lambda m: {**m, "step": -3}, "step must not be negative"),
    "base_model 42": (lambda m: {**m, "base_model": 42}, "base_model must be a string or null"),
    "target inf": (lambda m: {**m, "zptr": {**m["zptr"], "schedule": {**m["zptr"]["schedule"],
                                                                      "target": float("inf")}}},
                   "target must be a finite number"),
    "negative warmup": (lambda m: {**m, "zptr": {**m["zptr"], "schedule": {**m["zptr"]["schedule"],
                                                                           "warmup_steps": -4}}},
                        "warmup_steps must not be negative"),
}


@pytest.mark.parametrize("defect", sorted(CONFIG_DEFECTS))
def test_checkpoint_config_of_the_wrong_shape(defect, world, tmp_path, capsys):
    change, message = CONFIG_DEFECTS[defect]
    ckpt = tampered(world["ckpt"], tmp_path / "ckpt", edit_config(change))
    out = tmp_path / "out"
    out.mkdir()
    fails(capsys, ["convert", ckpt, "--outfile", out / "m.gguf", "--outtype", "f32"], CONFIG_FILE, message)
    fails(capsys, ["inspect", ckpt], CONFIG_FILE, message)
    assert list(out.iterdir()) == []


@pytest.mark.parametrize("blob, message", [
    ({"alpha": "x", "so8_rotation": {}}, "'alpha' must be a number"),
    ({"alpha": 1.0, "so8_rotation": 5}, "so8_rotation must be a state dict"),
    ({"alpha": 1.0, "so8_rotation": {"parametrizations.weight.original": torch.ones(3)}}, "square"),
    ({"alpha": float("nan"), "so8_rotation": {}}, "alpha is nan"),
    ({"alpha": 1.0, "so8_rotation": {}, "step": -1.5}, "step must be a non-negative integer"),
    ([1, 2], "expected a dict"),
])
def test_seed_soul_with_wrong_types(blob, message, world, tmp_path, capsys):
    seed = tmp_path / "seed"
    seed.mkdir()
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        shutil.copy(world["ckpt"] / name, seed / name)
    torch.save(blob, seed / "soul.pt")
    fails(capsys, ["convert", seed, "--outfile", tmp_path / "m.gguf", "--base-model", world["base"]],
          "soul.pt", message)
    assert not (tmp_path / "m.gguf").exists()


def test_base_model_that_is_not_json_or_not_gguf(world, tmp_path, capsys):
    broken = tmp_path / "broken"
    shutil.copytree(world["base"], broken)
    (broken / "config.json").write_text("{not json")
    fails(capsys, ["convert", broken, "--outfile", tmp_path / "a.gguf"], "config.json", "not valid JSON")
    fails(capsys, ["train", "--base-model", broken, "--output-dir", tmp_path / "run", "--max-steps", "1"],
          "config.json", "not valid JSON")
    foreign = tmp_path / "foreign.gguf"
    foreign.write_bytes(b"GGUF" + os.urandom(200))
    fails(capsys, ["convert", world["ckpt"], "--outfile", tmp_path / "b.gguf", "--base-model", foreign], "foreign.gguf")
    fails(capsys, ["train", "--base-model", foreign, "--output-dir", tmp_path / "run2", "--max-steps", "1"],
          "foreign.gguf")
    assert not [p for p in tmp_path.iterdir() if p.suffix == ".gguf" and p.name != "foreign.gguf"]


def edit_adapter(change):
    def edit(directory: Path) -> None:
        tensors = load_file(str(directory / "adapter_model.safetensors"))
        save_file(change(tensors), str(directory / "adapter_model.safetensors"))
    return edit


def _first(tensors, kind):
    return next(k for k in tensors if kind in k)


@pytest.mark.parametrize("change, message", [
    (lambda t: {**t, _first(t, "lora_A"): t[_first(t, "lora_A")][:, :-1].contiguous()}, "update for"),
    (lambda t: {**t, _first(t, "lora_B"): torch.full_like(t[_first(t, "lora_B")], float("nan"))}, "NaN or Inf"),
    (lambda t: {**t, _first(t, "lora_A"): t[_first(t, "lora_A")][:-1].contiguous()}, "rank"),
])
def test_lora_tensors_of_the_wrong_shape_or_not_finite(change, message, world, tmp_path, capsys):
    ckpt = tampered(world["ckpt"], tmp_path / "ckpt", edit_adapter(change))
    fails(capsys, ["convert", ckpt, "--outfile", tmp_path / "m.gguf", "--outtype", "f32"],
          "adapter_model.safetensors", message)
    assert not (tmp_path / "m.gguf").exists()


@pytest.mark.parametrize("r", [0, -4, "four"])
def test_adapter_rank_that_is_not_positive(r, world, tmp_path, capsys):
    def edit(directory: Path) -> None:
        config = json.loads((directory / "adapter_config.json").read_text())
        (directory / "adapter_config.json").write_text(json.dumps({**config, "r": r}))

    ckpt = tampered(world["ckpt"], tmp_path / "ckpt", edit)
    fails(capsys, ["convert", ckpt, "--outfile", tmp_path / "m.gguf"], "adapter_config.json")


@pytest.mark.parametrize("file, content", [
    ("trainer_state.json", "{broken"), ("trainer_state.json", json.dumps({"step": "two"})),
    ("rng.json", json.dumps({"not": "a list"})), ("optimizer.safetensors", "garbage"),
    ("optimizer.json", json.dumps({"param_groups": 3, "scalars": {}})),
])
def test_garbage_in_trainer_state(file, content, world, tmp_path, capsys):
    def edit(directory: Path) -> None:
        (directory / "trainer_state" / file).write_text(content)

    ckpt = tampered(world["trained"], tmp_path / "step_000002", edit)
    before = snapshot(ckpt)
    fails(capsys, ["train", "--resume", ckpt, "--max-steps", "4", "--no-progress"], file)
    assert snapshot(ckpt) == before and not (tmp_path / "step_000004").exists()


# ------------------------------------------------------------------------------ 2. silent acceptance

@pytest.mark.parametrize("argv, names", [
    (["-n", "-5"], ["max_tokens", ">= 0"]), (["--temp", "-1"], ["temperature"]),
    (["--temp", "nan"], ["temperature", "finite"]), (["--top-p", "2"], ["top_p", "(0, 1]"]),
    (["--min-p", "-1"], ["min_p"]), (["-t", "0"], ["-t/--threads"]), (["-t", "100000"], ["-t/--threads"]),
    (["--repeat-penalty", "0"], ["repeat_penalty"]), (["-c", "0"], ["n_ctx"]), (["-ngl", "-3"], ["-ngl"]),
])
def test_out_of_range_sampling_values_refused(argv, names, world, capsys):
    fails(capsys, ["run", world["model"], "-p", "hello", "-c", "512", *argv], *names)


def test_zero_tokens_generates_nothing(world, capsys):
    capsys.readouterr()
    assert zptr_main(["run", str(world["model"]), "-p", "hello", "-n", "0", "-c", "512", "--raw"]) == 0
    assert capsys.readouterr().out.strip() == ""


def test_quantize_of_a_gguf_without_tensors(tmp_path, capsys):
    import gguf

    empty = tmp_path / "empty.gguf"
    writer = gguf.GGUFWriter(str(empty), "llama")
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    fails(capsys, ["quantize", empty, tmp_path / "q.gguf", "q4_0"], "empty.gguf", "no tensors")
    assert not (tmp_path / "q.gguf").exists()


# ------------------------------------------------------------------------------ 3, 4. outputs

def test_a_failing_sidecar_or_export_leaves_no_model(world, tmp_path, capsys):
    out = tmp_path / "m.gguf"
    sidecar_path_for(out).mkdir()  # the sidecar's name is taken by a directory
    fails(capsys, ["convert", world["ckpt"], "--outfile", out, "--outtype", "f32", "--overwrite"],
          "m.omega.gguf", "is a directory")
    assert not out.exists()
    blocker = tmp_path / "file"
    blocker.write_text("x")
    fails(capsys, ["convert", world["ckpt"], "--outfile", tmp_path / "n.gguf", "--outtype", "f32",
                   "--export-hf", blocker / "export"], "is a file")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file", "m.omega.gguf"]


@pytest.mark.parametrize("where", ["outfile in checkpoint", "export over checkpoint", "export over base"])
def test_outputs_that_overlap_inputs_are_refused(where, world, tmp_path, capsys):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(world["ckpt"], ckpt)
    base = tmp_path / "base"
    shutil.copytree(world["base"], base)
    before = snapshot(ckpt, base)
    argv = {"outfile in checkpoint": ["--outfile", ckpt / "m.gguf"],
            "export over checkpoint": ["--outfile", tmp_path / "m.gguf", "--export-hf", ckpt],
            "export over base": ["--outfile", tmp_path / "m.gguf", "--export-hf", base]}[where]
    fails(capsys, ["convert", ckpt, "--base-model", base, "--outtype", "f32", "--overwrite", *argv], "input")
    assert snapshot(ckpt, base) == before
    assert not (tmp_path / "m.gguf").exists()


# ------------------------------------------------------------------------------ 5. interrupts

def _children(pid: int) -> list:
    import psutil

    return psutil.Process(pid).children(recursive=True)


def _quantizing(name: str, proc, out: Path) -> bool:
    """zptr quantize: llama.cpp's quantizer runs in its child process; zptr convert: ggml's
    quantizer runs in-process, writing the temporary output."""
    if name == "quantize":
        return any("quantize_worker" in " ".join(c.cmdline()) for c in _children(proc.pid))
    return any(p.stat().st_size > 5_000_000 for p in out.glob(".c.gguf.*.tmp"))


@pytest.mark.slow
@pytest.mark.parametrize("signum, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_interrupting_the_quantizer(signum, code, tmp_path):
    """SmolLM2 is big enough to interrupt while it is being quantized: the command stops at once
    with 130 / 143 and leaves nothing, for zptr quantize and zptr convert alike."""
    from zptr.models import smollm2_hf_dir

    f16 = tmp_path / "smol-f16.gguf"
    convert_model(smollm2_hf_dir(), f16, "f16", progress=False)
    out = tmp_path / "out"
    runs = {"quantize": ["quantize", str(f16), str(out / "q.gguf"), "q4_k_m"],
            "convert": ["convert", str(smollm2_hf_dir()), "--outfile", str(out / "c.gguf"),
                        "--outtype", "q4_k_m", "--no-progress"]}
    out.mkdir()
    for name, argv in runs.items():
        proc = subprocess.Popen([sys.executable, "-m", "zptr", *argv], cwd=REPO, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 240
        while not _quantizing(name, proc, out):
            assert proc.poll() is None and time.monotonic() < deadline, (name, proc.stderr.read()[-1000:])
            time.sleep(0.02)
        time.sleep(0.3)  # inside the quantization loop
        started = time.monotonic()
        proc.send_signal(signum)
        _, err = proc.communicate(timeout=60)
        assert proc.returncode == code, (name, err[-2000:])
        assert time.monotonic() - started < 10, name  # not after the quantizer finished
        assert "Traceback" not in err
        assert list(out.iterdir()) == [], name
        assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


# ------------------------------------------------------------------------------ 7. Omega with logit_bias

def test_logit_bias_keeps_omega_on(world):
    from zptr.runtime.engine import ZptrLlama

    llm = ZptrLlama(world["model"], omega="exact", n_ctx=256, f32_kv=True)
    try:
        plain = llm.create_completion("The sea", max_tokens=8, temperature=0)
        plain_routes = list(llm.last_routes)
        zero = llm.create_completion("The sea", max_tokens=8, temperature=0, logit_bias={5: 0.0})
        assert llm.last_routes == plain_routes and len(plain_routes) >= 8  # Omega ran
        assert zero["choices"][0]["text"] == plain["choices"][0]["text"]  # and corrected alike
        first = llm.tokenize(zero["choices"][0]["text"], special=False)[1]
        banned = llm.create_completion("The sea", max_tokens=8, temperature=0, logit_bias={first: -100.0})
        assert llm.last_routes and banned["choices"][0]["text"] != zero["choices"][0]["text"]
    finally:
        llm.close()


# ------------------------------------------------------------------------------ 8. messages

def test_messages_name_the_problem(world, tmp_path, capsys):
    fails(capsys, ["inspect", tmp_path / "missing.gguf"], "missing.gguf", "no such file")
    fails(capsys, ["run", tmp_path, "-p", "hi"], "is a directory")
    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(world["model"].read_bytes()[: world["model"].stat().st_size // 2])
    fails(capsys, ["run", truncated, "-p", "hi", "--omega", "off", "-c", "512"], "truncated.gguf", "truncated")
    fails(capsys, ["quantize", sidecar_path_for(world["model"]), tmp_path / "q.gguf", "q4_0"], "Omega sidecar")
    blocker = tmp_path / "file"
    blocker.write_text("x")
    fails(capsys, ["train", "--base-model", world["base"], "--output-dir", blocker, "--max-steps", "1"],
          "is a file")
    fails(capsys, ["demo", "--quick", "--output-dir", blocker], "is a file")


# ------------------------------------------------------------------------------ 9. loose ends

def test_relative_base_model_and_checkpoint_without_resume_files(world, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(world["base"].parent)
    assert zptr_main(["train", "--base-model", world["base"].name, "--output-dir", str(tmp_path / "run"),
                      "--max-steps", "1", "--max-length", "16", "--no-progress"]) == 0
    step = tmp_path / "run" / "step_000001"
    assert json.loads((step / CONFIG_FILE).read_text())["base_model"] == str(world["base"].resolve())
    monkeypatch.chdir(tmp_path)
    shutil.rmtree(step / "trainer_state")
    (step / "README.md").unlink(missing_ok=True)
    capsys.readouterr()
    assert zptr_main(["convert", str(step), "--outfile", "m.gguf", "--outtype", "f32", "--no-progress"]) == 0
    assert (tmp_path / "m.gguf").is_file()


def test_quantize_help_says_what_it_takes(capsys):
    with pytest.raises(SystemExit):
        zptr_main(["quantize", "--help"])
    text = capsys.readouterr().out
    assert "f32, f16 or bf16" in text and "q8_0 for a faithful" not in text


def test_unexpected_errors_are_one_line_too(monkeypatch, world, capsys):
    """A bug (an exception that is not a ZptrError) still gives one line and exit 70."""
    import zptr.app.inspect as inspect

    monkeypatch.setattr(inspect, "describe", lambda path: np.zeros(2)[5])
    fails(capsys, ["inspect", world["model"]], "internal error (a bug): IndexError", code=70)
