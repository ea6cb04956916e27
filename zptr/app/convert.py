"""``zptr convert SOURCE --outfile X.gguf --outtype q4_k_m``: the converter's command line
(flag names as llama.cpp's convert_hf_to_gguf.py)."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..convert import convert_model
from ..convert.quantize import QUANT_TYPES
from .args import add_overwrite, add_progress


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("source", help="ZPTR checkpoint directory, seed-format directory, or plain HF model directory")
    parser.add_argument("--outfile", required=True, help="output GGUF path (the sidecar goes next to it)")
    parser.add_argument("--outtype", default="q4_k_m",
                        help="f32, f16, bf16, q8_0 (written directly) or any llama.cpp type: "
                             f"{', '.join(sorted(QUANT_TYPES))} (default q4_k_m)")
    parser.add_argument("--base-model", default=None,
                        help="base model overriding the checkpoint's: HF directory, .gguf file or 'bundled'")
    parser.add_argument("--export-hf", default=None, metavar="DIR",
                        help="also write the merged, folded model as a plain HF directory")
    parser.add_argument("--imatrix", default=None, metavar="FILE|auto",
                        help="importance matrix for llama.cpp's quantizer (zptr imatrix or "
                             "llama-imatrix), or 'auto': computed from the checkpoint's training "
                             "data when it is still there, else the bundled corpus (kept as "
                             "OUTFILE's X.imatrix.gguf)")
    add_overwrite(parser)
    add_progress(parser)


def main(args: argparse.Namespace) -> int:
    result = convert_model(Path(args.source), Path(args.outfile), args.outtype, base_model=args.base_model,
                           overwrite=args.overwrite, export_hf=args.export_hf, progress=args.progress,
                           imatrix=args.imatrix)
    print(f"wrote {result.model_path}")
    for extra in (result.sidecar_path, result.export_dir, result.imatrix_path):
        if extra is not None:
            print(f"wrote {extra}")
    return 0
