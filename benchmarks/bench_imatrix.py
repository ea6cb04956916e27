"""q4_k_m quality with and without an importance matrix, on the bundled SmolLM2-135M.

    .venv/bin/python benchmarks/bench_imatrix.py [--output-dir zptr-bench/imatrix] [--steps 20]

1. Data, all offline: the sample corpus split line by line, even lines the training data, odd
   lines held out; and a generic English text, the Python reference manual's topics shipped with
   every CPython (``pydoc_data.topics``), its first half for calibration, its second half held
   out.
2. A ZPTR checkpoint trained on the training data for ``--steps`` steps (or ``--checkpoint``).
3. Its f32 GGUF (the reference), and q4_k_m three ways: no imatrix; ZPTR's imatrix from the
   training data (what ``zptr convert --imatrix auto`` computes); a generic imatrix from the
   calibration half of the reference manual, on as many chunks as the training data gives.
4. ``zptr eval`` against the f32 GGUF on both held-out texts, which no imatrix saw: mean KLD
   +/- error, 99 % KLD, same top token, PPL ratio. The imatrix computation time is printed.

Results go to ``--output-dir`` (``imatrix.json`` and ``imatrix.md``); nothing is committed.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CTX = 512


def write_data(out: Path, tokenizer) -> dict[str, Path]:
    """The four text files of step 1."""
    import pydoc_data.topics

    from zptr.dataset import read_jsonl, sample_corpus_path

    lines = [line for line in sample_corpus_path().read_text(encoding="utf-8").splitlines() if line.strip()]
    train = out / "train.jsonl"
    train.write_text("\n".join(lines[0::2]) + "\n", encoding="utf-8")
    held = out / "held_out_corpus.jsonl"
    held.write_text("\n".join(lines[1::2]) + "\n", encoding="utf-8")
    examples, _ = read_jsonl(held, tokenizer)  # chat lines rendered as the model reads them
    held_text = out / "held_out_corpus.txt"
    held_text.write_text("\n".join(e.text for e in examples), encoding="utf-8")
    topics = [pydoc_data.topics.topics[key] for key in sorted(pydoc_data.topics.topics)]
    half = len(topics) // 2
    generic = out / "generic_calibration.txt"
    generic.write_text("\n".join(topics[:half]), encoding="utf-8")
    generic_held = out / "held_out_generic.txt"
    generic_held.write_text("\n".join(topics[half:]), encoding="utf-8")
    return {"train": train, "held_out_corpus": held_text, "generic": generic,
            "held_out_generic": generic_held}


def train(out: Path, data: Path, steps: int) -> Path:
    from zptr.training import TrainConfig, train as run

    return run(TrainConfig(base_model="bundled", data=str(data), output_dir=str(out / "train"),
                           max_steps=steps, warmup_steps=max(1, steps // 6),
                           annealing_steps=max(1, 2 * steps // 3), save_steps=steps, max_length=96,
                           progress=False))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output-dir", type=Path, default=ROOT / "zptr-bench" / "imatrix")
    parser.add_argument("--checkpoint", type=Path, default=None, help="skip training: use this checkpoint")
    parser.add_argument("--steps", type=int, default=20, help="training steps (default 20)")
    parser.add_argument("--chunks", type=int, default=None, help="evaluate at most N chunks per text")
    parser.add_argument("-t", "--threads", type=int, default=None,
                        help="threads for the imatrix and the evaluation (default: every core)")
    args = parser.parse_args()

    import os

    from zptr.convert import convert_model, quantize_gguf
    from zptr.convert.imatrix import compute_imatrix, model_from_source
    from zptr.convert.source import load_source
    from zptr.formats.imatrix import write_imatrix
    from zptr.models import load_tokenizer
    from zptr.runtime.evaluate import evaluate

    import torch

    threads = args.threads or os.cpu_count() or 1
    torch.set_num_threads(threads)  # training too
    out = args.output_dir
    out.mkdir(parents=True, exist_ok=True)
    data = write_data(out, load_tokenizer("bundled"))
    checkpoint = args.checkpoint or train(out, data["train"], args.steps)
    print(f"checkpoint {checkpoint}", flush=True)
    f32 = out / "f32.gguf"
    convert_model(checkpoint, f32, "f32", overwrite=True, progress=False)

    source = load_source(checkpoint)
    model = model_from_source(source)
    imatrices, timings = {}, {}

    def calibrate(name: str, calibration: Path, chunks=None) -> None:
        started = time.perf_counter()
        imatrices[name] = compute_imatrix(model, calibration, ctx=CTX, chunks=chunks, threads=threads,
                                          progress=False)
        timings[name] = time.perf_counter() - started
        write_imatrix(out / f"{name.replace(' ', '_')}.imatrix.gguf", imatrices[name])
        print(f"imatrix from {name}: {imatrices[name].chunk_count} chunks of {CTX} tokens in "
              f"{timings[name]:.1f} s ({threads} threads)", flush=True)

    calibrate("training data", data["train"])
    calibrate("generic", data["generic"], chunks=imatrices["training data"].chunk_count)

    variants = {"none": None, **{name: out / f"{name.replace(' ', '_')}.imatrix.gguf" for name in imatrices}}
    results = []
    for variant, imatrix in variants.items():
        quantized = out / f"q4_k_m.{variant.replace(' ', '_')}.gguf"
        quantize_gguf(f32, quantized, "q4_k_m", overwrite=True, imatrix=imatrix)
        for text in ("held_out_corpus", "held_out_generic"):
            figures = evaluate(quantized, data[text], kl_base=f32, ctx=CTX, chunks=args.chunks,
                               threads=threads, progress=False)
            results.append({**figures, "imatrix": variant, "text": text})
            print(f"{variant:>13} on {text}: mean KLD {figures['kld_mean']:.5f} ± "
                  f"{figures['kld_mean_error']:.5f}, same top {100 * figures['same_top']:.2f} %", flush=True)

    rows = ["| imatrix | held-out text | chunks | mean KLD | vs none | 99 % KLD | same top | PPL ratio |",
            "|---|---|---|---|---|---|---|---|"]
    for row in results:
        none = next(r for r in results if r["imatrix"] == "none" and r["text"] == row["text"])
        change = 100 * (row["kld_mean"] / none["kld_mean"] - 1)
        rows.append(f"| {row['imatrix']} | {row['text']} | {row['chunks']} | {row['kld_mean']:.5f} ± "
                    f"{row['kld_mean_error']:.5f} | {change:+.1f} % | {row['kld_p99']:.4f} | "
                    f"{100 * row['same_top']:.2f} ± {100 * row['same_top_error']:.2f} % | "
                    f"{row['ppl_ratio']:.4f} ± {row['ppl_ratio_error']:.4f} |")
    table = "\n".join(rows)
    notes = (f"SmolLM2-135M-Instruct ZPTR checkpoint {checkpoint}; q4_k_m vs its f32 GGUF, -c {CTX}; "
             + "; ".join(f"imatrix from {n}: {imatrices[n].chunk_count} chunks in {timings[n]:.1f} s"
                         for n in imatrices) + f"; {threads} threads")
    print("\n" + table + "\n\n" + notes)
    (out / "imatrix.md").write_text(table + "\n\n" + notes + "\n", encoding="utf-8")
    (out / "imatrix.json").write_text(json.dumps({"checkpoint": str(checkpoint), "threads": threads,
                                                  "imatrix_seconds": timings, "results": results},
                                                 indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
