"""Rerun the ZPTR benchmarks with one command and file the results for this machine class.

    .venv/bin/python benchmarks/run_all.py                      # demo (timed) + bench at 135M and ~1B
    .venv/bin/python benchmarks/run_all.py --no-demo --models bundled

1. ``zptr demo`` at its default size, timed (skipped with ``--no-demo``); its final checkpoint is
   the 135M model benchmarked next (a trained soul and Omega router).
2. ``zptr bench`` on each model of ``--models`` (default: the demo's checkpoint, or ``bundled``,
   and ``synthetic-1b``, random weights of TinyLlama 1.1B's shape), every path this machine has,
   Omega off / fast / exact. A run with a noisy row (spread above 10 %, or a busy machine) is
   retried up to ``--tries`` times; a model whose every try stays noisy is not filed.
3. ``benchmarks/results/<date>-<machine>/``: per model ``bench-<model>.md/.json/.csv/.png``,
   ``scale.md`` (how the llama.cpp / PyTorch ratio grows with size, over every model filed in
   that folder, earlier runs' included), ``demo.json`` and
   ``machine.md``. Work files stay in ``--work-dir``, which is not committed.
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
OUTPUTS = ("bench.md", "bench.json", "bench.csv", "bench.png")


def zptr(*argv: str) -> None:
    print("$ zptr " + " ".join(argv), flush=True)
    subprocess.run([sys.executable, "-m", "zptr", *argv], check=True, cwd=ROOT)


def machine_markdown(document: dict, demo_seconds: float | None) -> str:
    m = document["machine"]
    lines = [f"# Machine — {document['date']}", "",
             f"- CPU: {m['cpu']} (`lscpu` model name), `nproc` = {m['nproc']}",
             f"- memory: {m['memory_gb']} GB; load average at bench start: {m['load_average_1m']}",
             f"- measured memory bandwidth: {document['bandwidth_gbs']:.1f} GB/s (read: a threaded numpy sum, "
             f"best of 5); float32 matrix peak {document['compute_gflops']:.0f} GFLOP/s",
             f"- platform: {m['platform']}, Python {m['python']}",
             "- libraries: " + ", ".join(f"{name} {metadata.version(name)}" for name in LIBRARIES)]
    if demo_seconds is not None:
        lines.append(f"- `zptr demo` (default size) total wall time: {demo_seconds:.0f} s")
    return "\n".join(lines) + "\n"


def slug(document: dict) -> str:
    m = document["machine"]
    cpu = re.sub(r"[^a-z0-9]+", "-", m["cpu"].lower()).strip("-")[:40]
    return f"{document['date'][:10]}-{m['nproc']}cpu-{cpu}"


def quiet_bench(model: str, out: Path, args: argparse.Namespace) -> dict | None:
    """The bench of ``model``, retried while a row is noisy; None when every try was."""
    for attempt in range(1, args.tries + 1):
        paths = ["--paths", args.paths] if args.paths else []
        zptr("bench", "--model", model, "-p", args.p, "-n", args.n, "-r", args.r, *paths, "--output-dir", str(out))
        document = json.loads((out / "bench.json").read_text())
        noisy = [f"{r['path']}/{r['omega']}" for r in document["rows"] if r["noisy"]]
        if not noisy:
            return document
        print(f"try {attempt}/{args.tries} of {model}: noisy rows {', '.join(noisy)}", flush=True)
    return None


def scale_table(documents: dict[str, dict]) -> str:
    """Decode and prefill of every path at every size, and llama.cpp q4_k_m over PyTorch f32."""
    lines = ["| model | pp / tg | path | prefill t/s | decode t/s | decode of its roof | prefill of its roof |",
             "|---|---|---|---|---|---|---|"]
    ratios = []
    for name, document in documents.items():
        rows = {r["path"]: r for r in document["rows"] if r["omega"] == "off"}
        lengths = f"{document['settings']['n_prompt']} / {document['settings']['n_gen']}"
        for path, row in rows.items():
            lines.append(f"| {name} | {lengths} | {path} | {row['prefill_tps']:.1f} | {row['decode_tps']:.1f} | "
                         f"{row['roofline_share']:.1%} | {row['compute_share']:.1%} |")
        if "llama-q4_k_m" in rows and "torch-f32" in rows:
            ratios.append(f"- {name}: llama.cpp q4_k_m / PyTorch float32 decode "
                          f"{rows['llama-q4_k_m']['decode_tps'] / rows['torch-f32']['decode_tps']:.2f}x, prefill "
                          f"{rows['llama-q4_k_m']['prefill_tps'] / rows['torch-f32']['prefill_tps']:.2f}x")
    return "\n".join(["# Scale: Omega off, every path", "", *lines, "", *ratios]) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=None,
                        help="checkpoints / HF dirs / 'bundled' / 'synthetic-1b' (default: the demo's "
                             "checkpoint or bundled, and synthetic-1b)")
    parser.add_argument("--no-demo", action="store_true", help="skip the timed demo run")
    parser.add_argument("--work-dir", type=Path, default=ROOT / "zptr-bench", help="GGUFs and demo outputs")
    parser.add_argument("--tries", type=int, default=3, help="runs of a bench while a row stays noisy")
    parser.add_argument("-p", default="128")
    parser.add_argument("-n", default="64")
    parser.add_argument("-r", default="5")
    parser.add_argument("--paths", default=None,
                        help="zptr bench's comma list of paths (default: every path this machine has)")
    args = parser.parse_args()

    demo_seconds, demo_summary = None, None
    first = "bundled"
    if not args.no_demo:
        demo_dir = args.work_dir / "demo"
        started = time.perf_counter()
        zptr("demo", "--output-dir", str(demo_dir), "--overwrite")
        demo_seconds = time.perf_counter() - started
        demo_summary = json.loads((demo_dir / "demo.json").read_text(encoding="utf-8"))
        first = demo_summary["outputs"]["checkpoint"]
    models = args.models or [first, "synthetic-1b"]

    documents: dict[str, dict] = {}
    for model in models:
        demo_checkpoint = Path(model).resolve().is_relative_to((args.work_dir / "demo").resolve())
        label = "135m-demo" if demo_checkpoint else Path(model).name
        document = quiet_bench(model, args.work_dir / f"bench-{label}", args)
        if document is None:
            print(f"{model}: every try was noisy; nothing filed for it", flush=True)
            continue
        documents[label] = document
    if not documents:
        return 1
    target = RESULTS / slug(next(iter(documents.values())))
    target.mkdir(parents=True, exist_ok=True)
    for label in documents:
        for name in OUTPUTS:
            stem, suffix = name.split(".")
            shutil.copy2(args.work_dir / f"bench-{label}" / name, target / f"{stem}-{label}.{suffix}")
    # The scale table covers every model filed for this machine class that day, so a model re-run
    # alone (after its earlier tries were noisy) joins the ones filed before it.
    filed = {path.stem.removeprefix("bench-"): json.loads(path.read_text(encoding="utf-8"))
             for path in sorted(target.glob("bench-*.json"))}
    (target / "scale.md").write_text(scale_table(filed), encoding="utf-8")
    if demo_summary is not None:
        demo_summary["wall_time_s"] = round(demo_seconds, 1)
        (target / "demo.json").write_text(json.dumps(demo_summary, indent=2, ensure_ascii=False) + "\n",
                                          encoding="utf-8")
    if demo_seconds is not None or not (target / "machine.md").exists():  # keep the demo's timing
        (target / "machine.md").write_text(machine_markdown(next(iter(documents.values())), demo_seconds),
                                           encoding="utf-8")
    print(f"\nresults filed in {target}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
