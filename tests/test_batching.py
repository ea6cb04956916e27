"""The slot loop on the bundled SmolLM2 GGUF with an Omega sidecar: requests decoded together
answer exactly as alone, never leak into each other, join and leave between steps; a long prompt
decodes with embeddings only over the tail Omega reads; text comes out as whole characters."""

from __future__ import annotations

import numpy as np
import pytest

from zptr.runtime.batch import TextStream, tail_length
from zptr.runtime.engine import ZptrLlama
from model_fixtures import SAMPLE_PROMPTS as PROMPTS

ORIGINS = [None, "Pirates and harbours.", None, "I write terse haiku about the moon."]
MODES = ["fast", "exact", "off", "fast"]


@pytest.fixture(scope="module")
def llm(smollm2_omega):
    engine = ZptrLlama(smollm2_omega, omega="fast", n_ctx=512, n_parallel=4, cache_prompt=False,
                       n_threads=2, n_threads_batch=2)
    yield engine
    engine.close()


def _logits_of(llm: ZptrLlama) -> dict[int, list[np.ndarray]]:
    """The base logits every request chose each token from (by request id), recorded."""
    seen: dict[int, list[np.ndarray]] = {}
    choose = llm.batcher._choose

    def record(request, row, routed):
        seen.setdefault(id(request), []).append(llm.decoder.logits(row).copy())
        return choose(request, row, routed)

    llm.batcher._choose = record
    return seen


def _together(llm: ZptrLlama, requests) -> None:
    for request in requests:
        llm.batcher.add(request)
    while llm.batcher.busy:
        llm.batcher.step()


def test_four_requests_together_answer_bit_for_bit_as_alone(llm):
    """Distinct prompts, origins and modes (fast, exact, off) in one batch: every request's logits
    at every step, tokens and routes equal those of the same request run alone."""
    seen = _logits_of(llm)
    try:
        alone = [llm.start(p, max_tokens=24, omega=m, origin=o) for p, m, o in zip(PROMPTS, MODES, ORIGINS)]
        for request in alone:
            list(llm.run(request))
        together = [llm.start(p, max_tokens=24, omega=m, origin=o) for p, m, o in zip(PROMPTS, MODES, ORIGINS)]
        _together(llm, together)
    finally:
        del llm.batcher._choose
    for a, b in zip(alone, together):
        assert (a.tokens, a.routes, a.result().text) == (b.tokens, b.routes, b.result().text)
        assert len(a.tokens) == 24 or a.finish_reason == "stop"
        difference = max(float(np.abs(x - y).max()) for x, y in zip(seen[id(a)], seen[id(b)]))
        assert difference == 0.0
    assert together[2].routes == [] and all(len(r.routes) == len(r.tokens) for r in together[:2])


def test_a_requests_answer_does_not_depend_on_the_others_origins_or_modes(llm):
    """The same four prompts twice in one batch; only the other requests' origins and modes change
    (exact <-> fast, other origin texts): the first request's tokens and routes are the same, so
    no Omega state passes between requests."""
    runs = []
    for origins, modes in ((ORIGINS, MODES),
                           ([None, "Cooking pasta.", None, "Cats."], ["fast", "fast", "off", "exact"])):
        requests = [llm.start(p, max_tokens=20, omega=m, origin=o)
                    for p, m, o in zip(PROMPTS, modes, origins)]
        _together(llm, requests)
        runs.append(requests)
    first, second = runs
    assert (first[0].tokens, first[0].routes) == (second[0].tokens, second[0].routes)
    assert first[0].origin_term is not first[1].origin_term
    assert not np.array_equal(first[1].origin_term, second[1].origin_term)


def test_requests_join_and_leave_between_steps(smollm2_omega):
    """Two slots, three requests: the third waits for a slot and joins the next step after one
    frees; a cancelled request frees its slot at once; each answer equals its run alone."""
    llm = ZptrLlama(smollm2_omega, omega="fast", n_ctx=256, n_parallel=2, cache_prompt=False)
    try:
        alone = [llm.generate(p, 12, ignore_eos=True) for p in PROMPTS[:3]]
        short, long_, waiting = (llm.start(PROMPTS[0], max_tokens=12, ignore_eos=True),
                                 llm.start(PROMPTS[1], max_tokens=40, ignore_eos=True),
                                 llm.start(PROMPTS[2], max_tokens=12, ignore_eos=True))
        llm.batcher.add(short)
        llm.batcher.add(long_)
        assert not llm.batcher.has_room
        steps = 0
        while not short.done:
            llm.batcher.step()
            steps += 1
        assert steps == 12 and llm.batcher.has_room and not long_.done
        llm.batcher.add(waiting)  # joins while long_ is decoding
        llm.batcher.step()
        assert waiting.n_past == len(waiting.prompt) and len(waiting.tokens) == 1  # its prompt in one step
        while not waiting.done:
            llm.batcher.step()
        llm.batcher.cancel(long_)
        assert long_.finish_reason == "cancelled" and llm.batcher.busy == 0
        assert short.tokens == alone[0].tokens and waiting.tokens == alone[2].tokens
        assert long_.tokens[:12] == alone[1].tokens
    finally:
        llm.close()


