"""``zptr bench``: tokens/s and fidelity of the PyTorch path against the llama.cpp path.

In the spirit of llama-bench (and with its flags): prefill (``-p N`` prompt tokens in one batch)
and decode (``-n N`` tokens one at a time with the KV cache, greedy) with ``-r`` repetitions
after one warm-up, median and spread. Every path (backend + weight type) runs in its own
subprocess, so its peak RSS is its own; within a path the Omega modes' repetitions interleave.
Quality columns compare each path's logits on a fixed text with the PyTorch float32 ZPTR head in
the same Omega mode, with the same code as ``zptr eval`` (``zptr.runtime.metrics``).

The job is split: ``paths`` (what can be measured, the typed worker job), ``measure`` (machine
ceilings, memory, spread), ``backends`` (the two paths and the worker), ``report`` (rows, ratios,
outputs), ``run`` (orchestration); this module is the command line.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Callable, Sequence

from zptr.choices import BENCH_MODES
from zptr.errors import ZptrError

from ..args import add_threads, threads
from .paths import PATHS
from .run import BenchConfig, ensure_checkpoint, ensure_ggufs, run_bench

__all__ = ["BenchConfig", "run_bench", "add_arguments", "main"]


def _csv_list(allowed: Sequence[str]) -> Callable[[str], list]:
    def parse(value: str) -> list:
        items = [v.strip() for v in value.split(",") if v.strip()]
        bad = [v for v in items if v not in allowed]
        if bad or not items:
            raise argparse.ArgumentTypeError(f"{value!r}: choose from {', '.join(allowed)}")
        return items
    return parse


def default_paths() -> list[str]:
    import torch

    return [n for n, p in PATHS.items() if not p.needs_cuda or torch.cuda.is_available()]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-m", "--model", default="bundled",
                        help="checkpoint directory, HF model directory, 'bundled' (default) or "
                             "'synthetic-1b' (random weights, ~1.1B parameters, built in the cache)")
    parser.add_argument("-p", "--n-prompt", type=int, default=128, help="prompt tokens (prefill; default 128)")
    parser.add_argument("-n", "--n-gen", type=int, default=64, help="generated tokens (decode; default 64)")
    parser.add_argument("-r", "--repetitions", type=int, default=3, help="repetitions per test (default 3)")
    parser.add_argument("--retries", type=int, default=2,
                        help="runs again of a path whose speed figures are noisy (spread above 10 %%; "
                             "default 2); the table says how many runs each path took")
    parser.add_argument("--settle", type=float, default=60.0, metavar="SECONDS",
                        help="wait up to this long, before measuring, for the 1-minute load average "
                             "(still raised by the GGUF conversions just done) to fall below the core "
                             "count; a run that starts above it is flagged noisy (default 60; 0: no wait)")
    add_threads(parser)
    parser.add_argument("--paths", type=_csv_list(tuple(PATHS)), default=None,
                        help=f"comma list of {', '.join(PATHS)} (default: all; nf4 needs CUDA)")
    parser.add_argument("--omega", type=_csv_list(BENCH_MODES), default=list(BENCH_MODES),
                        help="comma list of Omega modes: off, fast, exact (default: all)")
    parser.add_argument("--text-file", type=Path, default=None,
                        help="fixed text for the quality columns (default: the bundled mixed text)")
    parser.add_argument("--output-dir", type=Path, default=Path("zptr-bench"),
                        help="where bench.json/.csv/.md/.png and converted GGUFs go (default ./zptr-bench)")


def main(args: argparse.Namespace) -> int:
    for flag, value in (("-p", args.n_prompt), ("-n", args.n_gen), ("-r", args.repetitions)):
        if value < 1:
            raise ZptrError(f"{flag} must be at least 1, got {value}")
    if args.retries < 0:
        raise ZptrError(f"--retries must be 0 or more, got {args.retries}")
    if not args.settle >= 0:
        raise ZptrError(f"--settle must be 0 or more seconds, got {args.settle}")
    n_threads = threads(args.threads)
    paths = args.paths or default_paths()
    cuda_less = [n for n in paths if PATHS[n].needs_cuda and n not in default_paths()]
    if cuda_less:
        raise ZptrError(f"{', '.join(cuda_less)} needs CUDA, which this machine lacks")
    output_dir = args.output_dir
    if output_dir.exists() and not output_dir.is_dir():
        raise ZptrError(f"--output-dir {output_dir} is a file, not a directory")
    checkpoint = ensure_checkpoint(args.model, output_dir)
    kinds = [PATHS[n].kind for n in paths if PATHS[n].backend == "llama"]
    ggufs = ensure_ggufs(checkpoint, kinds, output_dir / "models", progress=True)
    run_bench(BenchConfig(checkpoint=checkpoint, output_dir=output_dir, paths=paths,
                          omega=args.omega, n_prompt=args.n_prompt, n_gen=args.n_gen,
                          repetitions=args.repetitions, retries=args.retries, settle_s=args.settle,
                          threads=n_threads,
                          text_file=args.text_file, ggufs=ggufs))
    print(f"\nwrote {', '.join(str(output_dir / f) for f in ('bench.md', 'bench.json', 'bench.csv', 'bench.png'))}")
    return 0
