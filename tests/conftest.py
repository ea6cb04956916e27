"""Fixtures shared by the whole suite: the real bundled model and tiny per-architecture models."""

from __future__ import annotations

import pytest
import torch

from zptr.testing import ARCHITECTURES, tiny_model

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
