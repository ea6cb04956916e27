"""Checkpoint -> GGUF: merge LoRA, fold the soul into lm_head, write GGUF + the Omega sidecar.

Public API: :func:`convert_model` (``zptr convert``) and :func:`quantize_gguf` (``zptr quantize``).
"""

from .pipeline import ConvertResult, convert_model
from .quantize import quantize_gguf

__all__ = ["ConvertResult", "convert_model", "quantize_gguf"]
