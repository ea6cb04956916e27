"""ZptrLlama on the bundled SmolLM2 GGUF with an Omega sidecar: modes, the llama-cpp-python
processor path against the batch path, fast == exact, streaming, prefix reuse, errors, CLI."""

from pathlib import Path

import numpy as np
import pytest
from omega_fixtures import omega_tensors

from zptr.formats.sidecar import SidecarError, sidecar_path_for, write_sidecar
from zptr.runtime.engine import OmegaModeError, ZptrLlama
from zptr.errors import ModelLoadError
from zptr.models import smollm2_gguf_path
from model_fixtures import SAMPLE_PROMPTS as PROMPTS


@pytest.fixture(scope="module")
def model(smollm2_omega) -> Path:
    return smollm2_omega


@pytest.fixture(scope="module")
def exact(model):
    return ZptrLlama(model, omega="exact", n_ctx=1024, origin="I am a careful, terse writer.",
                     f32_kv=True)


@pytest.fixture(scope="module")
def fast(model):
    return ZptrLlama(model, omega="fast", n_ctx=1024, origin="I am a careful, terse writer.",
                     f32_kv=True)


def test_auto_picks_fast_with_a_sidecar_and_off_without(model, tmp_path):
    assert ZptrLlama(model, n_ctx=256).mode == "fast"
    bare = tmp_path / "bare.gguf"
    bare.symlink_to(smollm2_gguf_path())
    llm = ZptrLlama(bare, n_ctx=256)
    assert llm.mode == "off" and not llm.omega_on
    assert len(llm.generate("Hello", 4).tokens) == 4  # --omega off needs no sidecar
    prompt = llm.tokenize("Water boils at")
    logits, routes, _ = llm.teacher_forced(prompt)  # scoring without embeddings
    assert logits.shape == (len(prompt), 49152) and set(routes.tolist()) == {3}
    assert int(logits[-1].argmax()) == llm.generate(prompt, 1).tokens[0]
    with pytest.raises(OmegaModeError, match="no Omega sidecar"):
        ZptrLlama(bare, omega="exact", n_ctx=256)
    with pytest.raises(OmegaModeError, match="origin text needs Omega on"):
        ZptrLlama(bare, omega="off", origin="me", n_ctx=256)


def test_processor_path_equals_batch_path(exact):
    """Token by token through llama-cpp-python's sampler == one teacher-forced batch decode
    (f32 KV cache: with f16 the two decode orders differ by ~0.1 logit and flip near-ties)."""
    prompt = exact.tokenize("The best way to learn a language")
    result = exact.generate(prompt, 24)
    logits, routes, margins = exact.teacher_forced(prompt + result.tokens)
    positions = np.arange(len(prompt) - 1, len(prompt) - 1 + len(result.tokens))
    top2 = np.sort(logits[positions], 1)[:, -2:]
    clear = (top2[:, 1] - top2[:, 0] > 1e-3) & (margins[positions] > 1e-4)
    assert clear.mean() > 0.8
    np.testing.assert_array_equal(logits[positions].argmax(1)[clear], np.array(result.tokens)[clear])
    np.testing.assert_array_equal(routes[positions][clear], np.array(result.routes)[clear])
    assert len(set(result.routes)) >= 2


def test_fast_choice_equals_exact_on_20_prompts_64_tokens(fast, monkeypatch):
    """At every step of fast greedy decoding (the lean choice, with its certificate before the
    cluster product and after it) the fast choice is the argmax of the exactly corrected logits
    of the same step: by induction fast output == exact output token for token."""
    corrector = fast.corrector
    checked = []
    choose = fast.choose_greedy

    def both(logits, mode, routed, stats):
        token = choose(logits, mode, routed, stats)
        routing, k = routed
        output = routing.output(k)
        checked.append(token == int(np.argmax(logits + corrector.gate * (corrector.matrix @ output))))
        return token

    monkeypatch.setattr(fast, "choose_greedy", both)
    corrector.stats.reset()
    for prompt in PROMPTS:
        fast.reset()
        assert len(fast.generate(prompt, 64, ignore_eos=True).tokens) == 64
    assert len(checked) == 20 * 64 and all(checked)
    stats = corrector.stats
    print(f"\nfast certified {stats.certified}/{stats.certified + stats.fallback} "
          f"({100 * stats.certified_share:.1f} %)")
    assert stats.certified_share > 0.5


def test_fast_and_exact_generate_the_same_text(fast, exact):
    for prompt in PROMPTS[:2]:
        a, b = fast.generate(prompt, 32), exact.generate(prompt, 32)
        assert a.tokens == b.tokens and a.routes == b.routes


