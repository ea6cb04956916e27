"""``zptr train``: fine-tune a base model with LoRA + soul + Omega (see ``zptr.training``).

The flags are the fields of :class:`~zptr.training.TrainConfig`, generated from it.
"""

from __future__ import annotations

import argparse
import os

from ..training import TrainConfig, train
from .args import add_dataclass_arguments, dataclass_from_args, given_fields


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_dataclass_arguments(parser, TrainConfig)
    parser.add_argument("--dry-run", action="store_true",
                        help="print the estimated peak memory for these settings and exit")


def main(args: argparse.Namespace) -> int:
    cfg = dataclass_from_args(TrainConfig, args)
    if args.dry_run:
        from ..memory import estimate, format_estimate

        cfg.validate()
        print(format_estimate(estimate(cfg)))
        return 0
    path = train(cfg, given=given_fields(TrainConfig, args))
    if os.environ.get("RANK", "0") == "0":  # under accelerate launch: one line, not one per process
        print(f"zptr train: final checkpoint {path}")
    return 0
