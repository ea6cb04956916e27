"""``zptr quantize IN OUT TYPE``: any llama.cpp type through llama.cpp's own quantizer (flags as
llama-quantize: positional input, output and type)."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..convert import quantize_gguf
from ..convert.quantize import QUANT_TYPES
from ..formats.sidecar import sidecar_path_for
from .args import add_overwrite


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("infile", help="input GGUF with float tensors (f32, f16 or bf16: what "
                                       "llama.cpp re-quantizes faithfully)")
    parser.add_argument("outfile", help="output GGUF (an Omega sidecar next to IN is re-paired next to OUT)")
    parser.add_argument("type", help=f"llama.cpp type: {', '.join(sorted(QUANT_TYPES))}")
    parser.add_argument("--imatrix", default=None, metavar="FILE",
                        help="importance matrix (zptr imatrix or llama-imatrix, GGUF or legacy .dat) "
                             "weighting the rounding of each column by its activations")
    add_overwrite(parser)


def main(args: argparse.Namespace) -> int:
    out = quantize_gguf(Path(args.infile), Path(args.outfile), args.type, overwrite=args.overwrite,
                        imatrix=Path(args.imatrix) if args.imatrix else None)
    print(f"wrote {out}")
    sidecar = sidecar_path_for(out)
    if sidecar.exists():
        print(f"wrote {sidecar}")
    return 0