def test_completion_chat_and_streaming(fast):
    full = fast.create_completion("Water boils at", max_tokens=16, temperature=0)
    routes = list(fast.last_routes)
    assert full["usage"]["completion_tokens"] == len(routes) == 16
    chunks = fast.create_completion("Water boils at", max_tokens=16, temperature=0, stream=True)
    assert "".join(c["choices"][0]["text"] for c in chunks) == full["choices"][0]["text"]
    assert fast.last_routes == routes  # per-request state: the same request, the same routes
    messages = [{"role": "user", "content": "Name a colour."}]
    chat = fast.create_chat_completion(messages, max_tokens=12, temperature=0)
    streamed = "".join(c["choices"][0]["delta"].get("content", "") for c in
                       fast.create_chat_completion(messages, max_tokens=12, temperature=0, stream=True))
    assert streamed == chat["choices"][0]["message"]["content"]
    sampled = fast.create_completion("Water boils at", max_tokens=16, temperature=0.8, top_k=20,
                                     seed=3)
    assert sampled["usage"]["completion_tokens"] > 0


def test_prefix_reuse_decodes_only_what_omega_needs(model):
    """With the prompt cache a request reuses the KV cache of the prefix it shares with what its
    slot held, up to where its Omega tail begins; the answer equals a fresh engine's."""
    shared = " ".join(["In a quiet village by the sea, an old fisherman told stories every night."] * 20)
    first, second = shared + " One evening", shared + " The children"
    llm = ZptrLlama(model, omega="exact", n_ctx=1024)
    decoded = []
    decode = llm.decoder.decode
    llm.decoder.decode = lambda tokens, *rest: (decoded.append(len(tokens)), decode(tokens, *rest))[1]
    llm.generate(first, 8)
    decoded.clear()
    request = llm.start(second, max_tokens=16)
    assert len(request.prompt) > llm.tail + 50
    list(llm.run(request))
    prompt_rows = sum(decoded) - (len(request.tokens) - 1)  # every later decode: one token
    assert prompt_rows == llm.tail == request.hidden_rows - (len(request.tokens) - 1)
    fresh = ZptrLlama(model, omega="exact", n_ctx=1024).generate(second, 16)
    assert request.tokens == fresh.tokens and request.routes == fresh.routes


def test_reset_makes_an_answer_independent_of_the_previous_request(model):
    """After reset() a prompt decodes from scratch: the same tokens and routes as a fresh engine,
    whatever the context held (here a request whose prompt shares the chat template's prefix)."""
    llm = ZptrLlama(model, omega="fast", n_ctx=512)
    prompt = llm.chat_tokens([{"role": "user", "content": "Name a colour."}])
    fresh = llm.generate(prompt, 12)
    llm.generate(llm.chat_tokens([{"role": "user", "content": "Who wrote Hamlet?"}]), 8)
    llm.reset()
    assert llm.llm.n_tokens == 0 and llm.track.filled == 0
    again = llm.generate(prompt, 12)
    assert (again.tokens, again.routes) == (fresh.tokens, fresh.routes)


def test_sidecar_of_another_model_or_size_is_refused(model, tmp_path):
    other = tmp_path / "other.gguf"
    other.write_bytes(b"GGUF not really a model")
    wrong_sha = write_sidecar(tmp_path / "a.omega.gguf", *omega_tensors(576, -3.0), other)
    with pytest.raises(SidecarError, match="sha256 mismatch"):
        ZptrLlama(model, omega="fast", sidecar=wrong_sha, n_ctx=256)
    wrong_size = write_sidecar(tmp_path / "b.omega.gguf", *omega_tensors(64, -3.0), model)
    with pytest.raises(SidecarError, match="hidden size 64"):
        ZptrLlama(model, omega="fast", sidecar=wrong_size, n_ctx=256)
    corrupt = tmp_path / "c.omega.gguf"
    corrupt.write_bytes(sidecar_path_for(model).read_bytes()[:5000])
    with pytest.raises(SidecarError, match="truncated|corrupt"):
        ZptrLlama(model, omega="fast", sidecar=corrupt, n_ctx=256)
    not_gguf = tmp_path / "x.gguf"
    not_gguf.write_bytes(b"nope")
    with pytest.raises(ModelLoadError, match="not a GGUF"):
        ZptrLlama(not_gguf, omega="off")
    truncated = tmp_path / "t.gguf"
    with open(smollm2_gguf_path(), "rb") as handle:
        truncated.write_bytes(handle.read(1 << 20))
    with pytest.raises(ModelLoadError, match="truncated"):
        ZptrLlama(truncated, omega="off")


def test_cli_run_show_routes(model, capsys):
    from zptr.app.cli import main

    assert main(["run", str(model), "-p", "Once upon a time", "-n", "6", "--show-routes",
                 "--no-color", "--origin", "a sailor"]) == 0
    captured = capsys.readouterr()
    from zptr.app.run import ROUTE_TAGS

    assert sum(captured.out.count(f"[{tag}]") for tag in ROUTE_TAGS.values()) == 6  # one per token
    assert "routes: BOUNDARY" in captured.err and "certified" in captured.err
    assert main(["run", str(model), "-p", "x", "--omega", "exact", "--sidecar",
                 str(model.with_name("missing.omega.gguf"))]) == 1
    assert "no Omega sidecar" in capsys.readouterr().err


