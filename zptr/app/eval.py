"""``zptr eval MODEL.gguf -f TEXT [--kl-base REF]``: perplexity, and against a base model
llama-perplexity's KL-divergence statistics (flags as llama-perplexity: ``-f``, ``-c``,
``--chunks``; ``--kl-base`` takes the base itself, a GGUF or a checkpoint, instead of a file of
its saved logits)."""

from __future__ import annotations

import argparse
import json

from ..choices import EVAL_MODES
from ..runtime.evaluate import DEFAULT_CTX, evaluate
from .args import add_progress, add_threads, threads

# (label, key, scale, unit) of the text report, in llama-perplexity's order; keys absent from
# the statistics (no base) are left out.
REPORT = (
    ("PPL", "ppl", 1.0, ""),
    ("PPL(base)", "ppl_base", 1.0, ""),
    ("PPL/PPL(base)", "ppl_ratio", 1.0, ""),
    ("Mean KLD", "kld_mean", 1.0, ""),
    ("Maximum KLD", "kld_max", 1.0, ""),
    ("99.9% KLD", "kld_p99.9", 1.0, ""),
    ("99.0% KLD", "kld_p99", 1.0, ""),
    ("95.0% KLD", "kld_p95", 1.0, ""),
    ("90.0% KLD", "kld_p90", 1.0, ""),
    ("Median KLD", "kld_median", 1.0, ""),
    ("RMS Δp", "rms_dp", 100.0, " %"),
    ("Same top p", "same_top", 100.0, " %"),
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", help="GGUF to evaluate (its Omega sidecar is used with --omega exact)")
    parser.add_argument("-f", "--file", required=True, metavar="TEXT", help="plain UTF-8 text to score")
    parser.add_argument("--kl-base", default=None, metavar="REF",
                        help="base model to compare with: a GGUF (e.g. the f32 conversion) or a checkpoint "
                             "(PyTorch float32, LoRA merged)")
    parser.add_argument("-c", "--ctx-size", dest="ctx", type=int, default=DEFAULT_CTX,
                        help=f"tokens per chunk; the second half of each is scored (default {DEFAULT_CTX})")
    parser.add_argument("--chunks", type=int, default=None, help="score at most N chunks (default: all)")
    parser.add_argument("--omega", choices=EVAL_MODES, default="off",
                        help="off: the GGUF alone; exact: Omega on both sides (default off)")
    parser.add_argument("--json", action="store_true", help="print the statistics as one JSON object")
    add_threads(parser)
    add_progress(parser)


def report(result: dict) -> str:
    lines = [f"{result['model']} on {result['text']}: {result['chunks']} chunks of {result['ctx']} tokens, "
             f"{result['positions']} scored positions, Omega {result['omega']}"
             + (f", base {result['kl_base']}" if result["kl_base"] else "")]
    for label, key, scale, unit in REPORT:
        if key in result:
            error = result.get(key + "_error")
            value = f"{scale * result[key]:10.6f}" + (f" ± {scale * error:10.6f}" if error is not None else "")
            lines.append(f"{label:<14}: {value}{unit}")
    return "\n".join(lines)


def main(args: argparse.Namespace) -> int:
    result = evaluate(args.model, args.file, kl_base=args.kl_base, ctx=args.ctx, chunks=args.chunks,
                      omega=args.omega, threads=threads(args.threads), progress=args.progress)
    print(json.dumps(result, indent=2) if args.json else report(result))
    return 0
