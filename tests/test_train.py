"""``zptr train`` on tiny fixtures: checkpoints, exact resume, Accelerate, 4-bit, signals, bad input."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

from zptr.app import cli
from zptr.checkpoint import load_checkpoint
from zptr.config import AlphaSchedule
from model_fixtures import save_tiny_model, tiny_model
from zptr.errors import TrainError
from zptr.training import TrainConfig, step_dirs, train
from zptr.training.loop import _micro_batches
from zptr.training.setup import resolve_lora_targets

REPO = Path(__file__).resolve().parents[1]
TRAINED_FILES = ("adapter_model.safetensors", "soul.safetensors", "trainer_state/optimizer.safetensors")


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory, smollm2_tokenizer):
    """A tiny random llama with the real SmolLM2 tokenizer, so the sample corpus tokenizes."""
    return save_tiny_model("llama", tmp_path_factory.mktemp("tiny") / "llama", tokenizer=smollm2_tokenizer)


def quick(tiny_dir, out, **overrides) -> TrainConfig:
    settings = dict(base_model=str(tiny_dir), output_dir=out and str(out), max_steps=4, warmup_steps=1,
                    annealing_steps=2, batch_size=2, max_length=32, save_steps=100, progress=False)
    settings.update(overrides)
    return TrainConfig(**settings)


def max_difference(a: Path, b: Path) -> float:
    worst = 0.0
    for name in TRAINED_FILES:
        x, y = load_file(str(a / name)), load_file(str(b / name))
        assert x.keys() == y.keys()
        worst = max([worst] + [(x[k].double() - y[k].double()).abs().max().item() for k in x])
    return worst


def test_lora_targets_resolve_per_architecture():
    assert resolve_lora_targets(tiny_model("llama")) == ["q_proj", "k_proj", "v_proj", "o_proj"]
    phi3 = tiny_model("phi3")
    assert resolve_lora_targets(phi3) == ["qkv_proj", "o_proj"]
    # The seed's list would silently train o_proj alone on Phi-3: refused, naming what exists.
    with pytest.raises(TrainError, match=r"q_proj,k_proj,v_proj match no linear module.*available: "
                                         r"down_proj,gate_up_proj,o_proj,qkv_proj"):
        resolve_lora_targets(phi3, ["q_proj", "k_proj", "v_proj", "o_proj"])


@pytest.mark.parametrize("arch, rotation, routing", [
    ("phi3", "dense", "resonance"), ("qwen2", "so8", "resonance"), ("gemma3_text", "dense", "threshold")])
def test_every_architecture_rotation_and_routing_trains(tmp_path, smollm2_tokenizer, arch, rotation,
                                                        routing):
    base = save_tiny_model(arch, tmp_path / arch, tokenizer=smollm2_tokenizer)
    final = train(quick(base, tmp_path / "run", max_steps=2, batch_size=1, rotation=rotation,
                        routing=routing))
    ckpt = load_checkpoint(final)
    assert (ckpt.architecture, ckpt.config.rotation, ckpt.config.omega.routing) == (arch, rotation, routing)
    adapter = json.loads((final / "adapter_config.json").read_text())
    assert sorted(adapter["target_modules"]) == sorted(resolve_lora_targets(tiny_model(arch)))
    # Only the router of the chosen mode trains (the other is frozen, so DDP sees no unused parameter).
    trained = json.loads((final / "trainer_state" / "trainer_state.json").read_text())["parameters"]
    used, unused = ("resonance_linear", "boundary") if routing == "resonance" else ("boundary", "resonance_linear")
    assert any(f"omega.{used}." in n for n in trained) and not any(f"omega.{unused}." in n for n in trained)


def test_micro_batches_split_the_global_batch_exactly():
    indices = list(range(12))  # 2 processes x 3 accumulation steps x batch 2
    shards = [_micro_batches(indices, world=2, rank=r, batch_size=2) for r in range(2)]
    assert sorted(i for shard in shards for micro in shard for i in micro) == indices
    assert shards[0][0] + shards[1][0] == [0, 1, 2, 3]  # one step's first micro-batch, both ranks


def test_checkpoints_metrics_and_pruning(tiny_dir, tmp_path):
    out = tmp_path / "run"
    final = train(quick(tiny_dir, out, save_steps=2, save_total_limit=1))
    assert final == out / "step_000004" and step_dirs(out) == [final]  # step 2 pruned
    ckpt = load_checkpoint(final)  # sha256 of every file, soul validity
    assert ckpt.step == 4 and ckpt.architecture == "llama"
    assert ckpt.alpha == pytest.approx(AlphaSchedule(warmup_steps=1, annealing_steps=2).alpha_at(4))
    assert ckpt.phase == "golden"
    # LoRA B starts at zero: trained adapters are non-zero.
    adapter = load_file(str(final / "adapter_model.safetensors"))
    assert any(v.abs().max() > 0 for k, v in adapter.items() if "lora_B" in k)
    # trainer_state holds no pickle: every file is JSON or safetensors.
    for file in (final / "trainer_state").iterdir():
        if file.suffix == ".json":
            json.loads(file.read_text())
        else:
            assert file.suffix == ".safetensors" and load_file(str(file))
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    assert [r["phase"] for r in records] == ["stable", "transitioning", "golden", "golden"]
    assert all(abs(sum(r["routes"].values()) - 1) < 1e-9 and r["tokens_per_s"] > 0 for r in records)
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temp leftovers


def test_resume_is_exact(tiny_dir, tmp_path):
    """6 steps + resume to 12 equals 12 uninterrupted steps (dropout on: RNG restored too)."""
    settings = dict(warmup_steps=2, annealing_steps=6, origin="a default origin text")
    train(quick(tiny_dir, tmp_path / "a", max_steps=6, **settings))
    # No --base-model and no --output-dir: both come from the checkpoint.
    resumed = train(quick(tiny_dir, None, max_steps=12, base_model=None,
                          resume=str(tmp_path / "a" / "step_000006"), **settings))
    straight = train(quick(tiny_dir, tmp_path / "b", max_steps=12, **settings))
    assert max_difference(resumed, straight) <= 1e-6
    assert load_checkpoint(resumed).step == 12
    # Resuming beyond the end, into a run trained on other data, or over a used output dir: refused.
    with pytest.raises(TrainError, match="leaves nothing to train"):
        train(quick(tiny_dir, tmp_path / "a", max_steps=12, resume=str(resumed), **settings))
    other = tmp_path / "other.jsonl"
    other.write_text('{"text": "different data"}\n')
    with pytest.raises(TrainError, match="trained on different data"):
        train(quick(tiny_dir, tmp_path / "a", max_steps=20, resume=str(resumed), data=str(other), **settings))
    with pytest.raises(TrainError, match="already holds checkpoints"):
        train(quick(tiny_dir, tmp_path / "b", max_steps=12))
    # Resuming an earlier checkpoint drops the metrics the abandoned continuation logged.
    train(quick(tiny_dir, tmp_path / "a", max_steps=7, resume=str(tmp_path / "a" / "step_000006"),
                **settings))
    logged = [json.loads(x)["step"] for x in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    assert logged == list(range(1, 8))


def test_gradient_accumulation_equals_the_larger_batch(tiny_dir, tmp_path):
    """Loss normalised by the global token count: 2 x batch 1 accumulated == batch 2."""
    settings = dict(max_steps=3, lora_dropout=0.0)
    accumulated = train(quick(tiny_dir, tmp_path / "acc", batch_size=1, gradient_accumulation_steps=2,
                              **settings))
    batched = train(quick(tiny_dir, tmp_path / "batch", batch_size=2, **settings))
    assert max_difference(accumulated, batched) <= 1e-5


def test_gradient_checkpointing_trains_the_same(tiny_dir, tmp_path):
    settings = dict(max_steps=2, lora_dropout=0.0)
    plain = train(quick(tiny_dir, tmp_path / "plain", **settings))
    recomputed = train(quick(tiny_dir, tmp_path / "ckpt", gradient_checkpointing=True, **settings))
    assert max_difference(plain, recomputed) <= 1e-6


def test_resume_needs_trainer_state(tiny_dir, tmp_path):
    from zptr.checkpoint import save_checkpoint
    from zptr.config import ZptrConfig
    from zptr.head import ZptrHead

    bare = save_checkpoint(tmp_path / "step_000003", ZptrHead(ZptrConfig(hidden_size=64)),
                           base_model=str(tiny_dir), architecture="llama", step=3)
    with pytest.raises(TrainError, match="cannot resume, trainer_state/ lacks optimizer.safetensors"):
        train(quick(tiny_dir, tmp_path, resume=str(bare)))


def run_cli(args, capsys):
    code = cli.main(["train", *map(str, args)])
    return code, capsys.readouterr()


def test_bad_data_line_fails_cleanly(tiny_dir, tmp_path, capsys):
    data = tmp_path / "bad.jsonl"
    data.write_text('{"text": "fine"}\n{"text": 5}\n')
    out = tmp_path / "run"
    code, io = run_cli(["--base-model", tiny_dir, "--data", data, "--output-dir", out,
                        "--max-steps", 1, "--no-progress"], capsys)
    assert code == 1 and "bad.jsonl:2: 'text' must be a non-empty string" in io.err
    assert not step_dirs(out)
    code, io = run_cli(["--base-model", tiny_dir, "--data", data, "--output-dir", out, "--max-steps", 1,
                        "--max-length", 16, "--no-progress", "--skip-bad-lines"], capsys)
    assert code == 0 and "skipped 1 bad lines" in io.out and step_dirs(out)


def test_library_chatter_is_hidden_unless_verbose(tiny_dir, tmp_path):
    """PEFT's read of transformers' deprecated ``is_gradient_checkpointing`` (a FutureWarning on
    every run) and bitsandbytes' optional-kernel notice stay out of a plain run; ``-v`` shows them."""
    def stderr_of(name: str, *extra: str) -> str:
        result = subprocess.run([sys.executable, "-m", "zptr", "train", "--base-model", str(tiny_dir),
                                 "--max-steps", "1", "--warmup-steps", "1", "--annealing-steps", "1",
                                 "--max-length", "16", "--no-progress", "--output-dir", str(tmp_path / name),
                                 *extra], cwd=REPO, capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stderr[-2000:]
        return result.stderr

    assert "is_gradient_checkpointing" in stderr_of("verbose", "-v")
    quiet = stderr_of("quiet")
    assert "is_gradient_checkpointing" not in quiet and "kernels-community" not in quiet, quiet


def test_dry_run_prints_the_estimate_and_writes_nothing(tiny_dir, tmp_path, capsys):
    out = tmp_path / "never"
    code, io = run_cli(["--base-model", tiny_dir, "--output-dir", out, "--dry-run", "--load-in-4bit"], capsys)
    assert code == 0 and not out.exists()
    for label in ("weights", "lora + head", "optimizer (AdamW)", "activations", "estimated peak"):
        assert label in io.out
    code, io = run_cli(["--base-model", tiny_dir, "--dry-run", "--lora-targets", "qkv_proj"], capsys)
    assert code == 1 and "qkv_proj match no linear module" in io.err


def test_four_bit_trains_and_converts(tiny_dir, tmp_path):
    from zptr.convert import convert_model
    from zptr.app.inspect import describe_gguf

    final = train(quick(tiny_dir, tmp_path / "q4", max_steps=3, load_in_4bit=True))
    ckpt = load_checkpoint(final)
    assert ckpt.step == 3 and ckpt.phase == "golden"
    result = convert_model(final, tmp_path / "q4.gguf", outtype="f32", progress=False)
    info = json.dumps(describe_gguf(result.model_path), default=str)
    assert result.model_path.is_file() and result.sidecar_path is not None and result.sidecar_path.is_file()
    assert '"golden"' in info


def wait_for(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.mark.parametrize("signum, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_signal_saves_the_current_step_and_exits(tiny_dir, tmp_path, signum, code):
    out = tmp_path / "run"
    metrics = out / "metrics.jsonl"
    proc = subprocess.Popen([sys.executable, "-m", "zptr", "train", "--base-model", str(tiny_dir),
                             "--output-dir", str(out), "--max-steps", "100000", "--save-steps", "100000",
                             "--max-length", "32", "--no-progress"],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: metrics.exists() and len(metrics.read_text().splitlines()) >= 2, 240,
                 "two training steps")
        proc.send_signal(signum)
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == code, stderr[-2000:]
    [saved] = step_dirs(out)
    steps = len(metrics.read_text().splitlines())
    assert load_checkpoint(saved).step == steps
    assert f"interrupted by {signal.Signals(signum).name}" in stderr
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # nothing half-written


def test_two_processes_match_one_process_with_the_double_batch(tiny_dir, tmp_path):
    common = ["--base-model", str(tiny_dir), "--max-steps", "3", "--warmup-steps", "1",
              "--annealing-steps", "2", "--max-length", "32", "--lora-dropout", "0", "--no-progress"]
    # CPU on any machine (gloo), one thread per process: the two processes share the cores.
    env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    launch = [str(Path(sys.executable).parent / "accelerate"), "launch", "--multi_gpu",
              "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
              "--dynamo_backend", "no", "-m", "zptr", "train"]
    runs = {"ddp": launch + common + ["--batch-size", "1"],
            "one": [sys.executable, "-m", "zptr", "train"] + common + ["--batch-size", "2"]}
    for name, cmd in runs.items():
        result = subprocess.run(cmd + ["--output-dir", str(tmp_path / name)], cwd=REPO, env=env,
                                capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, result.stderr[-3000:]
    assert max_difference(tmp_path / "ddp" / "step_000003", tmp_path / "one" / "step_000003") <= 1e-5
    records = {name: [json.loads(x) for x in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
               for name in runs}
    # The two processes together saw exactly the single process's batch.
    assert [r["tokens"] for r in records["ddp"]] == [r["tokens"] for r in records["one"]]
