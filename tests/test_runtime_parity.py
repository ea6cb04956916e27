"""Runtime (f32 GGUF + sidecar on llama.cpp, NumPy Omega) against the PyTorch ZPTR head with
Omega on: SmolLM2-135M and a tiny qwen2, converted by the real converter. omega.gate = 2.0 and
a router calibrated so that every score sits near its threshold: routes vary, the correction is
large, and a wrong h_t, recurrence, origin or W' would show."""

from pathlib import Path

import numpy as np
import pytest
import torch

from zptr.convert import convert_model
from convert_fixtures import MIXED_TEXT, compare, save_tiny_with_tokenizer, sentencepiece_tokenizer
from zptr.runtime.engine import ZptrLlama
from zptr.runtime.reference import TorchReference
from zptr.checkpoint import save_checkpoint
from zptr.config import ZptrConfig
from zptr.head import OmegaState, omega_recurrences
from zptr.model import ZptrModel
from zptr.models import load_base_model, smollm2_hf_dir

ORIGIN = "I keep a lighthouse log: wind, knots, visibility. 灯台守の日誌。"


@torch.no_grad()
def calibrate(zm: ZptrModel, ids: torch.Tensor, origin: torch.Tensor) -> None:
    """alpha golden, a far-from-identity rotation, omega = 2, and each router score scaled to a
    logit spread of 2 with its median at the threshold (so every route occurs)."""
    head = zm.head
    zm.set_alpha(1.618)
    head.soul.rotation.generator.normal_(0, 0.5)
    omega = head.omega
    omega.gate.fill_(2.0)
    cfg = zm.config.omega
    hidden = zm.hidden_states(ids).float()
    state = OmegaState.fresh(1, zm.hidden_size, origin)
    phase, delta, _ = omega_recurrences(hidden, state, cfg.phase_decay)
    z = omega.scores(hidden, phase, delta, state.origin)[0]
    for layer, threshold in ((omega.boundary, cfg.boundary_threshold),
                             (omega.router_depth, cfg.depth_threshold),
                             (omega.router_phase, cfg.phase_threshold)):
        layer.weight.mul_(2.0 / (z @ layer.weight[0]).std())
        layer.bias.fill_(float(np.log(threshold / (1 - threshold))) - (z @ layer.weight[0]).median())


def build_case(lm, base_dir: Path, tokenizer, arch: str, directory: Path) -> dict:
    torch.manual_seed(0)
    zm = ZptrModel(lm, ZptrConfig(hidden_size=lm.config.hidden_size))
    ids = tokenizer(MIXED_TEXT)["input_ids"]
    origin_ids = tokenizer(ORIGIN)["input_ids"]
    origin = zm.origin_signature(torch.tensor([origin_ids]))
    calibrate(zm, torch.tensor([ids]), origin)
    ckpt = save_checkpoint(directory / "ckpt", zm.head, base_model=str(base_dir),
                           architecture=arch, step=450)
    result = convert_model(ckpt, directory / f"{arch}.f32.gguf", "f32", progress=False)
    reference = TorchReference(zm, tokenizer)
    reference.set_origin(ids=origin_ids)
    runtime = ZptrLlama(result.model_path, omega="exact", f32_kv=True, n_ctx=len(ids) + 64,
                        n_batch=len(ids) + 64)
    hidden, _ = runtime.llm.decode_all(origin_ids)  # s computed by llama.cpp on its own
    runtime.set_origin(signature=hidden.mean(0))
    return {"zm": zm, "ids": ids, "reference": reference, "runtime": runtime, "result": result}


@pytest.fixture(scope="module")
def smol(tmp_path_factory, smollm2, smollm2_tokenizer):
    case = build_case(smollm2, smollm2_hf_dir(), smollm2_tokenizer, "llama",
                      tmp_path_factory.mktemp("parity_smol"))
    yield case
    case["zm"].detach_head()  # the session model goes back to plain


@pytest.fixture(scope="module")
def tiny_qwen2(tmp_path_factory):
    directory = tmp_path_factory.mktemp("parity_qwen2")
    tokenizer = sentencepiece_tokenizer(directory / "tok")
    base = save_tiny_with_tokenizer("qwen2", directory / "base", directory / "tok")
    return build_case(load_base_model(base), base, tokenizer, "qwen2", directory)


def check_parity(case: dict) -> dict:
    """Routes equal wherever the deciding score is > 1e-4 from its threshold; where the routes
    are equal, top-1 equal everywhere and the logits equal to float32 rounding."""
    ids = case["ids"]
    ref_logits, ref_routes = case["reference"].teacher_forced(ids)
    logits, routes, margins = case["runtime"].teacher_forced(ids)
    clear = margins > 1e-4
    same = routes == ref_routes
    figures = compare(ref_logits[same].astype(np.float64), logits[same].astype(np.float64))
    figures.update(tokens=len(ids), routes=np.bincount(routes, minlength=4).tolist(),
                   near_threshold=int((~clear).sum()), route_flips=int((~same).sum()))
    print(f"\nparity {case['result'].model_path.name}: {figures}")
    assert len(set(routes.tolist())) >= 2
    np.testing.assert_array_equal(routes[clear], ref_routes[clear])
    assert figures["top1"] == 1.0
    assert figures["mean_kl"] < 1e-6
    return figures


def test_smollm2_runtime_matches_pytorch_head(smol):
    check_parity(smol)


def test_tiny_qwen2_runtime_matches_pytorch_head(tiny_qwen2):
    check_parity(tiny_qwen2)


def test_greedy_generation_matches_reference_path(smol):
    """The PyTorch path's token loop (KV cache, carried Omega state) == the runtime's."""
    prompt = smol["ids"][:24]
    ours = smol["runtime"].generate(prompt, 16)
    theirs = smol["reference"].generate(prompt, 16)
    assert ours.tokens == theirs.tokens
    assert ours.routes == theirs.routes
    assert ours.text == theirs.text
