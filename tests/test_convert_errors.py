"""Bad input: a clear one-line error, exit 1, nothing written, nothing lost; interrupts
and failures mid-write leave no output; inspect and quantize on good and bad files."""

from __future__ import annotations

import errno
import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import zptr.convert.writer
from zptr.convert import convert_model
from zptr.app.inspect import describe_gguf
from convert_fixtures import make_checkpoint, save_tiny_with_tokenizer, sentencepiece_tokenizer
from zptr.checkpoint import CONFIG_FILE, SOUL_FILE, sha256_file
from zptr.app.cli import main as zptr_main

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """(workdir, base dir, checkpoint dir, f32 model with sidecar) on a tiny llama."""
    work = tmp_path_factory.mktemp("convert-errors")
    sentencepiece_tokenizer(work / "sp")
    base = save_tiny_with_tokenizer("llama", work / "base", work / "sp")
    ckpt = make_checkpoint(base, work / "ckpt")
    model = convert_model(ckpt, work / "good.gguf", "f32", progress=False).model_path
    return work, base, ckpt, model


def _run(argv, capsys) -> tuple[int, str]:
    """Exit code and stderr of ``zptr ARGV``; stdout is kept in ``capsys.printed``."""
    code = zptr_main([str(a) for a in argv])
    captured = capsys.readouterr()
    capsys.printed = captured.out
    return code, captured.err


def _tampered(ckpt: Path, dest: Path, edit) -> Path:
    """A copy of ``ckpt`` changed by ``edit(dir)``, its recorded sha256 updated (a consistent but bad file)."""
    shutil.copytree(ckpt, dest)
    edit(dest)
    meta = json.loads((dest / CONFIG_FILE).read_text())
    meta["files"] = {name: sha256_file(dest / name) for name in meta["files"] if (dest / name).exists()}
    (dest / CONFIG_FILE).write_text(json.dumps(meta))
    return dest


def _edit_soul(key, change):
    def edit(directory: Path) -> None:
        tensors = load_file(str(directory / SOUL_FILE))
        tensors[key] = change(tensors[key])
        save_file(tensors, str(directory / SOUL_FILE))
    return edit


def _edit_adapter_config(**changes):
    def edit(directory: Path) -> None:
        config = json.loads((directory / "adapter_config.json").read_text())
        config.update(changes)
        (directory / "adapter_config.json").write_text(json.dumps(config))
    return edit


def _nan(t):
    t = t.clone()
    t.view(-1)[0] = float("nan")
    return t


CHECKPOINT_DEFECTS = {
    "nan": (_edit_soul("soul.rotation", _nan), "NaN"),
    "not orthogonal": (_edit_soul("soul.rotation", lambda t: t * 1.1), "not orthogonal"),
    "dora": (_edit_adapter_config(use_dora=True), "use_dora"),
}


@pytest.mark.parametrize("defect", CHECKPOINT_DEFECTS)
def test_defective_checkpoint_refused(defect, built, capsys):
    work, base, ckpt, _ = built
    edit, message = CHECKPOINT_DEFECTS[defect]
    bad = _tampered(ckpt, work / f"bad-{defect.replace(' ', '-')}", edit)
    out = work / f"out-{defect.replace(' ', '-')}"
    code, err = _run(["convert", bad, "--outfile", out / "m.gguf", "--outtype", "f32"], capsys)
    assert code == 1 and message in err and len(err.strip().splitlines()) == 1
    assert not out.exists() or not any(out.iterdir())


def test_sha256_mismatch_and_missing_file(built, capsys):
    work, base, ckpt, _ = built
    changed = work / "changed"
    shutil.copytree(ckpt, changed)
    (changed / SOUL_FILE).write_bytes((changed / SOUL_FILE).read_bytes()[:-1] + b"\x00")
    code, err = _run(["convert", changed, "--outfile", work / "x1.gguf", "--outtype", "f32"], capsys)
    assert code == 1 and "sha256 mismatch" in err and not (work / "x1.gguf").exists()
    (changed / "adapter_model.safetensors").unlink()
    code, err = _run(["convert", changed, "--outfile", work / "x1.gguf", "--outtype", "f32"], capsys)
    assert code == 1 and "missing" in err and not (work / "x1.gguf").exists()


def test_pickle_with_code_refused(built, capsys):
    work, base, ckpt, _ = built
    seed = work / "seed-pickle"
    seed.mkdir()
    torch.save({"alpha": torch.tensor(1.0), "so8_rotation": {}, "step": 1, "evil": Path("x")}, seed / "soul.pt")
    code, err = _run(["convert", seed, "--outfile", work / "x2.gguf", "--base-model", base], capsys)
    assert code == 1 and "weights_only" in err and not (work / "x2.gguf").exists()


def test_hidden_size_and_architecture_checked(built, capsys):
    work, base, ckpt, _ = built
    wide = save_tiny_with_tokenizer("llama", work / "wide", work / "sp", hidden_size=128)
    code, err = _run(["convert", ckpt, "--outfile", work / "x3.gguf", "--base-model", wide], capsys)
    assert code == 1 and "hidden size 64" in err and "128" in err and not (work / "x3.gguf").exists()

    from transformers import GPT2Config, GPT2LMHeadModel

    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64)).save_pretrained(work / "gpt2")
    code, err = _run(["convert", work / "gpt2", "--outfile", work / "x4.gguf", "--outtype", "f32"], capsys)
    assert code == 1 and "unsupported architecture 'gpt2'" in err and "llama, mistral, phi3, qwen2" in err
    assert not (work / "x4.gguf").exists()


