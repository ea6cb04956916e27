"""``zptr demo``: the main job end to end on the bundled SmolLM2-135M, offline.

1. the base model: the bundled GGUF dequantised once into a cached HF directory;
2. a short training run on the sample corpus, its alpha schedule compressed into ``--steps`` so
   the soul reaches golden;
3. conversion of the final checkpoint to f16 and q4_k_m GGUF, each with its Omega sidecar, q4_k_m
   quantized with an importance matrix computed from the run's own training data;
4. a generation on llama.cpp with Omega fast and each token's route shown;
5. a short bench (PyTorch float32 vs llama.cpp q4_k_m, Omega off / fast / exact);
6. where every output went (also in ``demo.json``).
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

from ..choices import BENCH_MODES, OmegaMode
from ..errors import ZptrError
from ..fileio import atomic_file
from .args import add_threads, threads

DEFAULT_PROMPT = "Explain in two sentences why the sky is blue."
SUMMARY_FILE = "demo.json"
# Everything the demo writes, relative to --output-dir: --overwrite removes exactly these.
OUTPUTS = ("train", "models", "bench", "generation.txt", SUMMARY_FILE)
# Route tag shown after each generated token.
ROUTE_TAGS = {"BOUNDARY": "B", "DEPTH": "D", "PHASE": "P", "BASE": "·"}



@dataclass(frozen=True)
class Size:
    """How big each stage runs. ``quick`` is for tests and a first look."""

    steps: int
    max_length: int
    bench_paths: tuple
    n_prompt: int
    n_gen: int
    repetitions: int
    generate_tokens: int
    imatrix_chunks: Optional[int]  # 512-token chunks of training data for q4_k_m's imatrix


SIZES = {
    "full": Size(steps=40, max_length=96, bench_paths=("torch-f32", "llama-q4_k_m"),
                 n_prompt=32, n_gen=16, repetitions=2, generate_tokens=48, imatrix_chunks=None),
    "quick": Size(steps=4, max_length=32, bench_paths=("torch-f32", "llama-q4_k_m"),
                  n_prompt=8, n_gen=4, repetitions=1, generate_tokens=8, imatrix_chunks=2),
}


def compressed_schedule(steps: int) -> tuple[int, int]:
    """(warmup, annealing) that end the alpha ramp before the last step, so it ends golden:
    a sixth of the run at the start value, two thirds ramping, the rest held at golden."""
    if steps < 3:
        raise ZptrError(f"--steps must be at least 3 to warm up, anneal and hold golden, got {steps}")
    warmup = max(1, steps // 6)
    annealing = max(1, (2 * steps) // 3)
    return warmup, annealing


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--output-dir", type=Path, default=Path("zptr-demo"),
                        help="where every output goes (default: ./zptr-demo)")
    parser.add_argument("--quick", action="store_true",
                        help="a reduced run (4 steps, tiny bench): a first look, or a test")
    parser.add_argument("--steps", type=int, default=None,
                        help="training steps (default 40; 4 with --quick)")
    parser.add_argument("-p", "--prompt", default=DEFAULT_PROMPT, help="prompt of the generation")
    add_threads(parser)
    parser.add_argument("--overwrite", action="store_true",
                        help="replace the outputs of an earlier demo in --output-dir")


def _write_text(path: Path, text: str) -> None:
    with atomic_file(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def _stage(number: int, total: int, title: str) -> None:
    print(f"\n[{number}/{total}] {title}", flush=True)


def _prepare(output_dir: Path, overwrite: bool) -> None:
    if output_dir.exists() and not output_dir.is_dir():
        raise ZptrError(f"--output-dir {output_dir} is a file, not a directory")
    existing = [name for name in OUTPUTS if (output_dir / name).exists()]
    if existing and not overwrite:
        raise ZptrError(f"{output_dir} already holds demo outputs ({', '.join(existing)}); "
                        "pass --overwrite or choose another --output-dir")
    for name in existing:
        path = output_dir / name
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    output_dir.mkdir(parents=True, exist_ok=True)


def train_stage(output_dir: Path, size: Size, steps: int) -> Path:
    from ..checkpoint import load_checkpoint
    from ..training import TrainConfig, train

    warmup, annealing = compressed_schedule(steps)
    print(f"    {steps} steps on the sample corpus; alpha -5.0 for {warmup} steps, "
          f"ramp to 1.618 over {annealing}, then golden", flush=True)
    checkpoint = train(TrainConfig(base_model="bundled", output_dir=str(output_dir / "train"),
                                   max_steps=steps, warmup_steps=warmup, annealing_steps=annealing,
                                   save_steps=steps, max_length=size.max_length))
    phase = load_checkpoint(checkpoint).phase
    if phase != "golden":
        raise ZptrError(f"{checkpoint}: training ended in phase {phase!r}, not golden")
    print(f"    checkpoint {checkpoint} (phase {phase})", flush=True)
    return checkpoint


# Out type -> the --imatrix of its conversion: quantized below 8 bits, llama.cpp's rounding is
# weighted by the activations of the run's own training data.
CONVERSIONS = {"f16": None, "q4_k_m": "auto"}


def convert_stage(checkpoint: Path, models_dir: Path, imatrix_chunks: Optional[int] = None
                  ) -> dict[str, tuple[Path, Optional[Path]]]:
    from ..convert import convert_model

    from .inspect import describe

    ggufs = {}
    for outtype, imatrix in CONVERSIONS.items():
        result = convert_model(checkpoint, models_dir / f"zptr-smollm2-135m-{outtype}.gguf",
                               outtype=outtype, progress=True, imatrix=imatrix,
                               auto_chunks=imatrix_chunks)
        if result.imatrix_path is not None:
            print(f"    importance matrix {result.imatrix_path}", flush=True)
        info = describe(result.model_path)
        print(f"    {result.model_path} ({result.model_path.stat().st_size / 1e6:.0f} MB), "
              f"sidecar {result.sidecar_path}; zptr phase: {info.get('phase', 'unknown')}", flush=True)
        ggufs[outtype] = (Path(result.model_path), result.sidecar_path and Path(result.sidecar_path))
    return ggufs


def generate_stage(model_path: Path, prompt: str, max_tokens: int, threads: int,
                   output_dir: Path) -> dict[str, Any]:
    from ..runtime.engine import ZptrLlama

    engine = ZptrLlama(model_path, omega=OmegaMode.FAST, n_ctx=1024, n_threads=threads, n_threads_batch=threads)
    try:
        # The GGUF's own chat template: the prompt is one user turn, as `zptr run -p` makes it.
        tokens = engine.chat_tokens([{"role": "user", "content": prompt}])
        result = engine.generate(tokens, max_tokens=max_tokens, temperature=0.0)
        certified = engine.stats.certified_share
    finally:
        engine.close()
    tagged = "".join(f"{piece}⟨{ROUTE_TAGS[route]}⟩" for piece, route in
                     zip(result.pieces, result.route_names))
    histogram = result.route_histogram()
    lines = [f"prompt: {prompt}", f"output: {result.text}", f"routes: {tagged}",
             "legend: " + ", ".join(f"⟨{tag}⟩ {name}" for name, tag in ROUTE_TAGS.items()),
             f"route counts: {histogram}; Omega fast certified {certified:.0%} of tokens; "
             f"decode {result.decode_tps:.1f} tokens/s"]
    text = "\n".join(lines)
    print("    " + text.replace("\n", "\n    "), flush=True)
    _write_text(output_dir / "generation.txt", text + "\n")
    return {"text": result.text, "routes": result.route_names, "route_counts": histogram,
            "certified_share": certified, "decode_tps": result.decode_tps}


def bench_stage(checkpoint: Path, ggufs: dict, size: Size, threads: int, output_dir: Path
                ) -> dict[str, Any]:
    from .bench import BenchConfig, run_bench

    return run_bench(BenchConfig(
        checkpoint=checkpoint, output_dir=output_dir, ggufs=ggufs, threads=threads,
        paths=list(size.bench_paths), omega=list(BENCH_MODES),
        n_prompt=size.n_prompt, n_gen=size.n_gen, repetitions=size.repetitions))


def main(args: argparse.Namespace) -> int:
    size = SIZES["quick" if args.quick else "full"]
    steps = args.steps if args.steps is not None else size.steps
    compressed_schedule(steps)  # refuse a bad --steps before any work
    args.threads = threads(args.threads)
    output_dir: Path = args.output_dir
    _prepare(output_dir, args.overwrite)
    started = time.perf_counter()
    timings: dict[str, float] = {}

    def timed(name: str, fn: Callable[[], Any]) -> Any:
        t0 = time.perf_counter()
        value = fn()
        timings[name] = round(time.perf_counter() - t0, 1)
        return value

    from ..convert.pipeline import imatrix_path_for
    from ..models import smollm2_hf_dir

    total = 5
    _stage(1, total, "base model: bundled SmolLM2-135M-Instruct (no network)")
    base = timed("base_model", smollm2_hf_dir)
    print(f"    HF directory {base}", flush=True)
    _stage(2, total, "training: LoRA + soul + Omega, compressed alpha schedule")
    checkpoint = timed("train", lambda: train_stage(output_dir, size, steps))
    _stage(3, total, "conversion: soul folded into lm_head, f16 and q4_k_m (imatrix from the "
                     "training data) + Omega sidecars")
    ggufs = timed("convert", lambda: convert_stage(checkpoint, output_dir / "models", size.imatrix_chunks))
    _stage(4, total, "generation on llama.cpp (q4_k_m), Omega fast, route of every token")
    generation = timed("generate", lambda: generate_stage(ggufs["q4_k_m"][0], args.prompt,
                                                          size.generate_tokens, args.threads,
                                                          output_dir))
    _stage(5, total, f"bench: {', '.join(size.bench_paths)}; Omega off / fast / exact")
    bench = timed("bench", lambda: bench_stage(checkpoint, ggufs, size, args.threads,
                                               output_dir / "bench"))
    timings["total"] = round(time.perf_counter() - started, 1)

    outputs = {
        "base model (HF dir, cached)": base,
        "checkpoint": checkpoint,
        "training metrics": output_dir / "train" / "metrics.jsonl",
        "GGUF f16": ggufs["f16"][0], "Omega sidecar f16": ggufs["f16"][1],
        "GGUF q4_k_m": ggufs["q4_k_m"][0], "Omega sidecar q4_k_m": ggufs["q4_k_m"][1],
        "imatrix of q4_k_m": imatrix_path_for(ggufs["q4_k_m"][0]),
        "generation with routes": output_dir / "generation.txt",
        **{f"bench {ext}": output_dir / "bench" / f"bench.{ext}" for ext in ("md", "json", "csv", "png")},
        "this summary": output_dir / SUMMARY_FILE,
    }
    summary = {"timings_s": timings, "steps": steps, "quick": bool(args.quick),
               "outputs": {k: str(v) for k, v in outputs.items()}, "generation": generation,
               "bench_summary": bench["summary"]}
    _write_text(output_dir / SUMMARY_FILE, json.dumps(summary, indent=2, ensure_ascii=False) + "\n")

    steps = ", ".join(f"{k} {v:.0f} s" for k, v in timings.items() if k != "total")
    print(f"\ndone in {timings['total']:.0f} s ({steps})")
    print("outputs:")
    width = max(len(k) for k in outputs)
    for name, path in outputs.items():
        print(f"  {name:<{width}}  {path}")
    print(f"\nnext: zptr run {ggufs['q4_k_m'][0]} -p \"...\" --omega fast --show-routes")
    return 0
