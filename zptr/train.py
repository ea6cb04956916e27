"""``zptr train``: fine-tune a base model with LoRA + soul + Omega (see ``zptr.trainer``)."""

from __future__ import annotations

import argparse
import dataclasses
import os

from .config import ROTATION_KINDS, ROUTING_MODES
from .trainer import TrainConfig, TrainingInterrupted, train

_DEFAULTS = TrainConfig()


def _targets(value: str) -> list[str]:
    return [name.strip() for name in value.split(",") if name.strip()]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    d = _DEFAULTS
    add = parser.add_argument
    # The seed's flag names.
    add("--base-model", default=None,
        help="HF model directory, .gguf file, or 'bundled' (SmolLM2-135M-Instruct); default: the "
             "--resume checkpoint's base model, else bundled")
    add("--max-steps", type=int, default=d.max_steps, help="optimizer steps (default %(default)s)")
    add("--warmup-steps", type=int, default=d.warmup_steps,
        help="steps with alpha held at -5 (default %(default)s)")
    add("--annealing-steps", type=int, default=d.annealing_steps,
        help="steps of the linear alpha ramp to 1.618 (default %(default)s)")
    add("--batch-size", type=int, default=d.batch_size,
        help="sequences per process per micro-batch (default %(default)s)")
    add("--max-length", type=int, default=d.max_length, help="tokens per sequence (default %(default)s)")
    add("--learning-rate", type=float, default=d.learning_rate, help="AdamW lr (default %(default)s)")
    add("--save-steps", type=int, default=d.save_steps,
        help="checkpoint every N steps, and at the end (default %(default)s)")
    # Ours.
    add("--data", default=None,
        help="JSONL: {'text'} or {'messages'} per line, optional 'origin' (default: the --resume "
             "checkpoint's data, else the bundled sample corpus)")
    add("--output-dir", default=None,
        help="where step_NNNNNN/ checkpoints and metrics.jsonl go (default: the --resume checkpoint's "
             "directory, else zptr-output)")
    add("--load-in-4bit", action="store_true", help="bitsandbytes NF4 base with double quantisation")
    add("--gradient-checkpointing", action="store_true",
        help="recompute decoder layers in the backward pass: less activation memory, more compute")
    add("--rotation", choices=ROTATION_KINDS, default=d.rotation,
        help="soul rotation: D/8 SO(8) blocks or one dense orthogonal matrix (default %(default)s)")
    add("--routing", choices=ROUTING_MODES, default=d.routing,
        help="Omega router: hard thresholds or soft resonance weights (default %(default)s)")
    add("--lora-r", type=int, default=d.lora_r, help="LoRA rank (default %(default)s)")
    add("--lora-alpha", type=int, default=d.lora_alpha, help="LoRA scale numerator (default %(default)s)")
    add("--lora-dropout", type=float, default=d.lora_dropout, help="(default %(default)s)")
    add("--lora-targets", type=_targets, default=None,
        help="comma-separated module names (default per architecture; phi3: qkv_proj,o_proj)")
    add("--origin", default=None, help="origin text for examples that carry none of their own")
    add("--seed", type=int, default=d.seed, help="init, data order and dropout (default %(default)s)")
    add("--resume", default=None, metavar="DIR", help="continue exactly from a step_NNNNNN checkpoint")
    add("--save-total-limit", type=int, default=None, help="keep only the newest N checkpoints")
    add("--gradient-accumulation-steps", type=int, default=d.gradient_accumulation_steps,
        help="micro-batches per optimizer step (default %(default)s)")
    add("--skip-bad-lines", action="store_true", help="skip (and count) malformed data lines")
    add("--no-progress", dest="progress", action="store_false", help="no progress bar")
    add("--dry-run", action="store_true",
        help="print the estimated peak memory for these settings and exit")


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    return TrainConfig(**{k: v for k, v in vars(args).items() if k in names})


def main(args: argparse.Namespace) -> int:
    cfg = config_from_args(args)
    if args.dry_run:
        from .memory import estimate, format_estimate

        print(format_estimate(estimate(cfg)))
        return 0
    try:
        path = train(cfg)
    except TrainingInterrupted as stop:
        print(f"zptr train: {stop}")
        return stop.exit_code
    if os.environ.get("RANK", "0") == "0":  # under accelerate launch: one line, not one per process
        print(f"zptr train: final checkpoint {path}")
    return 0