def test_llama_cache_restores_omega_state(model):
    """llama-cpp-python's LlamaCache restores an earlier context with load_state; the Omega
    state of its positions comes back with it instead of the last request's."""
    from llama_cpp import LlamaRAMCache

    llm = ZptrLlama(model, omega="exact", n_ctx=512)
    llm.llm.set_cache(LlamaRAMCache())
    loads = []
    load_state = llm.llm.load_state
    llm.llm.load_state = lambda state: (loads.append(state.n_tokens), load_state(state))
    prompt = "The lighthouse keeper wrote in her log every evening"
    first = llm.create_completion(prompt, max_tokens=8, temperature=0)
    routes, n = list(llm.last_routes), llm.llm.n_tokens
    hidden, phase = llm.track.snapshot(n)
    llm.create_completion("Completely different words about cooking pasta and sauce", max_tokens=8,
                          temperature=0)
    again = llm.create_completion(prompt, max_tokens=8, temperature=0)
    assert loads  # the cache did restore a saved context
    np.testing.assert_array_equal(llm.track.hidden[:n], hidden)
    np.testing.assert_array_equal(llm.track.phase[:n], phase)
    assert again["choices"][0]["text"] == first["choices"][0]["text"]
    assert llm.last_routes == routes


def test_sampling_fast_equals_exact_with_the_same_seed(fast, exact):
    """With top-k sampling the certificate covers the sampler's top-k: same seed, same text."""
    kwargs = dict(max_tokens=24, temperature=0.9, top_k=20, seed=11, repeat_penalty=1.1)
    a = fast.create_completion("Here is a haiku about autumn:", **kwargs)
    b = exact.create_completion("Here is a haiku about autumn:", **kwargs)
    assert a["choices"][0]["text"] == b["choices"][0]["text"]


@pytest.mark.parametrize("temperature, top_k, repeat_penalty, expected", [
    (0.0, 40, 1.0, 1), (0.0, 40, 1.1, 65), (0.8, 20, 1.0, 20), (0.8, 20, 1.1, 84), (0.8, 0, 1.0, None)])
def test_sampling_candidates(temperature, top_k, repeat_penalty, expected):
    from zptr.runtime.sampling import SamplingSettings

    settings = SamplingSettings(temperature=temperature, top_k=top_k, repeat_penalty=repeat_penalty)
    assert settings.candidates() == expected


def test_request_scoped_mode_and_origin(fast, exact, tmp_path):
    """One request's Omega mode and origin (the server's per-request fields) belong to that
    request: the engine's own stay as they were."""
    prompt = fast.tokenize("The quick brown fox")
    reference = exact.generate(prompt, 12)
    assert fast.generate(prompt, 12, omega="exact").tokens == reference.tokens
    assert fast.mode == "fast"
    off = fast.generate(prompt, 12, omega="off")
    assert off.routes == [] and fast.generate(prompt, 12).routes  # routes again after the request
    before = fast.origin_term.copy()
    other = fast.start(prompt, max_tokens=12, origin="Completely other origin text about harbours.")
    assert not np.array_equal(other.origin_term, before)
    np.testing.assert_array_equal(fast.origin_term, before)
    bare = tmp_path / "bare.gguf"
    bare.symlink_to(smollm2_gguf_path())
    plain = ZptrLlama(bare, n_ctx=128)
    with pytest.raises(OmegaModeError, match="cannot turn it on"):
        plain.start(prompt, omega="fast")
    with pytest.raises(OmegaModeError, match="not one of"):
        fast.start(prompt, omega="auto")


def test_logit_bias_outside_the_vocabulary_is_refused(fast):
    """A bias for a token id the model does not have is a ConfigError naming the id, before any
    decoding (NumPy would index past the logits, or wrap -1 around to the last token)."""
    from zptr.errors import ConfigError

    prompt = fast.tokenize("Hello")
    for token in (49152, -1):
        with pytest.raises(ConfigError, match=f"logit_bias token id {token} is outside the vocabulary"):
            list(fast.stream(prompt, max_tokens=2, logit_bias={token: 1.0}))
    assert len(fast.generate(prompt, 2, logit_bias={49151: -1.0}).tokens) == 2


def test_a_seed_does_not_carry_over_to_the_next_unseeded_request(fast):
    """llama-cpp-python keeps the last seed set; without a seed of its own a request must draw a
    fresh one, not replay the previous request's draws."""
    prompt = fast.tokenize("Once upon a time")
    kwargs = dict(max_tokens=16, temperature=1.5, top_k=0, top_p=1.0, min_p=0.0)
    seeded = fast.generate(prompt, seed=3, **kwargs).tokens
    assert fast.generate(prompt, seed=3, **kwargs).tokens == seeded  # a seed still reproduces
    unseeded = [fast.generate(prompt, **kwargs).tokens for _ in range(3)]
    assert any(tokens != seeded for tokens in unseeded)
