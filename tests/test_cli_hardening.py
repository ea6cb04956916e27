"""The command line under hostile conditions: full or read-only disks, signals at any moment,
GGUFs llama.cpp would abort on, inputs that used to reach "internal error (a bug)", outputs inside
inputs, FIFOs, out-of-range seeds, resumes that must continue the saved run, lenient schemas and
temporaries left by a killed run. Each: one line naming the problem, the right exit code, no
traceback, nothing left behind."""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import typing
from pathlib import Path

import gguf
import numpy as np
import pytest
from safetensors.torch import load_file

from zptr.app.cli import main as zptr_main
from zptr.checkpoint import CONFIG_FILE
from zptr.convert import convert_model
from zptr.fileio import sha256_file
from model_fixtures import make_checkpoint, save_tiny_model
from zptr.trained_tokenizers import build_tokenizer

REPO = Path(__file__).resolve().parents[1]
NO_SPACE = os.strerror(errno.ENOSPC).lower()


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A tiny llama, a checkpoint with LoRA, soul and Omega, its f32 GGUF with sidecar, and a
    two-step training run of a short schedule."""
    root = tmp_path_factory.mktemp("clihard")
    tokenizer = build_tokenizer("sentencepiece", root / "tokenizer")
    base = save_tiny_model("llama", root / "base", tokenizer=tokenizer)
    ckpt = make_checkpoint(base, root / "ckpt")
    model = convert_model(ckpt, root / "model.gguf", "f32", progress=False).model_path
    data = root / "data.jsonl"
    data.write_text("".join(json.dumps({"text": f"the sea is wide and deep, line {i}"}) + "\n"
                            for i in range(8)))
    assert zptr_main(["train", *TRAIN, "--base-model", str(base), "--data", str(data),
                      "--output-dir", str(root / "run"), "--max-steps", "2", "--save-steps", "2"]) == 0
    return {"root": root, "base": base, "ckpt": ckpt, "model": model, "data": data,
            "trained": root / "run" / "step_000002"}


# A schedule and length far from the defaults (warmup 50, annealing 400, max length 512), so a
# resume that forgot them would show.
TRAIN = ["--warmup-steps", "1", "--annealing-steps", "2", "--max-length", "24", "--batch-size", "2",
         "--no-progress"]


def fails(capsys, argv: list, *names: str, code: int = 1) -> str:
    """Run ``zptr argv`` expecting exit ``code`` and one line on stderr naming each of ``names``."""
    capsys.readouterr()
    assert zptr_main([str(a) for a in argv]) == code
    err = capsys.readouterr().err
    # transformers' own bar while it loads a base model is no message
    lines = [line for line in err.splitlines() if line.strip() and not line.startswith("Loading weights")]
    assert len(lines) == 1 and "Traceback" not in err and "internal error" not in err, err[-3000:]
    for name in names:
        assert str(name) in lines[0], (name, err[-3000:])
    return lines[0]


def listing(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


def snapshot(path: Path) -> dict:
    return {str(p): sha256_file(p) for p in sorted(path.rglob("*")) if p.is_file()}


# ------------------------------------------------------------------------------ 6. full or read-only disks

def _no_space(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def _short_write(*args, **kwargs):
    """What numpy's tofile raises on a full disk: no errno, only the byte counts."""
    raise OSError("1048576 requested and 0 written")


