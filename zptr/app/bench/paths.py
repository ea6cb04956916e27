"""What ``zptr bench`` can measure: the paths (backend + weight type) and the typed job one
worker process runs."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

from zptr.choices import BENCH_MODES, OmegaMode


@dataclass(frozen=True)
class PathSpec:
    backend: str  # "torch" or "llama"
    kind: str  # torch dtype name, or GGUF outtype
    omega_modes: tuple[str, ...]  # the Omega modes this backend implements
    needs_cuda: bool = False


# The PyTorch head computes the full-vocabulary product: its Omega-on mode is "exact".
TORCH_MODES = (OmegaMode.OFF.value, OmegaMode.EXACT.value)
PATHS: dict[str, PathSpec] = {
    "torch-f32": PathSpec("torch", "float32", TORCH_MODES),
    "torch-bf16": PathSpec("torch", "bfloat16", TORCH_MODES),
    "torch-nf4": PathSpec("torch", "nf4", TORCH_MODES, needs_cuda=True),
    "llama-f16": PathSpec("llama", "f16", BENCH_MODES),
    "llama-q8_0": PathSpec("llama", "q8_0", BENCH_MODES),
    "llama-q4_k_m": PathSpec("llama", "q4_k_m", BENCH_MODES),
}
REFERENCE_PATH = "torch-f32"  # every quality column is against its logits in the same mode


@dataclass
class WorkerJob:
    """Everything one worker process needs to measure one path (written as JSON for it)."""

    name: str
    modes: list[str]
    checkpoint: str
    prompt: list[int]
    text: list[int]  # the fixed quality text, token ids
    n_gen: int
    repetitions: int
    threads: int
    timing: bool  # False: the reference only gives its logits
    workdir: str
    gguf: Optional[str] = None
    sidecar: Optional[str] = None
    result: str = ""

    def __post_init__(self) -> None:
        self.result = self.result or str(Path(self.workdir) / f"{self.name}.result.json")

    @property
    def spec(self) -> PathSpec:
        return PATHS[self.name]

    def logits_file(self, mode: str) -> Path:
        return Path(self.workdir) / f"{self.name}.{mode}.npy"

    def save(self) -> Path:
        path = Path(self.workdir) / f"{self.name}.job.json"
        path.write_text(json.dumps(asdict(self)))
        return path

    @classmethod
    def load(cls, path: Path) -> "WorkerJob":
        return cls(**json.loads(Path(path).read_text()))


@dataclass
class WorkerResult:
    """What a worker measured: per mode the prefill and decode tokens/s of every repetition,
    the greedy tokens, fast mode's certified share; the process's peak RSS and the weight bytes
    one decoded token reads."""

    modes: dict[str, dict]
    peak_rss_mb: float
    bytes_per_token: int
    parameters: int  # weights a token multiplies by (for the compute ceiling)

    def save(self, path: Path) -> None:
        Path(path).write_text(json.dumps(asdict(self)))

    @classmethod
    def load(cls, path: Path) -> "WorkerResult":
        return cls(**json.loads(Path(path).read_text()))
