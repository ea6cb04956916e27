"""Rerun the ZPTR benchmarks with one command and file the results for this machine class.

    .venv/bin/python benchmarks/run_all.py              # full demo (timed) + full bench
    .venv/bin/python benchmarks/run_all.py --no-demo --model CHECKPOINT_DIR

1. ``zptr demo`` at its default size, timed (skipped with ``--no-demo``); its final checkpoint is
   the model benchmarked next (a trained soul and Omega router), unless ``--model`` is given.
2. ``zptr bench`` over every path this machine has (PyTorch float32 / bfloat16 / NF4 with CUDA,
   llama.cpp f16 / q8_0 / q4_k_m), Omega off / fast / exact.
3. ``benchmarks/results/<date>-<machine>/``: bench.md/.json/.csv/.png, demo.json and
   machine.md (CPU, cores, memory, load, library versions). Work files (GGUFs, the demo's
   outputs) stay in ``--work-dir``, which is not committed.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
LIBRARIES = ("torch", "transformers", "peft", "llama-cpp-python", "gguf", "numpy")


def zptr(*argv: str) -> None:
    command = [sys.executable, "-m", "zptr", *argv]
    print("$ zptr " + " ".join(argv), flush=True)
    subprocess.run(command, check=True, cwd=ROOT)


def machine_markdown(document: dict, demo_seconds: float | None) -> str:
    m = document["machine"]
    lines = [f"# Machine — {document['date']}", "",
             f"- CPU: {m['cpu']} (`lscpu` model name), `nproc` = {m['nproc']}",
             f"- memory: {m['memory_gb']} GB; load average at bench start: {m['load_average_1m']}",
             f"- measured memory bandwidth: {document['bandwidth_gbs']:.1f} GB/s "
             f"(threaded numpy copy, best of 5)",
             f"- platform: {m['platform']}, Python {m['python']}",
             "- libraries: " + ", ".join(f"{name} {metadata.version(name)}" for name in LIBRARIES)]
    if demo_seconds is not None:
        lines.append(f"- `zptr demo` (default size) total wall time: {demo_seconds:.0f} s")
    return "\n".join(lines) + "\n"


def slug(document: dict) -> str:
    m = document["machine"]
    cpu = re.sub(r"[^a-z0-9]+", "-", m["cpu"].lower()).strip("-")[:40]
    return f"{document['date'][:10]}-{m['nproc']}cpu-{cpu}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="checkpoint / HF dir / 'bundled' to bench (default: the demo's checkpoint)")
    parser.add_argument("--no-demo", action="store_true", help="skip the timed demo run")
    parser.add_argument("--work-dir", type=Path, default=ROOT / "zptr-bench", help="GGUFs and demo outputs")
    parser.add_argument("-p", default="128")
    parser.add_argument("-n", default="64")
    parser.add_argument("-r", default="3")
    args = parser.parse_args()
    if args.no_demo and not args.model:
        parser.error("--no-demo needs --model")

    demo_seconds, demo_summary = None, None
    model = args.model
    if not args.no_demo:
        demo_dir = args.work_dir / "demo"
        started = time.perf_counter()
        zptr("demo", "--output-dir", str(demo_dir), "--overwrite")
        demo_seconds = time.perf_counter() - started
        demo_summary = json.loads((demo_dir / "demo.json").read_text(encoding="utf-8"))
        model = model or demo_summary["outputs"]["checkpoint"]

    bench_dir = args.work_dir / "bench"
    zptr("bench", "--model", model, "-p", args.p, "-n", args.n, "-r", args.r, "--output-dir", str(bench_dir))
    document = json.loads((bench_dir / "bench.json").read_text())
    target = RESULTS / slug(document)
    target.mkdir(parents=True, exist_ok=True)
    for name in ("bench.md", "bench.json", "bench.csv", "bench.png"):
        shutil.copy2(bench_dir / name, target / name)
    if demo_summary is not None:
        demo_summary["wall_time_s"] = round(demo_seconds, 1)
        (target / "demo.json").write_text(json.dumps(demo_summary, indent=2, ensure_ascii=False) + "\n",
                                          encoding="utf-8")
    (target / "machine.md").write_text(machine_markdown(document, demo_seconds), encoding="utf-8")
    print(f"\nresults filed in {target}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
