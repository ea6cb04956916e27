"""``zptr imatrix MODEL --data FILE -o OUT.imatrix.gguf``: an importance matrix for llama.cpp's
quantizer, computed on the PyTorch path (flags as llama-imatrix: ``-c``, ``--chunks``,
``--process-output``; the file is llama.cpp's GGUF imatrix, which ``llama-quantize --imatrix``,
``zptr quantize --imatrix`` and ``zptr convert --imatrix`` read)."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from ..convert.imatrix import DEFAULT_CTX, calibration_model, compute_imatrix
from ..dataset import check_chunking, check_data_file
from ..fileio import Outputs, check_separate
from ..formats.imatrix import write_imatrix
from .args import add_overwrite, add_progress, add_threads, threads


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", help="ZPTR checkpoint (LoRA merged and soul folded, as converted), 'bundled', "
                                      "HF model directory, or f32/f16 GGUF")
    parser.add_argument("--data", required=True, metavar="FILE",
                        help="calibration data: JSONL in the training format (chat template applied) "
                             "or plain UTF-8 text")
    parser.add_argument("-o", "--output", required=True, metavar="FILE",
                        help="the imatrix to write (llama.cpp's GGUF format, e.g. X.imatrix.gguf)")
    parser.add_argument("-c", "--ctx-size", dest="ctx", type=int, default=DEFAULT_CTX,
                        help=f"tokens per chunk, each decoded from an empty context (default {DEFAULT_CTX})")
    parser.add_argument("--chunks", type=int, default=None,
                        help="use at most N chunks (default: every whole chunk of the data)")
    parser.add_argument("--process-output", action="store_true",
                        help="also collect output.weight (llama-imatrix leaves it out by default)")
    parser.add_argument("--base-model", default=None,
                        help="base model overriding the checkpoint's: HF directory, .gguf file or 'bundled'")
    add_threads(parser)
    add_overwrite(parser)
    add_progress(parser)


def main(args: argparse.Namespace) -> int:
    n_threads = threads(args.threads)
    output, data = Path(args.output), check_data_file(args.data)
    check_chunking(args.ctx, args.chunks)
    check_separate([args.model, data], [output])
    with Outputs(args.overwrite) as outputs:
        tmp = outputs.file(output)
        model = calibration_model(args.model, args.base_model)
        started = time.perf_counter()
        imatrix = compute_imatrix(model, data, ctx=args.ctx, chunks=args.chunks,
                                  process_output=args.process_output, threads=n_threads,
                                  progress=args.progress, dataset=args.data)
        seconds = time.perf_counter() - started
        write_imatrix(tmp, imatrix)
    print(f"imatrix: {len(imatrix.entries)} matrices, {imatrix.chunk_count} chunks of "
          f"{imatrix.chunk_size} tokens in {seconds:.1f} s", file=sys.stderr)
    print(f"wrote {output}")
    return 0