def test_a_full_disk_is_one_line_and_leaves_nothing(world, tmp_path, monkeypatch, capsys):
    import zptr.app.imatrix
    import zptr.checkpoint
    import zptr.convert.hf_export
    import zptr.convert.writer

    out = tmp_path / "out"
    out.mkdir()
    with monkeypatch.context() as patch:
        patch.setattr(zptr.convert.writer, "_write_blocks", _no_space)
        fails(capsys, ["convert", world["ckpt"], "--outfile", out / "m.gguf", "--outtype", "f32", "--no-progress"],
              out / "m.gguf", NO_SPACE, code=74)
    with monkeypatch.context() as patch:
        patch.setattr(zptr.convert.hf_export, "_write_safetensors", _no_space)
        fails(capsys, ["convert", world["ckpt"], "--outfile", out / "m.gguf", "--outtype", "f32",
                       "--export-hf", out / "hf", "--no-progress"], out / "hf", NO_SPACE, code=74)
    with monkeypatch.context() as patch:
        patch.setattr(zptr.app.imatrix, "write_imatrix", _short_write)
        patch.setattr(shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(1 << 30, 1 << 30, 0))
        fails(capsys, ["imatrix", world["ckpt"], "--data", world["data"], "-o", out / "m.imatrix.gguf",
                       "-c", "16", "--no-progress"], out / "m.imatrix.gguf", NO_SPACE, code=74)
    assert listing(out) == []
    with monkeypatch.context() as patch:
        patch.setattr(zptr.checkpoint, "save_file", _no_space)
        fails(capsys, ["train", *TRAIN, "--base-model", world["base"], "--data", world["data"],
                       "--output-dir", out / "run", "--max-steps", "1"], out / "run" / "step_000001",
              NO_SPACE, code=74)
    assert listing(out) == []  # no metrics.jsonl, no run directory


def test_a_read_only_output_directory_is_one_line(world, tmp_path, monkeypatch, capsys):
    import tempfile

    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    if os.access(locked, os.W_OK):  # root writes anyway: the file system refuses instead
        def refused(*args, dir=None, **kwargs):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), dir)

        monkeypatch.setattr(tempfile, "mkstemp", refused)
        monkeypatch.setattr(tempfile, "mkdtemp", refused)
    try:
        line = fails(capsys, ["convert", world["ckpt"], "--outfile", locked / "m.gguf", "--outtype", "f32",
                              "--no-progress"],
                     locked / "m.gguf", code=74)
        assert "read-only" in line or "permission denied" in line, line
        assert listing(locked) == []
    finally:
        locked.chmod(0o755)


# ------------------------------------------------------------------------------ 7. signals

