"""Fixtures shared by the whole suite: the real bundled model and tiny per-architecture models."""

from __future__ import annotations

import pytest
import torch

from model_fixtures import ARCHITECTURES, tiny_model

torch.set_num_threads(max(1, torch.get_num_threads()))


@pytest.fixture(scope="session")
def smollm2():
    """The real SmolLM2-135M-Instruct, float32 (loaded once per session from the cached HF dir)."""
    from zptr.models import load_base_model

    return load_base_model("bundled")


@pytest.fixture(scope="session")
def smollm2_tokenizer():
    from zptr.models import load_tokenizer

    return load_tokenizer("bundled")


@pytest.fixture(params=ARCHITECTURES)
def tiny_lm(request):
    """A tiny random model of each supported architecture."""
    return tiny_model(request.param)


@pytest.fixture(scope="session")
def smollm2_omega(tmp_path_factory):
    """The bundled SmolLM2 GGUF (a link) with a random router's Omega sidecar next to it."""
    from omega_fixtures import smollm2_with_sidecar

    return smollm2_with_sidecar(tmp_path_factory.mktemp("smollm2-omega"))
