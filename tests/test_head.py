"""The ZPTR head: soul, Omega router, recurrences, fold identity, on every architecture."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from zptr.config import AlphaSchedule, OmegaConfig, ZptrConfig, phase_status
from zptr.errors import ConfigError
from zptr.head import (BASE, BOUNDARY, DEPTH, PHASE, OmegaRouter, OmegaState, Rotation,
                       omega_recurrences, rotation_errors, threshold_routes)
from zptr.model import ZptrModel


def _randomise_soul(model: ZptrModel, alpha: float = 1.618, seed: int = 1) -> None:
    """A rotation far from identity and an open alpha gate, so the fold really matters."""
    torch.manual_seed(seed)
    rotation = model.head.soul.rotation
    with torch.no_grad():
        if rotation.kind == "so8":
            rotation.generator.normal_(std=1.0)
    model.set_alpha(alpha)


# ------------------------------------------------------------------------------------- soul


@pytest.mark.parametrize("kind", ["so8", "dense"])
def test_fold_identity_every_architecture(tiny_lm, kind):
    """Wrapper logits (Omega off) == base model with lm_head := W (I + sigmoid(alpha) R)."""
    model = ZptrModel.from_base(tiny_lm, rotation=kind, omega=OmegaConfig(enabled=False))
    _randomise_soul(model)
    ids = torch.randint(0, tiny_lm.config.vocab_size, (2, 17), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = model(ids).logits
        with model.head_disabled():
            base = tiny_lm(ids).logits
        folded = model.folded_lm_head()
        model.detach_head()
        # Untie: the embedding keeps the original matrix, the head gets W'.
        head = nn.Linear(folded.shape[1], folded.shape[0], bias=False)
        head.weight = nn.Parameter(folded)
        tiny_lm.lm_head = head
        reference = tiny_lm(ids).logits
    assert (logits - reference).abs().max().item() <= 1e-5
    # The soul is not a no-op: the base model's own logits are far off.
    assert (logits - base).abs().max().item() > 0.1


def test_so8_blocks_are_rotations():
    rotation = Rotation(64, "so8")
    with torch.no_grad():
        rotation.generator.normal_(std=2.0)
    blocks = rotation.matrix().double()
    assert blocks.shape == (8, 8, 8)
    ortho, det = rotation_errors(blocks)
    assert ortho <= 1e-6
    assert torch.allclose(torch.linalg.det(blocks), torch.ones(8, dtype=torch.float64), atol=1e-6)
    assert abs(det - 1.0) < 1e-6


def test_so8_rotation_round_trips_through_materialised_matrix():
    source, target = Rotation(32, "so8"), Rotation(32, "so8")
    with torch.no_grad():
        source.generator.normal_(std=0.5)
    target.load_matrix(source.matrix().detach())
    assert torch.allclose(target.matrix(), source.matrix(), atol=1e-5)


def test_so8_needs_hidden_size_divisible_by_8():
    with pytest.raises(ConfigError, match="divisible by 8"):
        ZptrConfig(hidden_size=60, rotation="so8")
    ZptrConfig(hidden_size=60, rotation="dense")  # dense has no such constraint


def test_orthogonality_loss_is_zero_for_rotations_and_positive_otherwise():
    rotation = Rotation(16, "so8")
    assert rotation.orthogonality_loss().item() < 1e-10
    dense = Rotation(16, "dense")
    assert dense.orthogonality_loss().item() < 1e-8


def test_alpha_schedule_and_phase_status():
    schedule = AlphaSchedule(warmup_steps=50, annealing_steps=400)
    assert schedule.alpha_at(0) == -5.0 and schedule.alpha_at(50) == -5.0
    assert math.isclose(schedule.alpha_at(250), -5.0 + 0.5 * (1.618 + 5.0))
    assert schedule.alpha_at(450) == pytest.approx(1.618) and schedule.alpha_at(10_000) == pytest.approx(1.618)
    assert phase_status(schedule.alpha_at(10)) == "stable"
    assert phase_status(schedule.alpha_at(200)) == "transitioning"
    assert phase_status(schedule.alpha_at(450)) == "golden"


# ------------------------------------------------------------------------------------- omega


def test_threshold_routes_follow_priority_order():
    config = OmegaConfig()
    # columns: b, r_depth, r_phase -> expected
    cases = [
        (0.66, 0.99, 0.99, BOUNDARY),
        (0.65, 0.56, 0.99, DEPTH),   # b must be strictly above 0.65
        (0.10, 0.55, 0.61, PHASE),   # r_depth strictly above 0.55
        (0.10, 0.10, 0.60, BASE),
        (0.10, 0.10, 0.10, BASE),
        (0.70, 0.10, 0.10, BOUNDARY),
    ]
    b, rd, rp, expected = (torch.tensor(col) for col in zip(*cases))
    assert threshold_routes(b, rd, rp, config).tolist() == expected.tolist()


def _router_with_scores(d: int, b: float, rd: float, rp: float) -> OmegaRouter:
    """A router whose three scores are constant logits, independent of z."""
    router = OmegaRouter(d, OmegaConfig())
    with torch.no_grad():
        for layer, prob in ((router.boundary, b), (router.router_depth, rd), (router.router_phase, rp)):
            layer.weight.zero_()
            layer.bias.fill_(math.log(prob / (1 - prob)))
    return router


@pytest.mark.parametrize("scores,route", [((0.9, 0.9, 0.9), BOUNDARY), ((0.5, 0.9, 0.9), DEPTH),
                                          ((0.5, 0.5, 0.9), PHASE), ((0.5, 0.5, 0.5), BASE)])
def test_router_picks_cluster_and_gradient_reaches_its_scorer(scores, route):
    d = 16
    router = _router_with_scores(d, *scores)
    h = torch.randn(1, 5, d)
    o, routes = router(h, torch.randn(1, 5, d), torch.randn(1, 5, d), torch.zeros(1, d))
    assert routes.eq(route).all()
    expected_cluster = torch.tanh(h @ router.experts_weight[route].T + router.experts_bias[route])
    gate = 1.0 if route == BASE else scores[route]
    assert torch.allclose(o, gate * expected_cluster, atol=1e-5)
    o.sum().backward()
    scorer = {BOUNDARY: router.boundary, DEPTH: router.router_depth, PHASE: router.router_phase}
    for index, layer in scorer.items():
        reached = layer.bias.grad is not None and layer.bias.grad.abs().item() > 0
        assert reached == (index == route), (index, route)
    assert router.experts_weight.grad[route].abs().sum() > 0
    others = [k for k in range(4) if k != route]
    assert router.experts_weight.grad[others].abs().sum() == 0


def test_resonance_mode_mixes_all_clusters():
    d = 16
    router = OmegaRouter(d, OmegaConfig(routing="resonance"))
    h = torch.randn(2, 7, d)
    o, routes = router(h, torch.randn(2, 7, d), torch.randn(2, 7, d), torch.randn(2, d))
    assert o.shape == (2, 7, d) and routes.shape == (2, 7)
    assert o.abs().max() <= 1.0  # a convex mixture of tanh outputs
    o.sum().backward()
    assert router.resonance_linear.weight.grad.abs().sum() > 0
    assert router.resonance_sin.weight.grad.abs().sum() > 0
    assert router.experts_weight.grad.abs().sum(dim=(1, 2)).gt(0).all()


def test_recurrences_match_their_definition():
    h = torch.randn(2, 6, 8)
    state = OmegaState.fresh(2, 8)
    phase, delta, new_state = omega_recurrences(h, state, decay=0.9)
    expected_phase = torch.zeros(2, 8)
    for t in range(6):
        expected_phase = 0.9 * expected_phase + 0.1 * h[:, t]
        assert torch.allclose(phase[:, t], expected_phase)
        expected_delta = torch.zeros(2, 8) if t == 0 else h[:, t] - h[:, t - 1]
        assert torch.allclose(delta[:, t], expected_delta)
    assert torch.equal(new_state.last_hidden, h[:, -1])


def test_recurrences_token_by_token_equal_whole_sequence():
    h = torch.randn(3, 9, 8)
    whole_phase, whole_delta, whole_state = omega_recurrences(h, OmegaState.fresh(3, 8), 0.9)
    state = OmegaState.fresh(3, 8)
    for t in range(9):
        phase, delta, state = omega_recurrences(h[:, t:t + 1], state, 0.9)
        assert torch.equal(phase[:, 0], whole_phase[:, t])
        assert torch.equal(delta[:, 0], whole_delta[:, t])
    assert torch.equal(state.phase, whole_state.phase)


def test_initial_logits_stay_within_one_percent(tiny_lm):
    model = ZptrModel.from_base(tiny_lm)  # alpha = omega = -5
    ids = torch.randint(0, tiny_lm.config.vocab_size, (2, 20), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        logits = model(ids).logits
        with model.head_disabled():
            base = tiny_lm(ids).logits
    relative = (logits - base).norm(dim=-1) / base.norm(dim=-1)
    assert relative.max().item() < 0.01
    assert relative.min().item() > 0  # the head is there, just gated down


def test_hidden_size_mismatch_is_refused(tiny_lm):
    with pytest.raises(ValueError, match="hidden size"):
        ZptrModel(tiny_lm, ZptrConfig(hidden_size=128))
