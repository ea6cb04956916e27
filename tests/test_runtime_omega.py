"""NumPy Omega (runtime) against the PyTorch definition (zptr.head), and the fast certificate."""

import numpy as np
import pytest
import torch

from zptr.runtime.omega import Corrector, OmegaRouter, recurrences
from zptr.checkpoint import head_tensors
from zptr.config import ZptrConfig
from zptr.head import OmegaState, ZptrHead, omega_recurrences

D, T = 32, 40


def _head(routing: str, seed: int = 0) -> ZptrHead:
    torch.manual_seed(seed)
    config = ZptrConfig(hidden_size=D)
    config.omega.routing = routing
    head = ZptrHead(config)
    with torch.no_grad():  # large router weights so every route occurs
        for name in ("boundary", "router_depth", "router_phase"):
            getattr(head.omega, name).weight.mul_(8.0)
        head.omega.gate.fill_(2.0)
    return head


def _numpy_router(head: ZptrHead) -> OmegaRouter:
    tensors = {k: v.numpy() for k, v in head_tensors(head).items() if k.startswith("omega.")}
    return OmegaRouter(tensors, head.config.omega)


@pytest.mark.parametrize("routing", ["threshold", "resonance"])
def test_router_matches_pytorch(routing):
    head = _head(routing)
    hidden = torch.randn(1, T, D)
    origin = torch.randn(1, D)
    state = OmegaState.fresh(1, D, origin)
    with torch.no_grad():
        phase, delta, _ = omega_recurrences(hidden, state, head.config.omega.phase_decay)
        o_ref, routes_ref = head.omega(hidden, phase, delta, state.origin)
    router = _numpy_router(head)
    np_phase, np_delta = recurrences(hidden[0].numpy(), None, None, head.config.omega.phase_decay)
    np.testing.assert_allclose(np_phase, phase[0].numpy(), atol=1e-6)
    np.testing.assert_allclose(np_delta, delta[0].numpy(), atol=1e-6)
    result = router.route(hidden[0].numpy(), np_phase, np_delta, router.origin_term(origin[0].numpy()))
    clear = result.margins > 1e-4
    assert clear.mean() > 0.9
    np.testing.assert_array_equal(result.routes[clear], routes_ref[0].numpy()[clear])
    assert len(set(result.routes.tolist())) >= 2  # the test exercises several routes
    np.testing.assert_allclose(result.outputs[clear], o_ref[0].numpy()[clear], atol=1e-5)


def test_recurrences_continue_across_calls():
    hidden = np.random.default_rng(0).standard_normal((T, D)).astype(np.float32)
    whole = recurrences(hidden, None, None, 0.9)
    first = recurrences(hidden[:7], None, None, 0.9)
    rest = recurrences(hidden[7:], first[0][-1], hidden[6], 0.9)
    np.testing.assert_array_equal(np.concatenate([first[0], rest[0]]), whole[0])
    np.testing.assert_array_equal(np.concatenate([first[1], rest[1]]), whole[1])


@pytest.mark.parametrize("gate", [0.0067, 0.3, 0.9])
def test_fast_equals_exact_on_kept_tokens(gate):
    rng = np.random.default_rng(1)
    V = 5000
    matrix = rng.standard_normal((V, D)).astype(np.float32) * 0.2
    corrector = Corrector(matrix, gate, max_candidates=512)
    for _ in range(50):
        logits = (rng.standard_normal(V) * 3).astype(np.float32)
        output = np.tanh(rng.standard_normal(D)).astype(np.float32)
        exact = logits + np.float32(gate) * (matrix @ output)
        for keep in (1, 5, 40):
            fast = corrector.fast(logits, output, keep)
            top = np.argsort(-exact)[:keep]
            assert set(np.argsort(-fast)[:keep]) == set(top)
            np.testing.assert_allclose(fast[top], exact[top], atol=1e-4)
    stats = corrector.stats
    assert stats.certified + stats.fallback == 150
    if gate < 0.01:
        assert stats.certified_share > 0.9  # small omega: the bound almost always certifies


def test_fast_falls_back_when_the_bound_is_loose():
    rng = np.random.default_rng(2)
    matrix = rng.standard_normal((3000, D)).astype(np.float32)
    corrector = Corrector(matrix, 1.0, max_candidates=8)
    logits = np.zeros(3000, np.float32)
    output = np.ones(D, np.float32)
    fast = corrector.fast(logits, output)
    assert corrector.stats.fallback == 1 and corrector.stats.certified == 0
    np.testing.assert_allclose(fast, matrix @ output, atol=1e-5)


def test_fast_refuses_to_certify_more_than_its_candidates():
    rng = np.random.default_rng(3)
    matrix = rng.standard_normal((1000, D)).astype(np.float32)
    corrector = Corrector(matrix, 0.01, max_candidates=16)
    logits = rng.standard_normal(1000).astype(np.float32)
    output = np.tanh(rng.standard_normal(D)).astype(np.float32)
    out = corrector.fast(logits, output, keep=40)
    np.testing.assert_allclose(out, logits + np.float32(0.01) * (matrix @ output), atol=1e-6)
    assert corrector.stats.fallback == 1


def test_exact_choice_on_float16_weights_is_the_float32_argmax():
    """The exact decoding product runs on W' in float16 under a proven bound; every choice equals
    the argmax of the float32 product, near-ties included (logits built to tie by < 1e-3)."""
    from zptr.runtime.omega import HalfMatrix

    rng = np.random.default_rng(0)
    matrix = rng.standard_normal((5000, 64)).astype(np.float32)
    corrector = Corrector(matrix, gate=0.5)
    half = HalfMatrix.build(corrector.matrix, corrector.row_norms)
    assert half is not None  # torch's CPU kernel accumulates in float32: the bound holds here
    output = rng.standard_normal(64).astype(np.float32)
    error = np.abs(half.product(output) - matrix.astype(np.float64) @ output)
    assert (error <= half.factor * corrector.row_norms * np.linalg.norm(output)).all()
    for trial in range(200):
        output = np.tanh(rng.standard_normal(64)).astype(np.float32)
        logits = rng.standard_normal(5000).astype(np.float32) * 3
        exact = logits + corrector.gate * (matrix @ output)
        if trial % 2:  # make the two best corrected tokens nearly tie
            first, second = np.argsort(exact)[-2:][::-1]
            logits[second] += exact[first] - exact[second] - rng.uniform(0, 1e-3)
            exact = logits + corrector.gate * (matrix @ output)
        assert corrector.exact_choice(logits, output) == int(np.argmax(exact)), trial


@pytest.mark.parametrize("pieces, stops, expected", [
    (["Hel", "lo wor", "ld"], ["wor"], "Hello "),
    (["a", "b", "<", "|e", "nd|>", "tail"], ["<|end|>"], "ab"),
    (["a<", "|x"], ["<|end|>"], "a<|x"),  # a held-back prefix that never completes is released
    (["no stop here"], [], "no stop here"),
    (["xx", "STOP"], ["ST", "STOP"], "xx"),
])
def test_stop_filter_cuts_at_the_first_stop_string(pieces, stops, expected):
    from zptr.runtime.sampling import StopFilter

    stop = StopFilter(stops)
    assert "".join(stop.filter(iter(pieces))) == expected
    assert stop.stopped == any(s in "".join(pieces) for s in stops)
