"""Training: LoRA + soul + Omega on a HF causal LM (``zptr train``)."""

from .config import TrainConfig
from .loop import TrainingInterrupted, step_dirs, train

__all__ = ["TrainConfig", "TrainingInterrupted", "step_dirs", "train"]
