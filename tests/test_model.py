"""ZptrModel on the real SmolLM2-135M: runs on real text, reduces to the base model, and its
token-by-token path (KV cache + carried Omega state) equals the whole-sequence computation."""

from __future__ import annotations

import pytest
import torch

from zptr.model import ZptrModel, final_norm

REAL_TEXT = (
    "The lighthouse keeper wrote in his log every evening, noting the wind, the ships and the "
    "colour of the sea. 灯台守は毎晩、風と船と海の色を日誌に書き留めた。"
)


@pytest.fixture
def zptr_smollm2(smollm2):
    model = ZptrModel.from_base(smollm2)
    yield model
    model.detach_head()  # the session-scoped base model is shared by other tests


def _open_omega(model: ZptrModel, gate: float = 1.5, seed: int = 0) -> None:
    """Raise omega and spread the router's scores so that routes actually vary."""
    torch.manual_seed(seed)
    omega = model.head.omega
    with torch.no_grad():
        omega.gate.fill_(gate)
        for layer in (omega.boundary, omega.router_depth, omega.router_phase):
            layer.weight.normal_(std=0.08)
        model.head.soul.rotation.generator.normal_(std=0.5)
    model.set_alpha(1.618)


@pytest.mark.slow
def test_sigmoid_zero_gates_give_exactly_the_base_model(smollm2, smollm2_tokenizer, zptr_smollm2):
    model = zptr_smollm2
    _open_omega(model)
    model.set_alpha(float("-inf"))
    with torch.no_grad():
        model.head.omega.gate.fill_(float("-inf"))
    ids = smollm2_tokenizer(REAL_TEXT, return_tensors="pt").input_ids
    with torch.no_grad():
        logits = model(ids).logits
        with model.head_disabled():
            base = smollm2(ids).logits
    assert torch.equal(logits, base)


@pytest.mark.slow
def test_wrapper_runs_on_real_text_with_a_finite_loss(smollm2_tokenizer, zptr_smollm2):
    model = zptr_smollm2
    _open_omega(model)
    ids = smollm2_tokenizer(REAL_TEXT, return_tensors="pt").input_ids
    out = model(ids, labels=ids)
    assert out.logits.shape == (1, ids.shape[1], model.lm.config.vocab_size)
    assert torch.isfinite(out.loss) and 0.5 < out.task_loss.item() < 10
    assert out.orthogonality_loss.item() < 1e-8
    assert out.routes.shape == ids.shape
    assert len(out.routes.unique()) >= 2, "the opened router should use more than one cluster"
    out.loss.backward()
    assert model.head.omega.gate.grad is not None and model.head.omega.gate.grad != 0
    assert model.head.soul.rotation.generator.grad.abs().sum() > 0


@pytest.mark.slow
def test_token_by_token_equals_whole_sequence(smollm2_tokenizer, zptr_smollm2):
    """KV-cached generation-style calls with the carried OmegaState == one full forward."""
    model = zptr_smollm2
    _open_omega(model)
    ids = smollm2_tokenizer(REAL_TEXT, return_tensors="pt").input_ids
    origin = torch.randn(1, model.hidden_size) * 0.1
    with torch.no_grad():
        whole = model(ids, origin=origin)
        state, past, logits, routes = None, None, [], []
        split = 5  # a prompt, then one token at a time
        chunks = [ids[:, :split]] + [ids[:, t:t + 1] for t in range(split, ids.shape[1])]
        for chunk in chunks:
            step = model(chunk, origin=origin, omega_state=state, past_key_values=past, use_cache=True)
            state, past = step.omega_state, step.past_key_values
            logits.append(step.logits)
            routes.append(step.routes)
    logits, routes = torch.cat(logits, 1), torch.cat(routes, 1)
    assert (logits - whole.logits).abs().max().item() < 1e-3
    assert torch.equal(routes, whole.routes)
    assert torch.allclose(state.phase, whole.omega_state.phase, atol=1e-5)
    assert torch.allclose(state.last_hidden, whole.omega_state.last_hidden, atol=1e-5)


@pytest.mark.slow
def test_hf_generate_carries_the_omega_state(smollm2_tokenizer, zptr_smollm2):
    """HF generate (greedy) produces the tokens a full recomputation picks, routes for all positions."""
    model = zptr_smollm2
    _open_omega(model)
    prompt = smollm2_tokenizer("Once upon a time", return_tensors="pt").input_ids
    generated = model.generate(prompt, max_new_tokens=8, do_sample=False)
    routes = model.routes_of_last_call()
    assert routes.shape[1] == generated.shape[1] - 1  # every position but the last fed back
    with torch.no_grad():
        full = model(generated[:, :-1])
    # Greedy: each new token is the argmax of the full computation at the previous position.
    new = generated[0, prompt.shape[1]:]
    picked = full.logits[0, prompt.shape[1] - 1:].argmax(-1)
    assert torch.equal(new, picked)
    assert torch.equal(routes, full.routes)


def test_final_norm_is_found_on_every_architecture(tiny_lm):
    norm = final_norm(tiny_lm)
    assert norm is tiny_lm.model.norm


def test_origin_signature_is_mean_of_hidden_states(tiny_lm):
    model = ZptrModel.from_base(tiny_lm)
    ids = torch.randint(0, 512, (2, 6), generator=torch.Generator().manual_seed(5))
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0]])
    with torch.no_grad():
        signature = model.origin_signature(ids, mask)
        hidden = model.hidden_states(ids)
        short = model.hidden_states(ids[1:, :3])
    assert torch.allclose(signature[0], hidden[0].mean(0), atol=1e-6)
    assert torch.allclose(signature[1], short[0].mean(0), atol=1e-5)
    # An origin changes the phase projection and with it the ZPTR logits.
    with torch.no_grad():
        model.head.omega.gate.fill_(3.0)
        plain = model(ids).logits
        with_origin = model(ids, origin=signature).logits
    assert (plain - with_origin).abs().max() > 1e-4