@pytest.mark.parametrize("signum, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_signal_while_the_config_loads_is_an_interrupt(signum, code, world, tmp_path, monkeypatch, capsys):
    """transformers' config loader is wrapped in ``except Exception``: an interrupt must go
    through it, not come out as "transformers cannot read this config"."""
    import transformers

    def interrupted(*args, **kwargs):
        os.kill(os.getpid(), signum)
        time.sleep(5)  # the handler raises before this ends

    monkeypatch.setattr(transformers.AutoConfig, "from_pretrained", interrupted)
    line = fails(capsys, ["convert", world["base"], "--outfile", tmp_path / "m.gguf", "--no-progress"], code=code)
    assert "interrupted by" in line and "config" not in line
    assert listing(tmp_path) == []


def _loading_torch(pid: int) -> bool:
    try:
        return "libtorch" in Path(f"/proc/{pid}/maps").read_text()
    except OSError:
        return False


@pytest.mark.parametrize("signum, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_signal_during_the_imports_exits_cleanly(signum, code, world, tmp_path):
    """The moment torch's library is mapped, the subcommand's imports are under way."""
    proc = subprocess.Popen([sys.executable, "-m", "zptr", "convert", str(world["base"]), "--outfile",
                             str(tmp_path / "m.gguf"), "--no-progress"], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while not _loading_torch(proc.pid):
        assert proc.poll() is None and time.monotonic() < deadline
        time.sleep(0.002)
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == code and "Traceback" not in err, err[-2000:]
    assert listing(tmp_path) == []


# ------------------------------------------------------------------------------ 8, 13. GGUFs llama.cpp refuses

def rewrite_gguf(source: Path, dest: Path, keys: dict, drop: tuple = ()) -> Path:
    """A copy of ``source`` with ``keys`` changed (None: removed) and the tensors ``drop`` left out."""
    reader = gguf.GGUFReader(str(source))
    arch = reader.get_field("general.architecture").contents()
    writer = gguf.GGUFWriter(str(dest), arch)
    for key, found in reader.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture" or keys.get(key, 0) is None:
            continue
        sub = found.types[1] if len(found.types) > 1 else None
        writer.add_key_value(key, keys.get(key, found.contents()), found.types[0], sub_type=sub)
    for key, value in keys.items():
        if value is not None and reader.get_field(key) is None:
            writer.add_uint32(key, value)
    for tensor in reader.tensors:
        if tensor.name not in drop:
            writer.add_tensor(tensor.name, np.array(tensor.data))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return dest


REFUSED_GGUFS = {
    "no blocks": ({"llama.block_count": 0}, (), "llama.block_count must lie in 1..512"),
    "a thousand blocks": ({"llama.block_count": 1000}, (), "llama.block_count must lie in 1..512"),
    "more blocks than tensors": ({"llama.block_count": 3}, (), "llama.block_count is 3 but"),
    "a block missing": ({}, tuple(f"blk.1.{n}.weight" for n in ("attn_norm", "ffn_down", "ffn_gate", "ffn_up",
                                                              "ffn_norm", "attn_k", "attn_output", "attn_q",
                                                              "attn_v")),
                        "llama.block_count is 2 but"),
    "no heads": ({"llama.attention.head_count": 0}, (), "llama.attention.head_count must be a positive"),
    "heads not a multiple of kv heads": ({"llama.attention.head_count_kv": 3}, (), "key/value heads"),
    "too many heads for q": ({"llama.attention.head_count": 8}, (), "blk.0.attn_q.weight has shape"),
    "embedding length off": ({"llama.embedding_length": 65}, (), "llama.embedding_length is 65"),
    "no embedding": ({}, ("token_embd.weight",), "no token_embd.weight"),
}


@pytest.mark.parametrize("defect", sorted(REFUSED_GGUFS))
def test_ggufs_llama_cpp_would_abort_on_are_refused(defect, world, tmp_path, capsys):
    keys, drop, message = REFUSED_GGUFS[defect]
    bad = rewrite_gguf(world["model"], tmp_path / "bad.gguf", keys, drop)
    fails(capsys, ["inspect", bad], "bad.gguf", message)
    fails(capsys, ["run", bad, "-p", "hi", "-n", "2", "--omega", "off", "-c", "64"], "bad.gguf", message)


def test_run_and_serve_of_a_gguf_with_a_thousand_blocks_do_not_abort(world, tmp_path):
    bad = rewrite_gguf(world["model"], tmp_path / "bad.gguf", {"llama.block_count": 1000})
    for argv in (["run", str(bad), "-p", "hi", "-n", "2"], ["serve", str(bad), "--port", "0"]):
        proc = subprocess.run([sys.executable, "-m", "zptr", *argv], cwd=REPO, capture_output=True,
                              text=True, timeout=120)
        lines = [line for line in proc.stderr.splitlines() if line.strip()]
        assert proc.returncode == 1 and len(lines) == 1 and "block_count" in lines[0], proc.stderr[-2000:]


def test_the_unchanged_gguf_passes_the_check(world, capsys):
    capsys.readouterr()
    assert zptr_main(["inspect", str(world["model"])]) == 0
    rewritten = rewrite_gguf(world["model"], world["root"] / "same.gguf", {})
    assert zptr_main(["inspect", str(rewritten)]) == 0


# ------------------------------------------------------------------------------ 9. inputs that were bugs

def test_inputs_that_were_internal_errors(world, tmp_path, capsys):
    base, data = world["base"], world["data"]
    train = ["train", *TRAIN, "--base-model", base, "--max-steps", "1"]
    fails(capsys, [*train, "--seed", "-1", "--output-dir", tmp_path / "r0", "--data", data], "--seed",
          "0..4294967295")
    deep = tmp_path / "deep.jsonl"
    deep.write_text('{"text": "fine"}\n' + "[" * 100_000 + "\n")
    fails(capsys, [*train, "--data", deep, "--output-dir", tmp_path / "r1"], "deep.jsonl:2", "nested too deeply")
    fails(capsys, ["imatrix", world["ckpt"], "--data", deep, "-o", tmp_path / "i.gguf", "--no-progress"],
          "deep.jsonl:2",
          "nested too deeply")
    surrogate = tmp_path / "surrogate.jsonl"
    surrogate.write_text('{"text": "half a pair \\ud800 here"}\n')
    fails(capsys, [*train, "--data", surrogate, "--output-dir", tmp_path / "r2"], "surrogate.jsonl:1",
          "lone surrogate")
    for change, names, code in [({"step": 2**70}, ["step must be at most 4294967295"], 1),
                                ({"base_model": "b" * 10_000_000}, [os.strerror(errno.ENAMETOOLONG)], 74)]:
        ckpt = tmp_path / "ckpt"
        shutil.rmtree(ckpt, ignore_errors=True)
        shutil.copytree(world["ckpt"], ckpt)
        meta = json.loads((ckpt / CONFIG_FILE).read_text())
        (ckpt / CONFIG_FILE).write_text(json.dumps({**meta, **change}))
        capsys.readouterr()
        assert zptr_main(["convert", str(ckpt), "--outfile", str(tmp_path / "m.gguf"), "--no-progress"]) == code
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "internal error" not in err and len(err) < 1000, err[:1000]
        assert all(name in err for name in names), err
    assert not [p for p in tmp_path.iterdir() if p.suffix == ".gguf"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith("r")]


# ------------------------------------------------------------------------------ 10. output inside an input

def test_a_resume_never_writes_into_its_own_checkpoint(world, tmp_path, capsys):
    ckpt = tmp_path / "run" / "step_000002"
    shutil.copytree(world["trained"], ckpt)
    before = snapshot(tmp_path)
    for output in (ckpt, ckpt / "more"):
        fails(capsys, ["train", "--resume", ckpt, "--output-dir", output, "--max-steps", "4", "--no-progress"],
              "input", str(ckpt.resolve()))
    assert snapshot(tmp_path) == before and listing(ckpt.parent) == ["step_000002"]


# ------------------------------------------------------------------------------ 11. FIFOs and seeds

def test_a_fifo_is_refused_not_read_forever(tmp_path):
    fifo = tmp_path / "m.gguf"
    os.mkfifo(fifo)
    proc = subprocess.run([sys.executable, "-m", "zptr", "run", str(fifo), "-p", "hi"], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and "not a regular file" in proc.stderr, proc.stderr[-2000:]
    assert proc.stderr.count("\n") == 1


@pytest.mark.parametrize("seed", [2**64, -1, 2**70])
def test_seeds_outside_64_bits_are_refused(seed, world, capsys):
    fails(capsys, ["run", world["model"], "-p", "hi", "-n", "2", "-s", seed],
          "seed must lie in 0..18446744073709551615")


def test_the_server_refuses_the_same_seeds():
    from zptr.errors import ConfigError
    from zptr.runtime.sampling import SamplingSettings

    assert SamplingSettings(seed=2**64 - 1).seed == 2**64 - 1
    with pytest.raises(ConfigError, match=r"^seed must lie in 0\.\.18446744073709551615"):
        SamplingSettings(seed=2**64)  # what the server builds from a request's fields


# ------------------------------------------------------------------------------ 12. exact resume

def trained_alpha(step_dir: Path) -> float:
    return float(load_file(str(step_dir / "soul.safetensors"))["soul.alpha"])


def test_a_resume_continues_the_saved_run(world, tmp_path, capsys):
    """Train 4 steps straight, or 2 and resume to 4 with no other flag: the same schedule, the
    same final alpha, the same weights. A flag that contradicts the saved run is refused."""
    common = ["--base-model", world["base"], "--data", world["data"]]
    assert zptr_main([str(a) for a in ["train", *TRAIN, *common, "--output-dir", tmp_path / "straight",
                                       "--max-steps", "4", "--save-steps", "100"]]) == 0
    run = tmp_path / "broken"
    shutil.copytree(world["trained"].parent, run)
    assert zptr_main([str(a) for a in ["train", "--resume", run / "step_000002", "--max-steps", "4",
                                       "--no-progress"]]) == 0
    straight, resumed = tmp_path / "straight" / "step_000004", run / "step_000004"
    assert trained_alpha(resumed) == pytest.approx(1.618) == trained_alpha(straight)
    for name in ("adapter_model.safetensors", "soul.safetensors"):
        a, b = load_file(str(straight / name)), load_file(str(resumed / name))
        assert a.keys() == b.keys()
        assert max((a[k].double() - b[k].double()).abs().max().item() for k in a) <= 1e-6, name
    state = json.loads((resumed / "trainer_state" / "trainer_state.json").read_text())
    assert state["config"]["warmup_steps"] == 1 and state["config"]["max_length"] == 24
    before = snapshot(run)
    fails(capsys, ["train", "--resume", run / "step_000002", "--max-steps", "6", "--warmup-steps", "50",
                   "--no-progress"], "--warmup-steps 50 contradicts", "trained with 1")
    fails(capsys, ["train", "--resume", run / "step_000002", "--max-steps", "6", "--max-length", "512",
                   "--no-progress"], "--max-length 512 contradicts")
    assert snapshot(run) == before
    # Repeating a saved value is no contradiction.
    assert zptr_main([str(a) for a in ["train", "--resume", run / "step_000004", "--max-steps", "5",
                                       "--warmup-steps", "1", "--no-progress"]]) == 0


# ------------------------------------------------------------------------------ 13. one schema

def _drop(*path):
    def change(meta):
        meta = json.loads(json.dumps(meta))
        node = meta
        for key in path[:-1]:
            node = node[key]
        del node[path[-1]]
        return meta
    return change


LENIENT_CONFIGS = {
    "architecture null": (lambda m: {**m, "architecture": None}, "architecture must be a string"),
    "architecture missing": (_drop("architecture"), "'architecture' missing"),
    "architecture unknown": (lambda m: {**m, "architecture": "gpt17"}, "unsupported architecture 'gpt17'"),
    "step missing": (_drop("step"), "'step' missing"),
    "rotation missing": (_drop("zptr", "rotation"), "zptr lacks the key 'rotation'"),
    "schedule missing": (_drop("zptr", "schedule"), "zptr lacks the key 'schedule'"),
    "omega missing": (_drop("zptr", "omega"), "zptr lacks the key 'omega'"),
    "omega threshold missing": (_drop("zptr", "omega", "depth_threshold"),
                                "zptr.omega lacks the key 'depth_threshold'"),
    "unknown key": (lambda m: {**m, "stepp": 3}, "unknown keys stepp"),
}


@pytest.mark.parametrize("defect", sorted(LENIENT_CONFIGS))
def test_checkpoint_configs_are_read_by_one_strict_schema(defect, world, tmp_path, capsys):
    change, message = LENIENT_CONFIGS[defect]
    ckpt = tmp_path / "ckpt"
    shutil.copytree(world["ckpt"], ckpt)
    meta = json.loads((ckpt / CONFIG_FILE).read_text())
    (ckpt / CONFIG_FILE).write_text(json.dumps(change(meta)))
    fails(capsys, ["convert", ckpt, "--outfile", tmp_path / "m.gguf", "--outtype", "f32", "--no-progress"],
          CONFIG_FILE, message)
    fails(capsys, ["inspect", ckpt], CONFIG_FILE, message)
    assert not (tmp_path / "m.gguf").exists()


def test_training_messages_take_the_servers_roles(world, tmp_path, capsys):
    from zptr.app.server import Message
    from zptr.dataset import CHAT_ROLES

    assert typing.get_args(Message.model_fields["role"].annotation) == CHAT_ROLES
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"messages": [{"role": "bad", "content": "hello"}]}) + "\n")
    fails(capsys, ["train", *TRAIN, "--base-model", world["base"], "--data", bad, "--output-dir",
                   tmp_path / "run", "--max-steps", "1"], "bad.jsonl:1", "messages[0].role must be one of")


# ------------------------------------------------------------------------------ 14. temporaries of a killed run

def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_temporaries_of_a_killed_run_are_removed_by_the_next(world, tmp_path, capsys):
    dead = _dead_pid()
    stale_file = tmp_path / f".m.gguf.{dead}.abcd1234.tmp"
    stale_file.write_bytes(b"\0" * 100_000)
    stale_dir = tmp_path / f".m.gguf.{dead}.abcd1234.work5678.tmp"  # a quantizer's scratch directory
    stale_dir.mkdir()
    (stale_dir / "bf16.gguf").write_bytes(b"\0" * 1000)
    live = tmp_path / f".m.gguf.{os.getpid()}.live0000.tmp"  # a run still writing
    live.write_bytes(b"x")
    foreign = [tmp_path / f".other.gguf.{dead}.abcd1234.tmp", tmp_path / f".m.gguf.5.{dead}.abcd1234.tmp",
               tmp_path / f".m.gguf.{dead}.abcd1234.old"]
    for path in foreign:
        path.write_bytes(b"y")
    capsys.readouterr()
    assert zptr_main(["convert", str(world["ckpt"]), "--outfile", str(tmp_path / "m.gguf"), "--outtype", "f32",
                      "--no-progress"]) == 0
    assert not stale_file.exists() and not stale_dir.exists()
    assert live.exists() and all(p.exists() for p in foreign)
    assert listing(tmp_path) == sorted([live.name, *(p.name for p in foreign), "m.gguf", "m.omega.gguf"])


def test_a_sigkilled_conversion_is_cleaned_up_by_the_next(world, tmp_path):
    """SIGKILL while the GGUF is written (held there by a slow disk: a sleep in each block)."""
    slow = ("import sys, time, zptr.convert.writer as w; enc = w.encode\n"
            "w.encode = lambda *a, **k: (time.sleep(0.5), enc(*a, **k))[1]\n"
            "from zptr.app.cli import main; sys.exit(main(sys.argv[1:]))\n")
    argv = ["convert", str(world["ckpt"]), "--outfile", str(tmp_path / "m.gguf"), "--outtype", "f32", "--no-progress"]
    proc = subprocess.Popen([sys.executable, "-c", slow, *argv], cwd=REPO, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not any(p.stat().st_size > 1000 for p in tmp_path.glob(".m.gguf.*.tmp")):
        assert proc.poll() is None and time.monotonic() < deadline
        time.sleep(0.05)
    proc.kill()
    proc.wait()
    assert [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    assert zptr_main(argv) == 0
    assert listing(tmp_path) == ["m.gguf", "m.omega.gguf"]


def test_the_server_answers_400_to_an_out_of_range_seed(world):
    from fastapi.testclient import TestClient

    from zptr.app.serve import DEFAULT_MAX_BODY_BYTES, DEFAULT_TIMEOUT_S
    from zptr.app.server import create_app
    from zptr.runtime.engine import ZptrLlama

    llm = ZptrLlama(world["model"], omega="off", n_ctx=128, n_threads=1, n_threads_batch=1)
    app = create_app(llm, model_name="m", max_body_bytes=DEFAULT_MAX_BODY_BYTES, timeout=DEFAULT_TIMEOUT_S)
    try:
        with TestClient(app, base_url="http://localhost") as http:
            for seed in (2**64, -1):
                answer = http.post("/v1/completions", json={"prompt": "hi", "max_tokens": 2, "seed": seed})
                assert answer.status_code == 400, answer.text
                assert "seed must lie in 0..18446744073709551615" in answer.json()["error"]["message"]
            assert http.post("/v1/completions", json={"prompt": "hi", "max_tokens": 2,
                                                      "seed": 2**64 - 1}).status_code == 200
    finally:
        llm.close()
