"""``zptr eval --kl-base`` against ``llama-perplexity --kl-divergence`` on the same files, chunks
and threads: wall time of each, interleaved round by round, and their figures side by side.

    .venv/bin/python benchmarks/bench_eval.py --llama-perplexity /path/to/llama-perplexity
    .venv/bin/python benchmarks/bench_eval.py            # zptr eval alone (no binary at hand)

Builds (once, in --workdir) the bundled SmolLM2's f32 and q4_k_m GGUFs with the project's
converter and an evaluation text (the bundled mixed text and sample corpus, repeated to fill the
chunks). llama-perplexity needs two runs for a KL divergence (the base's log-probabilities saved,
then the model against them); its time is the sum of both, as zptr eval's one run decodes both
models. Medians over the rounds with their spread; a spread over 10 % is flagged ``noisy``.
Prints figures; asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

NOISY = 0.10


def build(workdir: Path, chunks: int, ctx: int) -> tuple[Path, Path, Path]:
    """(f32 GGUF, q4_k_m GGUF, text file) of the bundled model, cached in ``workdir``."""
    from zptr.convert import convert_model
    from zptr.dataset import mixed_text_path, sample_corpus_path
    from zptr.models import smollm2_hf_dir

    workdir.mkdir(parents=True, exist_ok=True)
    paths = {kind: workdir / f"smollm2.{kind}.gguf" for kind in ("f32", "q4_k_m")}
    for kind, path in paths.items():
        if not path.exists():
            convert_model(smollm2_hf_dir(), path, kind, progress=False, overwrite=True)
    text_file = workdir / "eval.txt"
    if not text_file.exists():
        corpus = [json.loads(line).get("text", "") for line in
                  sample_corpus_path().read_text(encoding="utf-8").splitlines() if line.strip()]
        text = "\n\n".join([mixed_text_path().read_text(encoding="utf-8"), *corpus])
        # about 4 characters a token: enough repeats for every chunk
        text_file.write_text((text + "\n\n") * (1 + 5 * chunks * ctx // len(text)), encoding="utf-8")
    return paths["f32"], paths["q4_k_m"], text_file


def timed(argv: list[str]) -> tuple[float, str]:
    start = time.perf_counter()
    done = subprocess.run(argv, capture_output=True, text=True)
    elapsed = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"{argv[0]} failed ({done.returncode}):\n{done.stderr[-2000:]}")
    return elapsed, done.stdout + done.stderr


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=Path("zptr-bench") / "bench_eval")
    parser.add_argument("--llama-perplexity", type=Path, default=None, help="llama.cpp's binary")
    parser.add_argument("--chunks", type=int, default=40)
    parser.add_argument("-c", "--ctx", type=int, default=512)
    parser.add_argument("-t", "--threads", type=int, default=2)
    parser.add_argument("-r", "--rounds", type=int, default=3)
    args = parser.parse_args()
    f32, q4, text = build(args.workdir, args.chunks, args.ctx)
    common = ["-c", str(args.ctx), "--chunks", str(args.chunks), "-t", str(args.threads)]
    ours = [sys.executable, "-m", "zptr", "eval", str(q4), "-f", str(text), "--kl-base", str(f32),
            *common, "--json", "--no-progress"]
    base_file = args.workdir / "base.kld"
    theirs = None
    if args.llama_perplexity:
        binary = str(args.llama_perplexity)
        theirs = ([binary, "-m", str(f32), "-f", str(text), "--kl-divergence-base", str(base_file), *common],
                  [binary, "-m", str(q4), "-f", str(text), "--kl-divergence-base", str(base_file),
                   "--kl-divergence", *common])
    times: dict[str, list[float]] = {"zptr eval": [], "llama-perplexity": []}
    figures, their_output = {}, ""
    for _ in range(args.rounds):
        elapsed, output = timed(ours)
        times["zptr eval"].append(elapsed)
        figures = json.loads(output[output.index("{"):output.rindex("}") + 1])
        if theirs:
            first, _ = timed(theirs[0])
            second, their_output = timed(theirs[1])
            times["llama-perplexity"].append(first + second)
    print(f"{args.chunks} chunks x {args.ctx} tokens, -t {args.threads}, {args.rounds} interleaved rounds\n")
    print("| tool | wall s (median) | spread | × llama-perplexity |")
    print("|---|---|---|---|")
    reference = statistics.median(times["llama-perplexity"]) if theirs else None
    for name, values in times.items():
        if not values:
            continue
        median = statistics.median(values)
        spread = (max(values) - min(values)) / median
        ratio = f"{median / reference:.2f}" if reference else "—"
        print(f"| {name} | {median:.1f} | {100 * spread:.0f} %{' noisy' if spread > NOISY else ''} | {ratio} |")
    print(f"\nzptr eval: PPL {figures['ppl']:.4f}, mean KLD {figures['kld_mean']:.6f}, "
          f"same top {100 * figures['same_top']:.2f} %")
    if their_output:
        for label in ("Mean    KLD", "Same top p", "Mean PPL\\(Q\\)"):
            found = re.search(rf"{label}[^\n]*", their_output)
            if found:
                print(f"llama-perplexity: {found.group(0).strip()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