def test_bad_arguments(built, capsys):
    work, base, ckpt, _ = built
    code, err = _run(["convert", ckpt, "--outfile", work / "x5.gguf", "--outtype", "q9_z"], capsys)
    assert code == 1 and "unknown out type 'q9_z'" in err
    code, err = _run(["convert", work / "sp", "--outfile", work / "x5.gguf"], capsys)
    assert code == 1 and "not a ZPTR checkpoint" in err and not (work / "x5.gguf").exists()
    code, err = _run(["convert", base, "--outfile", work / "x5.gguf", "--base-model", base], capsys)
    assert code == 1 and "--base-model applies to checkpoints only" in err and not (work / "x5.gguf").exists()


def test_existing_output_untouched_without_overwrite(built, capsys):
    work, base, ckpt, model = built
    existing = work / "existing.gguf"
    existing.write_bytes(b"precious")
    code, err = _run(["convert", ckpt, "--outfile", existing, "--outtype", "f32"], capsys)
    assert code == 1 and "exists" in err and "--overwrite" in err
    assert existing.read_bytes() == b"precious"
    code, _ = _run(["convert", ckpt, "--outfile", existing, "--outtype", "f32", "--overwrite", "--no-progress"],
                   capsys)
    assert code == 0 and existing.read_bytes()[:4] == b"GGUF"


def test_failure_mid_write_leaves_nothing(built, monkeypatch):
    """A disk-full error on the fifth tensor: no output file, no temporary file, source intact."""
    work, base, ckpt, _ = built
    out = work / "diskfull"
    out.mkdir()
    before = {p: sha256_file(p) for p in ckpt.iterdir() if p.is_file()}
    calls = {"n": 0}
    real_encode = zptr.convert.writer.encode

    def failing(data, qtype, *rest, **named):
        calls["n"] += 1
        if calls["n"] == 5:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_encode(data, qtype, *rest, **named)

    monkeypatch.setattr(zptr.convert.writer, "encode", failing)
    with pytest.raises(OSError):
        convert_model(ckpt, out / "m.gguf", "f32", progress=False)
    assert list(out.iterdir()) == []
    assert before == {p: sha256_file(p) for p in ckpt.iterdir() if p.is_file()}


def test_quantize_repairs_sidecar_and_refuses_bad_files(built, capsys):
    work, base, ckpt, model = built
    code, _ = _run(["quantize", model, work / "q.gguf", "q8_0"], capsys)
    assert code == 0
    info = describe_gguf(work / "q.gguf")
    assert info["file_type"] == "MOSTLY_Q8_0" and info["sidecar"]["paired"] is True
    assert info["zptr"]["omega.sidecar"] == "q.omega.gguf" and info["phase"] == "golden"

    code, err = _run(["quantize", work / "q.gguf", work / "qq.gguf", "q4_0"], capsys)
    assert code == 1 and "already holds Q8_0 tensors" in err and not (work / "qq.gguf").exists()

    truncated = work / "truncated.gguf"
    truncated.write_bytes(model.read_bytes()[: model.stat().st_size // 2])
    code, err = _run(["quantize", truncated, work / "t.gguf", "q4_0"], capsys)
    assert code == 1 and "truncated" in err and not (work / "t.gguf").exists()
    code, err = _run(["inspect", truncated], capsys)
    assert code == 1 and "truncated" in err
    (work / "notgguf.gguf").write_text("hello")
    code, err = _run(["inspect", work / "notgguf.gguf"], capsys)
    assert code == 1 and "not a GGUF file" in err


def test_inspect_reports_unpaired_sidecar(built, capsys):
    work, base, ckpt, model = built
    other = work / "other.gguf"
    shutil.copy(work / "q.gguf" if (work / "q.gguf").exists() else model, other)
    shutil.copy(model.with_name("good.omega.gguf"), work / "other.omega.gguf")
    info = describe_gguf(other)
    assert info["sidecar"]["paired"] is False and "sha256 mismatch" in info["sidecar"]["reason"]
    code, _ = _run(["inspect", model], capsys)
    assert code == 0
    printed = capsys.printed
    assert "soul.phase: golden" in printed and "paired: True" in printed


def _wait_for_temp(directory: Path, name: str, min_bytes: int, proc, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        temps = list(directory.glob(f".{name}.*.tmp"))
        if temps and temps[0].stat().st_size > min_bytes:
            return
        assert proc.poll() is None, "conversion finished before it could be interrupted"
        time.sleep(0.05)
    raise AssertionError("no temporary output appeared")


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL])
def test_killed_conversion_leaves_no_output(sig, tmp_path):
    """SmolLM2 f32 is big enough to interrupt mid-write. SIGTERM: no output and no temporary file.
    SIGKILL (cannot be handled): the previous output is untouched, no partial file under its name."""
    from zptr.models import smollm2_hf_dir

    out = tmp_path / "smol.gguf"
    if sig == signal.SIGKILL:
        out.write_bytes(b"previous")
    cmd = [sys.executable, "-m", "zptr", "convert", str(smollm2_hf_dir()), "--outfile", str(out),
           "--outtype", "f32", "--overwrite", "--no-progress"]
    with subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE) as proc:
        try:
            _wait_for_temp(tmp_path, out.name, 50_000_000, proc)
            proc.send_signal(sig)
            proc.wait(timeout=60)
        finally:
            if proc.poll() is None:
                proc.kill()
    assert proc.returncode != 0
    if sig == signal.SIGKILL:
        assert out.read_bytes() == b"previous"
    else:
        assert list(tmp_path.iterdir()) == []
