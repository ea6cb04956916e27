"""Training throughput and memory of ``zptr train`` on the bundled SmolLM2-135M.

For full precision, 4-bit NF4 and full precision with gradient checkpointing, each run is a
fresh subprocess (so its peak RSS is its own): it trains ``--steps`` steps on the sample corpus
and reports tokens/s (median over the steps after the first, which pays one-time costs) and its
peak RSS, printed next to the
``--dry-run`` estimate for the same settings.

    .venv/bin/python benchmarks/bench_train.py [--steps 8] [--batch-size 2] [--max-length 128]
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

# label -> TrainConfig settings of that mode
MODES = {"full precision": {},
         "4-bit NF4": {"load_in_4bit": True},
         "full precision + gradient checkpointing": {"gradient_checkpointing": True}}


def child(args: argparse.Namespace) -> None:
    """Train once in this process and print one JSON line of figures."""
    from zptr.memory import estimate
    from zptr.training import TrainConfig, train

    with tempfile.TemporaryDirectory() as out:
        cfg = TrainConfig(base_model=args.base_model, max_steps=args.steps, warmup_steps=2,
                          annealing_steps=args.steps, batch_size=args.batch_size,
                          max_length=args.max_length, save_steps=10 ** 9, output_dir=out,
                          progress=False, **json.loads(args.mode))
        train(cfg)
        records = [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]
    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB
    print(json.dumps({"tokens_per_s": statistics.median(r["tokens_per_s"] for r in records[1:]),
                      "first_loss": records[0]["loss"], "last_loss": records[-1]["loss"],
                      "peak_rss": peak_rss, "estimate": estimate(cfg).total}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base-model", default="bundled")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--mode", default="{}", help=argparse.SUPPRESS)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return
    from zptr.models import smollm2_hf_dir

    if args.base_model == "bundled":
        smollm2_hf_dir()  # build the cached HF directory outside the timed children
    rows = []
    for label, settings in MODES.items():
        cmd = [sys.executable, __file__, "--child", "--base-model", args.base_model,
               "--steps", str(args.steps), "--batch-size", str(args.batch_size),
               "--max-length", str(args.max_length), "--mode", json.dumps(settings)]
        result = subprocess.run(cmd, capture_output=True, text=True)
        if result.returncode != 0:
            sys.exit(f"{label}: training failed\n{result.stderr[-2000:]}")
        rows.append((label, json.loads(result.stdout.strip().splitlines()[-1])))
    mib = 2 ** 20
    print(f"zptr train on {args.base_model}: {args.steps} steps, batch {args.batch_size} x "
          f"{args.max_length} tokens, CPU threads: {__import__('torch').get_num_threads()}")
    print("| mode | tokens/s | loss first -> last | dry-run estimate (MiB) | peak RSS (MiB) | estimate / measured |")
    print("|---|---|---|---|---|---|")
    for label, r in rows:
        print(f"| {label} | {r['tokens_per_s']:.0f} | {r['first_loss']:.3f} -> {r['last_loss']:.3f} | "
              f"{r['estimate'] / mib:.0f} | {r['peak_rss'] / mib:.0f} | {r['estimate'] / r['peak_rss']:.2f} |")


if __name__ == "__main__":
    main()
