"""``TrainConfig``: every setting of a training run, with its help text in the field metadata.

The ``zptr train`` command line is generated from these fields (``zptr.app.train``), so a
setting, its default, its flag and its help live here once. The seed's flag names
(``--base-model --max-steps --warmup-steps --annealing-steps --batch-size --max-length
--learning-rate --save-steps``) are the field names with dashes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from ..choices import RotationKind, RoutingKind
from ..config import AlphaSchedule
from ..dataset import sample_corpus_path
from ..errors import TrainError

MAX_SEED = 2**32 - 1  # numpy's RNG, seeded with the others, takes 32-bit seeds


def _help(text: str, **extra) -> dict:
    return {"help": text, **extra}


# The settings that make a run what it is (its schedule, data, model and optimisation): a resume
# continues with the run's own, and refuses a flag that contradicts one. The others (how long,
# where, how often to save, memory-saving recomputation) may change between sessions.
RUN_SETTINGS = ("warmup_steps", "annealing_steps", "batch_size", "max_length", "learning_rate",
                "load_in_4bit", "rotation", "routing", "lora_r", "lora_alpha", "lora_dropout",
                "lora_targets", "origin", "seed", "gradient_accumulation_steps", "skip_bad_lines")


@dataclass
class TrainConfig:
    base_model: Optional[str] = field(default=None, metadata=_help(
        "HF model directory, .gguf file, or 'bundled' (SmolLM2-135M-Instruct); default: the "
        "--resume checkpoint's base model, else bundled"))
    max_steps: int = field(default=500, metadata=_help("optimizer steps"))
    warmup_steps: int = field(default=50, metadata=_help("steps with alpha held at -5"))
    annealing_steps: int = field(default=400, metadata=_help("steps of the linear alpha ramp to 1.618"))
    batch_size: int = field(default=1, metadata=_help("sequences per process per micro-batch"))
    max_length: int = field(default=512, metadata=_help("tokens per sequence"))
    learning_rate: float = field(default=2e-4, metadata=_help("AdamW learning rate"))
    save_steps: int = field(default=100, metadata=_help("checkpoint every N steps, and at the end"))
    data: Optional[str] = field(default=None, metadata=_help(
        "JSONL: {'text'} or {'messages'} per line, optional 'origin' (default: the --resume "
        "checkpoint's data, else the bundled sample corpus)"))
    output_dir: Optional[str] = field(default=None, metadata=_help(
        "where step_NNNNNN/ checkpoints and metrics.jsonl go (default: the --resume checkpoint's "
        "directory, else zptr-output)"))
    load_in_4bit: bool = field(default=False, metadata=_help("bitsandbytes NF4 base with double quantisation"))
    gradient_checkpointing: bool = field(default=False, metadata=_help(
        "recompute decoder layers in the backward pass: less activation memory, more compute"))
    rotation: str = field(default=RotationKind.SO8.value, metadata=_help(
        "soul rotation: D/8 SO(8) blocks or one dense orthogonal matrix", choices=RotationKind.values()))
    routing: str = field(default=RoutingKind.THRESHOLD.value, metadata=_help(
        "Omega router: hard thresholds or soft resonance weights", choices=RoutingKind.values()))
    lora_r: int = field(default=16, metadata=_help("LoRA rank"))
    lora_alpha: int = field(default=32, metadata=_help("LoRA scale numerator"))
    lora_dropout: float = field(default=0.05, metadata=_help("LoRA dropout"))
    lora_targets: Optional[list[str]] = field(default=None, metadata=_help(
        "comma-separated module names (default per architecture; phi3: qkv_proj,o_proj)"))
    origin: Optional[str] = field(default=None, metadata=_help(
        "origin text for examples that carry none of their own"))
    seed: int = field(default=42, metadata=_help("init, data order and dropout"))
    resume: Optional[str] = field(default=None, metadata=_help(
        "continue exactly from a step_NNNNNN checkpoint", metavar="DIR"))
    save_total_limit: Optional[int] = field(default=None, metadata=_help("keep only the newest N checkpoints"))
    gradient_accumulation_steps: int = field(default=1, metadata=_help("micro-batches per optimizer step"))
    skip_bad_lines: bool = field(default=False, metadata=_help("skip (and count) malformed data lines"))
    progress: bool = field(default=True, metadata=_help("progress bar"))

    def validate(self) -> None:
        positive = ("max_steps", "batch_size", "gradient_accumulation_steps", "max_length",
                    "save_steps", "lora_r", "lora_alpha")
        for name in positive:
            if getattr(self, name) <= 0:
                raise TrainError(f"--{name.replace('_', '-')} must be positive, got {getattr(self, name)}")
        if self.warmup_steps < 0 or self.annealing_steps < 0:
            raise TrainError("--warmup-steps and --annealing-steps must not be negative")
        if not (math.isfinite(self.learning_rate) and self.learning_rate > 0):
            raise TrainError(f"--learning-rate must be a positive number, got {self.learning_rate}")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise TrainError(f"--lora-dropout must lie in [0, 1), got {self.lora_dropout}")
        if not 0 <= self.seed <= MAX_SEED:
            raise TrainError(f"--seed must lie in 0..{MAX_SEED}, got {self.seed}")
        if self.save_total_limit is not None and self.save_total_limit < 1:
            raise TrainError(f"--save-total-limit must be at least 1, got {self.save_total_limit}")
        if self.rotation not in RotationKind.values():
            raise TrainError(f"--rotation must be one of {', '.join(RotationKind.values())}, got {self.rotation!r}")
        if self.routing not in RoutingKind.values():
            raise TrainError(f"--routing must be one of {', '.join(RoutingKind.values())}, got {self.routing!r}")

    @property
    def data_path(self) -> Path:
        return Path(self.data) if self.data else sample_corpus_path()

    def schedule(self) -> AlphaSchedule:
        return AlphaSchedule(warmup_steps=self.warmup_steps, annealing_steps=self.annealing_steps)
