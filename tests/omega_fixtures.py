"""The bundled SmolLM2 GGUF with an Omega sidecar of a random router, for the runtime and server
tests (and the server benchmark): no checkpoint or conversion needed."""

from __future__ import annotations

from pathlib import Path

import torch

from zptr.checkpoint import head_tensors
from zptr.config import ZptrConfig
from zptr.formats.sidecar import sidecar_path_for, write_sidecar
from zptr.head import ZptrHead
from zptr.models import smollm2_gguf_path

SMOLLM2_HIDDEN = 576
# sigma(-3) = 0.047: large enough to change greedy output, small enough for the fast certificate.
DEFAULT_GATE = -3.0


def omega_tensors(hidden: int, gate: float, seed: int = 0):
    """A random router (PyTorch's init: SmolLM2's h is large enough that the routes vary):
    (tensors, Omega config, hidden size), the sidecar writer's arguments."""
    torch.manual_seed(seed)
    config = ZptrConfig(hidden_size=hidden)
    head = ZptrHead(config)
    with torch.no_grad():
        head.omega.gate.fill_(gate)
    return {k: v for k, v in head_tensors(head).items() if k.startswith("omega.")}, config.omega, hidden


def smollm2_with_sidecar(directory: Path, name: str = "smol.gguf") -> Path:
    """The bundled GGUF linked into ``directory`` with a random router's sidecar next to it."""
    link = Path(directory) / name
    link.symlink_to(smollm2_gguf_path())
    write_sidecar(sidecar_path_for(link), *omega_tensors(SMOLLM2_HIDDEN, DEFAULT_GATE), link)
    return link
