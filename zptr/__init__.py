"""ZPTR: LoRA + soul (SO(8) rotation, alpha gate) + Omega router, for GGUF deployment."""

from .config import CLUSTERS, GOLDEN_RATIO, AlphaSchedule, OmegaConfig, ZptrConfig, phase_status
from .errors import ZptrError

__version__ = "0.1.0"

__all__ = ["CLUSTERS", "GOLDEN_RATIO", "AlphaSchedule", "OmegaConfig", "ZptrConfig", "ZptrError",
           "phase_status", "__version__"]