@pytest.fixture(scope="module")
def long_llm(smollm2_omega):
    engine = ZptrLlama(smollm2_omega, omega="fast", n_ctx=1536, cache_prompt=False,
                       n_threads=2, n_threads_batch=2)
    yield engine
    engine.close()


def test_a_long_prompt_decodes_embeddings_only_over_the_tail(long_llm):
    """A prompt of ~700 tokens with Omega: K = ceil(ln 2^-24 / ln beta) of its rows decode with
    embeddings, the rest with embeddings off; the answer, its routes and phi equal the all-token
    computation (every prompt row with embeddings), phi within float32 rounding."""
    llm = long_llm
    prompt = llm.tokenize(" ".join(PROMPTS) * 6)
    assert len(prompt) > 600
    assert llm.tail == tail_length(0.9) == 158
    rows = []
    decode = llm.decoder.decode

    def counted(tokens, positions, seqs, outputs, embeddings):
        rows.append((len(tokens), embeddings))
        return decode(tokens, positions, seqs, outputs, embeddings)

    llm.decoder.decode = counted
    try:
        tail = llm.start(prompt, max_tokens=16, omega="exact")
        list(llm.run(tail))
        with_embeddings = sum(n for n, on in rows if on) - (len(tail.tokens) - 1)
        assert with_embeddings == 158 and sum(n for n, on in rows if not on) == len(prompt) - 158
        tail_length_kept, llm.tail = llm.tail, None
        try:
            full = llm.start(prompt, max_tokens=16, omega="exact")
        finally:
            llm.tail = tail_length_kept
        list(llm.run(full))
    finally:
        llm.decoder.decode = decode
    assert full.hidden_rows == len(prompt) + len(full.tokens) - 1
    assert (tail.tokens, tail.routes) == (full.tokens, full.routes)
    scale = float(np.abs(full.phase).max())
    assert float(np.abs(tail.phase - full.phase).max()) <= 8 * 2.0 ** -24 * scale


@pytest.mark.parametrize("pieces, expected", [
    ([b"\xf0\x9f", b"\x8c", b"\x8a!"], ["", "", "🌊!"]),
    ([b"\xe6\x97\xa5", b"\xe6", b"\x9c\xac"], ["日", "", "本"]),
])
def test_text_comes_out_as_whole_characters(pieces, expected):
    stream = TextStream(())
    assert [stream.feed(p) for p in pieces] == expected and stream.flush() == ""


def test_japanese_and_emoji_text_equals_the_tokens_decoded_at_once(llm):
    """Generated text assembled piece by piece equals the generated tokens decoded together: no
    character split over tokens comes out as U+FFFD."""
    for prompt in ("東京は日本の", "私の趣味は", "絵文字 🌊🐙✨ emoji: 😊"):
        request = llm.start(prompt, max_tokens=48)
        pieces = [token.piece for token in llm.run(request)]
        whole = b"".join(llm.token_bytes(t) for t in request.tokens).decode("utf-8", "replace")
        assert "".join(pieces) + request.tail == whole
        assert any(ord(ch) > 0x2E80 for ch in whole)  # the answer has CJK or emoji in it


@pytest.mark.parametrize("prompt", ["日本語で答えてください。東京は", "私の趣味は"])
def test_zptr_run_prints_what_the_hf_tokenizer_decodes(llm, smollm2_tokenizer, prompt, capsys):
    """``zptr run --raw`` streams the greedy answer as whole characters: its output equals the HF
    tokenizer's decoding of the same tokens at once (split characters were once U+FFFD; only an
    answer cut by -n in the middle of a character ends in one, as the tokens decode)."""
    from zptr.app.cli import main

    request = llm.start(prompt, max_tokens=24, omega="off")
    list(llm.run(request))
    expected = smollm2_tokenizer.decode(request.tokens, skip_special_tokens=True)
    assert any(ord(ch) > 0x2E80 for ch in expected)  # the answer has CJK or emoji in it
    assert main(["run", str(llm.model_path), "-p", prompt, "--raw", "-n", "24", "--omega", "off",
                 "-t", "2"]) == 0
    printed = capsys.readouterr().out
    assert printed.strip() == expected.strip() and "\ufffd" not in printed.strip()[:-1]
