"""``zptr serve`` as a user meets it: a live server subprocess on 127.0.0.1 with the bundled
SmolLM2 GGUF and a random router's sidecar, driven by OpenAI's own Python client, raw HTTP for
the error cases, and headless Chromium for the chat page."""

from __future__ import annotations

import concurrent.futures
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from zptr.config import CLUSTERS
from zptr.runtime.engine import ZptrLlama

pytestmark = pytest.mark.slow

ORIGIN = "I am a careful, terse writer."
CTX = 1024
API_KEY = "sekret-key"
SERVER_ARGS = ["-c", str(CTX), "-t", "2", "--origin", ORIGIN]
SLOTS = 4  # the open server's slots: requests beyond them wait in its queue
# The open server's tokens per step. Below the 64 query rows at which llama.cpp's CPU flash
# attention switches to its tiled kernel (which reads Q in f32, the row kernel in f16), every
# row of a request is computed alike alone and among others, so with a slot for each concurrent
# request their answers equal the sequential ones bit for bit.
STEP_TOKENS = 48
CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")
SMALL_BODY = 65536  # the guarded server's --max-body-bytes
CORS_ORIGIN = "http://app.example:3000"  # the guarded server's --cors


class Server:
    """``zptr serve MODEL --port 0 ARGS`` in a subprocess (started at once, waited for later:
    several load their models side by side)."""

    def __init__(self, model: Path, log_path: Path, *args: str):
        self.log = open(log_path, "w+")
        self.process = subprocess.Popen([sys.executable, "-m", "zptr", "serve", str(model), "--port", "0",
                                         *args], stdout=subprocess.PIPE, stderr=self.log, text=True)

    def wait_ready(self) -> str:
        """The base URL, once the model is loaded and the port bound."""
        line = self.process.stdout.readline()
        if not line.startswith("zptr serve: http://"):
            self.process.wait(30)
            self.log.seek(0)
            pytest.fail(f"zptr serve did not start (exit {self.process.returncode}): {line}{self.log.read()}")
        url = line.split()[2].rstrip("/")
        assert httpx.get(f"{url}/health", timeout=30).status_code == 200
        return url

    def stop(self) -> str:
        """SIGTERM, as a service manager stops it; returns its stderr."""
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(20)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.process.stdout.close()
        self.log.seek(0)
        errors = self.log.read()
        self.log.close()
        return errors


@pytest.fixture(scope="module")
def setup(smollm2_omega, tmp_path_factory):
    """(open server URL, URL of a server with an API key and no waiting room, the same model in
    this process): the three load side by side."""
    directory = tmp_path_factory.mktemp("serve")
    started = [Server(smollm2_omega, directory / "open.err", *SERVER_ARGS, "-np", str(SLOTS),
                      "-b", str(STEP_TOKENS), "--queue", "8"),
               Server(smollm2_omega, directory / "locked.err", *SERVER_ARGS, "-np", "1", "--queue", "0",
                      "--api-key", API_KEY)]
    llm = None
    try:
        # As the server runs it (the answers to compare with).
        llm = ZptrLlama(smollm2_omega, omega="fast", origin=ORIGIN, n_ctx=CTX, n_threads=2, n_threads_batch=2)
        yield [s.wait_ready() for s in started] + [llm, Path(started[0].log.name)]
    finally:
        if llm is not None:
            llm.close()
        stopped = [(s.stop(), s.process.returncode) for s in started]  # every one, then the checks
        for errors, code in stopped:
            assert "Traceback" not in errors, errors
            assert code == 128 + signal.SIGTERM and "stopped by SIGTERM" in errors, errors


@pytest.fixture(scope="module")
def server(setup):
    return setup[0]


@pytest.fixture(scope="module")
def locked_server(setup):
    """With an API key and no waiting room: one request at a time, the next one gets 503."""
    return setup[1]


@pytest.fixture(scope="module")
def server_log(setup):
    """The open server's stderr file."""
    return setup[3]


@pytest.fixture(scope="module")
def guarded_server(smollm2_omega, tmp_path_factory):
    """Tight limits, a CORS origin and no Host check: ``(URL, stderr file)``."""
    log = tmp_path_factory.mktemp("guarded") / "guarded.err"
    started = Server(smollm2_omega, log, *SERVER_ARGS, "-np", "1", "--timeout", "1",
                     "--max-body-bytes", str(SMALL_BODY), "--cors", CORS_ORIGIN, "--host-check", "off")
    try:
        yield started.wait_ready(), log
    finally:
        errors = started.stop()
        assert "Traceback" not in errors and started.process.returncode == 128 + signal.SIGTERM, errors


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def engine(setup):
    return setup[2]


@pytest.fixture(scope="module")
def end_of_generation(engine):
    """A logit bias that bans every end-of-generation token: the answer runs to max_tokens."""
    return {str(t): -100 for t in range(engine.llm.n_vocab()) if engine.is_end(t)}


def chat(client, content: str, max_tokens: int = 16, stream: bool = False, **extra):
    """(text, routes, completion_tokens, finish_reason) of one greedy chat request."""
    kwargs = dict(model="smol", messages=[{"role": "user", "content": content}], max_tokens=max_tokens,
                  temperature=0, **({"extra_body": extra} if extra else {}))
    if not stream:
        response = client.chat.completions.create(**kwargs)
        choice = response.choices[0]
        return choice.message.content, choice.routes, response.usage.completion_tokens, choice.finish_reason
    text, routes, usage, finish = "", [], None, None
    for chunk in client.chat.completions.create(**kwargs, stream=True, stream_options={"include_usage": True}):
        if chunk.usage:
            usage = chunk.usage.completion_tokens
        for choice in chunk.choices:
            text += choice.delta.content or ""
            if choice.delta.route is not None:
                routes.append(choice.delta.route)
            finish = choice.finish_reason or finish
    return text, routes or None, usage, finish


def metric(url: str, name: str, **labels: str) -> float:
    """A sample of /metrics (0 for a labelled counter not yet counted)."""
    text = httpx.get(f"{url}/metrics").text
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and sample.labels == labels:
                return sample.value
    if labels:
        return 0.0
    raise AssertionError(f"{name} not in /metrics")


# ------------------------------------------------------------------------------ API


def test_health_and_models(server, client):
    health = httpx.get(f"{server}/health").json()
    assert health["status"] == "ok" and health["omega"] == "fast" and health["n_ctx"] == CTX
    assert health["routes"] == list(CLUSTERS)
    models = client.models.list().data
    assert [m.id for m in models] == ["smol"]


def test_chat_plain_and_streamed_agree(client):
    text, routes, count, finish = chat(client, "Name a colour.")
    assert text and finish in ("stop", "length")
    assert len(routes) == count > 0 and set(routes) <= set(CLUSTERS)
    assert chat(client, "Name a colour.", stream=True) == (text, routes, count, finish)


def test_completions_plain_and_streamed(client):
    response = client.completions.create(model="smol", prompt="Water boils at", max_tokens=8, temperature=0)
    choice = response.choices[0]
    assert response.usage.completion_tokens == len(choice.routes) == 8 and choice.finish_reason == "length"
    assert response.usage.total_tokens == response.usage.prompt_tokens + 8
    chunks = list(client.completions.create(model="smol", prompt="Water boils at", max_tokens=8,
                                            temperature=0, stream=True))
    assert "".join(c.choices[0].text for c in chunks) == choice.text
    assert [c.choices[0].route for c in chunks if c.choices[0].route] == choice.routes
    tokens = client.completions.create(model="smol", prompt=[1, 2, 3], max_tokens=2, temperature=0)
    assert tokens.usage.prompt_tokens == 3  # a prompt of token ids


def test_stop_strings_cut_the_text(client):
    text, _, _, _ = chat(client, "Name a colour.", max_tokens=16)
    word = text.split()[2]
    cut, routes, count, finish = chat(client, "Name a colour.", max_tokens=16, stream=True, stop=[word])
    assert finish == "stop" and cut == text[: text.index(word)] and len(routes) == count < 16


def test_logit_bias_keeps_omega_on(client, engine):
    """The bias and the Omega correction both apply: the answer is the in-process engine's with
    Omega fast and the same bias, and differs from the same biased request with Omega off."""
    prompt = engine.chat_tokens([{"role": "user", "content": "Tell me a joke."}])
    engine.reset()
    first = engine.generate(prompt, 12).tokens[0]
    bias = {first: -100.0}
    engine.reset()
    expected = engine.generate(prompt, 12, logit_bias=bias)
    text, routes, count, _ = chat(client, "Tell me a joke.", 12, logit_bias={str(first): -100})
    assert routes == expected.route_names and count == len(routes)
    assert text == expected.text
    off_text, off_routes, _, _ = chat(client, "Tell me a joke.", 12, logit_bias={str(first): -100}, omega="off")
    assert off_routes is None and off_text != text


def test_request_omega_mode_and_origin(client):
    text, routes, _, _ = chat(client, "Say hello.", 8)
    assert chat(client, "Say hello.", 8, omega="exact")[:2] == (text, routes)  # fast == exact
    assert chat(client, "Say hello.", 8, omega="off")[1] is None
    other = chat(client, "Say hello.", 8, origin="Pirates, harbours, rum and the open sea.")
    assert len(other[1]) == other[2]


def test_a_seed_reproduces_a_sampled_answer_whatever_ran_between(client):
    kwargs = dict(model="smol", prompt="Once upon a time", max_tokens=8, temperature=0.9)
    first = client.completions.create(**kwargs, seed=7).choices[0]
    client.completions.create(**kwargs)  # unseeded, in between
    again = client.completions.create(**kwargs, seed=7).choices[0]
    assert (again.text, again.routes) == (first.text, first.routes)


def test_four_concurrent_requests_equal_the_sequential_answers(client):
    """Mixed modes, origins and streaming: nothing of one request leaks into another."""
    requests = [("Who wrote Hamlet?", {}), ("Write a haiku about the sea.", {"omega": "exact"}),
                ("What is the capital of France?", {"origin": "Pirates and harbours."}),
                ("Tell me a joke.", {"omega": "off"})]
    sequential = [chat(client, q, stream=i % 2 == 1, **extra) for i, (q, extra) in enumerate(requests)]
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        futures = [pool.submit(chat, client, q, 16, i % 2 == 0, **extra)
                   for i, (q, extra) in enumerate(requests)]
        concurrent_answers = [f.result() for f in futures]
    assert concurrent_answers == sequential
    assert sequential[3][1] is None and all(len(a[1]) == a[2] for a in sequential[:3])


def test_a_client_that_disconnects_frees_the_model(server, client, end_of_generation):
    """A dropped stream, a plain request whose client gives up, and a request that gives up while
    it waits: the running ones stop generating at once, the waiting one leaves the queue, and the
    next request is answered correctly; the abandoned ones generated far fewer than 900 tokens."""
    expected = chat(client, "Name a colour.", 8)
    tokens_before = metric(server, "zptr_completion_tokens_total")
    cancelled_before = metric(server, "zptr_cancelled_generations_total")
    closed = dict(endpoint="/v1/chat/completions", status="499")  # answered to nobody
    closed_before = metric(server, "zptr_requests_total", **closed)
    body = {"messages": [{"role": "user", "content": "Tell me a long story."}], "max_tokens": 900,
            "temperature": 0, "logit_bias": end_of_generation}
    readers = []  # a dropped line iterator closes its connection: each is kept until the end
    with contextlib.ExitStack() as streams:
        for _ in range(SLOTS):  # every slot busy with a long stream
            response = streams.enter_context(httpx.stream(
                "POST", f"{server}/v1/chat/completions", json={**body, "stream": True}, timeout=60))
            assert response.status_code == 200
            readers.append(response.iter_lines())
            assert sum(1 for _, line in zip(range(10), readers[-1]) if line.startswith("data: ")) >= 4
        # Meanwhile another stream queues behind them and its client gives up before it starts.
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(f"{server}/v1/chat/completions", json={**body, "stream": True},
                       timeout=httpx.Timeout(30, read=0.5))
        for _ in range(200):
            if httpx.get(f"{server}/health").json()["queue_depth"] == 0:
                break
            time.sleep(0.05)
        health = httpx.get(f"{server}/health").json()
        assert health["busy"] and health["queue_depth"] == 0  # the first still runs, none waits
    with pytest.raises(httpx.ReadTimeout):  # a plain request whose client stops waiting
        httpx.post(f"{server}/v1/chat/completions", json=body, timeout=httpx.Timeout(30, read=1.0))
    assert chat(client, "Name a colour.", 8) == expected
    assert metric(server, "zptr_cancelled_generations_total") == cancelled_before + SLOTS + 1
    # Both handlers ended: the one that waited in the queue and the plain one (not at shutdown).
    assert metric(server, "zptr_requests_total", **closed) == closed_before + 2
    generated = metric(server, "zptr_completion_tokens_total") - tokens_before - expected[2]
    assert generated < 900, f"the abandoned requests generated {generated} tokens"


BAD_REQUESTS = [
    ("/v1/chat/completions", b'{"messages": [', None),
    ("/v1/chat/completions", b"[1, 2]", None),
    ("/v1/chat/completions", b'{"messages": "hello"}', "messages"),
    ("/v1/chat/completions", b'{"messages": []}', "messages"),
    ("/v1/chat/completions", b'{"messages": [{"role": "robot", "content": "hi"}]}', "messages[0].role"),
    ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": 5}]}', "messages[0].content"),
    ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}',
     "messages[0].content[0]"),
    ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "hi"}], "tools": [{}]}', "tools"),
    ("/v1/completions", b'{"prompt": "x", "temperature": "hot"}', "temperature"),
    ("/v1/completions", b'{"prompt": "x", "max_tokens": 5.5}', "max_tokens"),
    ("/v1/completions", b'{"prompt": "x", "stream": "yes"}', "stream"),
    ("/v1/completions", b'{"prompt": "x", "temperature": -1}', "temperature"),
    ("/v1/completions", b'{"prompt": "x", "temperature": NaN}', "temperature"),
    ("/v1/completions", b'{"prompt": "x", "top_p": 0}', "top_p"),
    ("/v1/completions", b'{"prompt": "x", "min_p": 1.5}', "min_p"),
    ("/v1/completions", b'{"prompt": "x", "presence_penalty": 3}', "presence_penalty"),
    ("/v1/completions", b'{"prompt": "x", "max_tokens": -1}', "max_tokens"),
    ("/v1/completions", b'{"prompt": "x", "logit_bias": {"abc": 1}}', "logit_bias"),
    ("/v1/completions", b'{"prompt": "x", "logit_bias": {"99999999": 1}}', "logit_bias"),
    ("/v1/completions", b'{"prompt": "x", "stop": [""]}', "stop"),
    ("/v1/completions", b'{"prompt": [1, 99999999]}', "prompt"),
    ("/v1/completions", b'{"prompt": "x", "omega": "turbo"}', "omega"),
    ("/v1/completions", b'{"prompt": "x", "n": 2}', "n"),
    ("/v1/completions", b'{"prompt": ["a", "b"]}', "prompt"),
    ("/v1/completions", b'{}', "prompt"),
    ("/v1/completions", json.dumps({"prompt": "x", "origin": "word " * 1100}).encode(), "origin"),
]


@pytest.mark.parametrize("path, body, param", BAD_REQUESTS)
def test_bad_requests_get_400_json(server, path, body, param):
    response = httpx.post(f"{server}{path}", content=body, headers={"Content-Type": "application/json"})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["type"] == "invalid_request_error"
    assert error["param"] == param and error["message"] and "Traceback" not in response.text


def test_a_prompt_longer_than_the_context_is_400_naming_both_lengths(server, client):
    for stream in (False, True):
        body = {"messages": [{"role": "user", "content": "word " * 1500}], "max_tokens": 4, "stream": stream}
        response = httpx.post(f"{server}/v1/chat/completions", json=body)
        assert response.status_code == 400 and response.headers["content-type"] == "application/json"
        error = response.json()["error"]
        assert error["param"] == "messages" and f"the context holds {CTX}" in error["message"]
        assert f"the prompt is {error['message'].split()[3]} tokens" in error["message"]
        assert int(error["message"].split()[3]) > CTX
    with pytest.raises(openai.BadRequestError, match="context holds"):
        client.completions.create(model="smol", prompt="word " * 1500, max_tokens=4)
    assert chat(client, "Say hello.", 4)[2] == 4  # still answering


def test_unknown_paths_and_methods_answer_in_the_error_shape(server):
    missing = httpx.get(f"{server}/v1/nothing")
    assert missing.status_code == 404 and missing.json()["error"]["type"] == "not_found_error"
    wrong = httpx.get(f"{server}/v1/chat/completions")
    assert wrong.status_code == 405 and "error" in wrong.json()
    assert httpx.get(f"{server}/health").json()["status"] == "ok"


def test_metrics_are_prometheus_text(server, client):
    chat(client, "Say hello.", 4)
    response = httpx.get(f"{server}/metrics")
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")
    samples = {s.name: s for f in text_string_to_metric_families(response.text) for s in f.samples}
    for name in ("zptr_prompt_tokens_total", "zptr_completion_tokens_total", "zptr_decode_tokens_per_second",
                 "zptr_queue_depth", "zptr_busy", "zptr_omega_certified_share",
                 "zptr_omega_certified_tokens_total", "zptr_time_to_first_token_seconds_count"):
        assert name in samples, name
    assert samples["zptr_completion_tokens_total"].value >= 4 and samples["zptr_queue_depth"].value == 0
    assert samples["zptr_decode_tokens_per_second"].value > 0
    assert 0 < samples["zptr_omega_certified_share"].value <= 1
    answered = [s for f in text_string_to_metric_families(response.text) for s in f.samples
                if s.name == "zptr_requests_total" and s.labels == {"endpoint": "/v1/chat/completions",
                                                                     "status": "200"}]
    assert answered and answered[0].value >= 1


def test_japanese_and_emoji_stream_as_whole_characters(client, engine):
    """Each 🌊 is three tokens of byte pieces: the streamed text, the plain answer and llama.cpp's
    detokenization of the generated tokens at once are one and the same text."""
    question = "Repeat exactly: 🌊🌊🌊 日本語"
    text, routes, count, _ = chat(client, question, 24)
    assert "🌊" in text and "日本語" in text, text
    streamed, streamed_routes, streamed_count, _ = chat(client, question, 24, stream=True)
    assert (streamed, streamed_routes, streamed_count) == (text, routes, count)
    engine.reset()
    expected = engine.generate(engine.chat_tokens([{"role": "user", "content": question}]), 24)
    assert expected.route_names == routes and len(expected.tokens) == count
    assert engine.llm.detokenize(expected.tokens).decode("utf-8") == text
    completion = client.completions.create(model="smol", prompt=question, max_tokens=12, temperature=0)
    pieces = [c.choices[0].text for c in client.completions.create(
        model="smol", prompt=question, max_tokens=12, temperature=0, stream=True)]
    assert "".join(pieces) == completion.choices[0].text and "\ufffd" not in "".join(pieces)


# ------------------------------------------------------------------------------ what is refused


def raw_http(url: str, data: bytes, timeout: float = 10) -> tuple[int, dict, dict]:
    """(status, headers, JSON body) of the answer to ``data`` sent on a fresh connection, read
    until the server closes it."""
    import socket
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    with socket.create_connection((parts.hostname, parts.port), timeout=timeout) as sock:
        sock.sendall(data)
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    head, _, body = answer.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    headers = dict(line.lower().split(": ", 1) for line in lines[1:])
    return int(lines[0].split()[1]), headers, json.loads(body)


def assert_refused(response: httpx.Response, status: int, code: str) -> None:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["code"] == code, error
    assert "\n" not in error["message"] and "Traceback" not in response.text


def test_a_client_that_hangs_up_mid_upload_leaves_no_trace(server, server_log):
    import socket
    from urllib.parse import urlsplit

    before = len(server_log.read_text())
    prompt_tokens = metric(server, "zptr_prompt_tokens_total")
    answered = lambda: sum(metric(server, "zptr_requests_total", endpoint="/v1/chat/completions",  # noqa: E731
                                  status=status) for status in ("499", "500"))
    counted = answered()
    parts = urlsplit(server)
    with socket.create_connection((parts.hostname, parts.port)) as sock:
        sock.sendall(f"POST /v1/chat/completions HTTP/1.1\r\nHost: {parts.netloc}\r\n"
                     "Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n"
                     '{"messages": [{"role": "user", "con'.encode())
        time.sleep(0.2)  # the handler is reading the body
    for _ in range(100):  # its handler has ended
        if answered() > counted:
            break
        time.sleep(0.05)
    assert metric(server, "zptr_requests_total", endpoint="/v1/chat/completions", status="499") == counted + 1
    time.sleep(0.2)
    log = server_log.read_text()[before:]
    assert "Traceback" not in log and "ClientDisconnect" not in log and "ERROR" not in log, log
    assert metric(server, "zptr_prompt_tokens_total") == prompt_tokens  # the model did nothing
    assert httpx.get(f"{server}/health").json()["status"] == "ok"


def test_a_body_over_the_limit_is_413_before_it_is_read(server, guarded_server):
    from urllib.parse import urlsplit

    # 20 MB announced, none sent: refused from the header alone, the connection closed.
    netloc = urlsplit(server).netloc
    status, headers, body = raw_http(server, f"POST /v1/chat/completions HTTP/1.1\r\nHost: {netloc}\r\n"
                                     "Content-Type: application/json\r\nContent-Length: 20000000\r\n\r\n".encode())
    assert status == 413 and headers["connection"] == "close"
    assert body["error"]["code"] == "request_too_large" and "--max-body-bytes 2097152" in body["error"]["message"]
    # A chunked body (no Content-Length) is counted as it arrives.
    url, _ = guarded_server
    netloc = urlsplit(url).netloc
    chunks = [b"x" * 16384] * (SMALL_BODY // 16384) + [b"x"]  # one byte over, and no more (the
    # server closes on what it has not read: a reset that could beat its answer)
    data = (f"POST /v1/completions HTTP/1.1\r\nHost: {netloc}\r\nContent-Type: application/json\r\n"
            "Transfer-Encoding: chunked\r\n\r\n").encode() + b"".join(
        b"%x\r\n%s\r\n" % (len(chunk), chunk) for chunk in chunks)
    status, headers, body = raw_http(url, data)
    assert status == 413 and headers["connection"] == "close" and body["error"]["code"] == "request_too_large"
    # Just under the limit it is read and answered (here: a prompt longer than the context).
    fits = {"prompt": "word " * ((SMALL_BODY - 100) // 5), "max_tokens": 1}
    assert len(json.dumps(fits)) < SMALL_BODY
    response = httpx.post(f"{url}/v1/completions", json=fits)
    assert response.status_code == 400 and "context holds" in response.json()["error"]["message"]
    assert_refused(httpx.post(f"{url}/v1/completions", json={"prompt": "word " * SMALL_BODY}), 413,
                   "request_too_large")


def test_slow_headers_and_bodies_are_cut_off(guarded_server):
    """--timeout 1: a connection whose headers are not in after a second is closed (held open,
    hundreds of them would pin the server's file descriptors for ever); a late body gets 408."""
    import socket
    from urllib.parse import urlsplit

    url, log = guarded_server
    parts = urlsplit(url)
    with contextlib.ExitStack() as stack:
        socks = [stack.enter_context(socket.create_connection((parts.hostname, parts.port), timeout=10))
                 for _ in range(200)]
        for sock in socks:
            sock.sendall(f"POST /v1/completions HTTP/1.1\r\nHost: {parts.netloc}\r\n".encode())
        kept = stack.enter_context(socket.create_connection((parts.hostname, parts.port), timeout=10))
        kept.sendall(f"GET /health HTTP/1.1\r\nHost: {parts.netloc}\r\n\r\n".encode())
        answer = b""
        while not answer.endswith(b"}"):  # the whole answer (its JSON ends the body)
            answer += kept.recv(65536)
        assert answer.startswith(b"HTTP/1.1 200")
        kept.sendall(b"GET /hea")  # the next request on a kept-alive connection, half sent
        started = time.monotonic()
        assert [sock.recv(100) for sock in socks + [kept]] == [b""] * (len(socks) + 1)  # closed by the server
        assert time.monotonic() - started < 5
    status, headers, body = raw_http(url, (
        f"POST /v1/completions HTTP/1.1\r\nHost: {parts.netloc}\r\nContent-Type: application/json\r\n"
        'Content-Length: 100\r\n\r\n{"prompt": "x"').encode())
    assert status == 408 and headers["connection"] == "close" and body["error"]["code"] == "request_timeout"
    assert httpx.post(f"{url}/v1/completions", json={"prompt": "x", "max_tokens": 1}).status_code == 200
    assert "Traceback" not in log.read_text()


def test_other_sites_pages_are_refused(server):
    """A page of another site may POST a form or text/plain to any address without asking
    (no preflight): its Origin header gives it away."""
    body = {"messages": [{"role": "user", "content": "Say hello."}], "max_tokens": 2}
    generated = metric(server, "zptr_completion_tokens_total")
    for origin in ("http://evil.example", "null", server.replace("127.0.0.1", "localhost")):
        assert_refused(httpx.post(f"{server}/v1/chat/completions", json=body, headers={"Origin": origin}),
                       403, "origin_not_allowed")
        preflight = httpx.options(f"{server}/v1/chat/completions",
                                  headers={"Origin": origin, "Access-Control-Request-Method": "POST"})
        assert_refused(preflight, 403, "origin_not_allowed")
        assert "access-control-allow-origin" not in preflight.headers
    assert_refused(httpx.get(f"{server}/v1/models", headers={"Origin": "http://evil.example"}), 403,
                   "origin_not_allowed")
    for headers, content in [({"Content-Type": "text/plain"}, json.dumps(body)),
                             ({"Content-Type": "application/x-www-form-urlencoded"}, json.dumps(body)),
                             ({"Content-Type": "multipart/form-data; boundary=x"}, "--x--"),
                             ({}, json.dumps(body))]:
        assert_refused(httpx.post(f"{server}/v1/completions", content=content, headers=headers), 415,
                       "unsupported_media_type")
    assert metric(server, "zptr_completion_tokens_total") == generated  # the model did nothing
    # The server's own page (same origin) and JSON with a charset are answered.
    own = httpx.post(f"{server}/v1/chat/completions", json=body, headers={"Origin": server})
    assert own.status_code == 200 and "access-control-allow-origin" not in own.headers
    local = server.replace("127.0.0.1", "localhost")
    assert httpx.post(f"{local}/v1/chat/completions", json=body, headers={"Origin": local}).status_code == 200
    charset = httpx.post(f"{server}/v1/chat/completions", content=json.dumps(body),
                         headers={"Content-Type": "application/json; charset=utf-8"})
    assert charset.status_code == 200


def test_a_cors_origin_may_call_the_api(guarded_server):
    url, _ = guarded_server
    preflight = httpx.options(f"{url}/v1/chat/completions", headers={
        "Origin": CORS_ORIGIN, "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization, content-type, x-stainless-os"})
    assert preflight.status_code == 204
    assert preflight.headers["access-control-allow-origin"] == CORS_ORIGIN
    assert "POST" in preflight.headers["access-control-allow-methods"]
    assert preflight.headers["access-control-allow-headers"] == "authorization, content-type, x-stainless-os"
    body = {"messages": [{"role": "user", "content": "Say hello."}], "max_tokens": 2, "stream": True}
    answer = httpx.post(f"{url}/v1/chat/completions", json=body, headers={"Origin": CORS_ORIGIN})
    assert answer.status_code == 200 and answer.headers["access-control-allow-origin"] == CORS_ORIGIN
    assert answer.text.rstrip().endswith("data: [DONE]")
    refused = httpx.post(f"{url}/v1/chat/completions", json=body, headers={"Origin": "http://app.example:3001"})
    assert_refused(refused, 403, "origin_not_allowed")
    assert "access-control-allow-origin" not in refused.headers


def test_the_host_header_is_checked(server, guarded_server):
    """DNS rebinding: a page of evil.example whose name now resolves to 127.0.0.1 is the server's
    own origin, so the name itself is refused."""
    port = server.rsplit(":", 1)[1]
    body = {"messages": [{"role": "user", "content": "Say hello."}], "max_tokens": 2}
    for host in ("evil.example", f"evil.example:{port}", f"localhost.evil.example:{port}"):
        for response in (httpx.get(f"{server}/health", headers={"Host": host}),
                         httpx.get(f"{server}/", headers={"Host": host}),
                         httpx.post(f"{server}/v1/chat/completions", json=body,
                                    headers={"Host": host, "Origin": f"http://{host}"})):
            assert_refused(response, 403, "host_not_allowed")
    for host in (f"localhost:{port}", "localhost:9000", f"127.0.0.1:{port}", f"[::1]:{port}", "LocalHost."):
        assert httpx.get(f"{server}/health", headers={"Host": host}).status_code == 200, host
    url, _ = guarded_server  # --host-check off
    assert httpx.get(f"{url}/health", headers={"Host": "evil.example"}).status_code == 200


def test_host_names_a_server_answers_to():
    from zptr.app.server import HostCheck

    local = HostCheck("127.0.0.1")
    assert [local.allows(h) for h in ("localhost:8080", "app.localhost", "127.0.0.1", "[::1]:1", "127.9.9.9")] \
        == [True] * 5
    assert not any(local.allows(h) for h in ("evil.example", "192.168.1.5:8080", "", "[::1", "localhost.evil"))
    named = HostCheck("0.0.0.0", ["Box.LAN", "proxy.example:443"])
    assert all(named.allows(h) for h in ("box.lan:8080", "proxy.example", "192.168.1.5:8080", "[fe80::1]"))
    assert not named.allows("evil.example:8080")
    assert HostCheck("192.168.1.5").allows("192.168.1.5:8080") and not HostCheck("192.168.1.5").allows("10.0.0.1")


def test_no_redirect_copies_the_host_header(server, guarded_server):
    """Starlette's trailing-slash redirect builds its Location from Host: /metrics/ with
    Host: evil.example sent the client to http://evil.example/metrics."""
    url, _ = guarded_server
    for base, headers in ((server, {}), (url, {"Host": "evil.example"})):
        response = httpx.get(f"{base}/metrics/", headers=headers)
        assert response.status_code == 404 and "location" not in response.headers
        assert response.json()["error"]["type"] == "not_found_error"


def test_sigterm_ends_running_streams_and_exits_at_once(smollm2_omega, tmp_path, end_of_generation):
    """A stream in flight ends with an error event and [DONE], a waiting request gets 503, and the
    server exits with 143, without waiting out uvicorn's graceful-shutdown timeout."""
    started = Server(smollm2_omega, tmp_path / "stopped.err", *SERVER_ARGS, "-np", "1")
    try:
        url = started.wait_ready()
        body = {"messages": [{"role": "user", "content": "Tell me a long story."}], "max_tokens": 900,
                "temperature": 0, "logit_bias": end_of_generation}
        with httpx.stream("POST", f"{url}/v1/chat/completions", json={**body, "stream": True},
                          timeout=30) as response, concurrent.futures.ThreadPoolExecutor(1) as pool:
            lines = response.iter_lines()
            next(line for line in lines if '"route": ' in line and '"content"' in line)  # it is generating
            waiting = pool.submit(httpx.post, f"{url}/v1/chat/completions", json=body, timeout=30)
            while httpx.get(f"{url}/health").json()["queue_depth"] == 0:
                time.sleep(0.02)
            stopped_at = time.monotonic()
            started.process.send_signal(signal.SIGTERM)
            rest = [line for line in lines if line]
            ended = time.monotonic() - stopped_at
            refused = waiting.result()
        assert ended < 2, f"the stream ended {ended:.1f} s after SIGTERM"
        assert rest[-1] == "data: [DONE]"
        error = json.loads(rest[-2].removeprefix("data: "))["error"]
        assert set(error) == {"message", "type", "param", "code"} and error["code"] == "shutting_down"
        assert_refused(refused, 503, "shutting_down")
        started.process.wait(10)
        exited = time.monotonic() - stopped_at
        assert exited < 4, f"the server exited {exited:.1f} s after SIGTERM"
    finally:
        errors = started.stop()
    assert started.process.returncode == 128 + signal.SIGTERM and "stopped by SIGTERM" in errors, errors
    assert "Traceback" not in errors and "ERROR" not in errors, errors


# ------------------------------------------------------------------------------ API key, queue


def test_api_key_is_required(locked_server):
    body = {"messages": [{"role": "user", "content": "Say hello."}], "max_tokens": 2}
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": API_KEY}):
        response = httpx.post(f"{locked_server}/v1/chat/completions", json=body, headers=headers)
        assert response.status_code == 401 and response.json()["error"]["code"] == "invalid_api_key"
    assert httpx.get(f"{locked_server}/v1/models").status_code == 401
    assert httpx.get(f"{locked_server}/metrics").status_code == 401
    assert httpx.get(f"{locked_server}/health").status_code == 200  # public, as the page
    assert httpx.get(f"{locked_server}/").status_code == 200
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{locked_server}/v1", api_key="wrong", max_retries=0).models.list()
    keyed = openai.OpenAI(base_url=f"{locked_server}/v1", api_key=API_KEY, max_retries=0)
    assert chat(keyed, "Say hello.", 2)[2] == 2


def test_a_full_queue_answers_503_with_retry_after(locked_server, end_of_generation):
    headers = {"Authorization": f"Bearer {API_KEY}"}
    body = {"messages": [{"role": "user", "content": "Tell me a long story."}], "max_tokens": 900,
            "temperature": 0, "stream": True, "logit_bias": end_of_generation}
    with httpx.stream("POST", f"{locked_server}/v1/chat/completions", json=body, headers=headers,
                      timeout=60) as response:
        assert response.status_code == 200
        lines = response.iter_lines()  # kept: a dropped line iterator closes the connection
        next(line for line in lines if '"route": "' in line)  # it is generating
        refused = httpx.post(f"{locked_server}/v1/completions", json={"prompt": "x", "max_tokens": 1},
                             headers=headers)
        assert refused.status_code == 503 and refused.headers["retry-after"] == "1"
        assert refused.json()["error"]["code"] == "queue_full"
    for _ in range(100):  # the abandoned stream's job ends at its next token
        if not httpx.get(f"{locked_server}/health").json()["busy"]:
            break
        time.sleep(0.05)
    again = httpx.post(f"{locked_server}/v1/completions", json={"prompt": "x", "max_tokens": 1},
                       headers=headers)
    assert again.status_code == 200 and again.json()["usage"]["completion_tokens"] == 1


# ------------------------------------------------------------------------------ command line


def test_cli_refuses_bad_flags_and_a_taken_port_in_one_line(smollm2_omega, capsys):
    import socket

    from zptr.app.cli import main

    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen(1)
    port = taken.getsockname()[1]
    try:
        for argv, message in [(["--queue", "-1"], "--queue must be 0 or more"),
                              (["--port", "70000"], "--port must lie in 0..65535"),
                              (["--api-key", " "], "--api-key is empty"),
                              (["--max-body-bytes", "0"], "--max-body-bytes must be 1 or more"),
                              (["--timeout", "0"], "--timeout must be more than 0 seconds"),
                              (["--cors", "app.example"], "--cors 'app.example': an origin is"),
                              (["--cors", "http://app.example/page"], "an origin is scheme://host[:port]"),
                              (["--allowed-host", ""], "--allowed-host '': not a host name"),
                              (["--port", str(port)], f"cannot listen on 127.0.0.1:{port}"),
                              (["--port", "0", "--omega", "exact", "--sidecar", "/nonexistent.omega.gguf"],
                               "no Omega sidecar")]:
            assert main(["serve", str(smollm2_omega), *argv]) == 1
            err = capsys.readouterr().err
            assert err.startswith("zptr serve: error: ") and message in err and err.count("\n") == 1, err
        assert main(["serve", "/nonexistent.gguf", "--port", "0"]) == 1
        assert "no such model file" in capsys.readouterr().err
    finally:
        taken.close()


# ------------------------------------------------------------------------------ the chat page


@pytest.fixture
def browser(tmp_path):
    if not CHROMIUM.exists() or not CHROMEDRIVER.exists():
        reason = ("Chromium and its driver are missing (/usr/bin/chromium, /usr/bin/chromedriver); "
                  ".ci/run installs them: apt-get install -y chromium chromium-driver")
        if os.environ.get("ZPTR_REQUIRE_BROWSER") == "1":
            pytest.fail(reason)
        pytest.skip(reason)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--no-first-run", f"--user-data-dir={tmp_path / 'chromium'}", "--window-size=1200,900"):
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=Service(str(CHROMEDRIVER)))
    yield driver
    driver.quit()


def open_page(browser, server: str, max_tokens: int, omega: str):
    """The chat page loaded, its token limit and Omega mode set; a waiter for what follows."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select, WebDriverWait

    browser.get(server + "/")
    wait = WebDriverWait(browser, 60, poll_frequency=0.05)
    wait.until(lambda d: "omega fast" in d.find_element(By.ID, "model").text)
    field = browser.find_element(By.ID, "max-tokens")
    field.clear()
    field.send_keys(str(max_tokens))
    Select(browser.find_element(By.ID, "omega")).select_by_value(omega)
    return wait


def test_chat_page_streams_route_coloured_tokens(browser, server):
    from selenium.webdriver.common.by import By

    wait = open_page(browser, server, 24, "exact")
    browser.find_element(By.ID, "origin").send_keys("I write about the sea.")
    browser.find_element(By.ID, "prompt").send_keys("Write a haiku about the sea.")
    browser.execute_script("""
        window.seen = [];  // (tokens shown, histogram total) at every change of the chat log
        new MutationObserver(() => window.seen.push([
            document.querySelectorAll('.msg.assistant .token').length,
            ['BOUNDARY', 'DEPTH', 'PHASE', 'BASE'].reduce(
                (sum, r) => sum + Number(document.getElementById('hist-' + r).dataset.count), 0)]))
          .observe(document.getElementById('log'), {childList: true, subtree: true});""")
    browser.find_element(By.ID, "send").click()
    # Tokens arrive one by one while the answer streams, each with its route's class.
    wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, ".msg.assistant .token"))
    histogram = lambda: sum(int(browser.find_element(By.ID, f"hist-{r}").get_attribute("data-count"))  # noqa: E731
                            for r in CLUSTERS)
    wait.until(lambda d: histogram() > 0)
    meta = wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, ".msg.assistant .meta"))[0]
    assert "omega exact" in meta.text, meta.text
    tokens = browser.find_elements(By.CSS_SELECTOR, ".msg.assistant .token")
    routes = [t.get_attribute("data-route") for t in tokens]
    assert routes and set(routes) <= set(CLUSTERS)
    assert histogram() == len(routes) == int(meta.text.split()[0])
    for route in set(routes):  # each route's bar is drawn, in the legend's colour as its tokens
        assert browser.find_element(By.ID, f"fill-{route}").size["width"] > 0
        shown = [t for t in tokens if t.get_attribute("data-route") == route][0].value_of_css_property("color")
        legend = browser.find_element(By.CSS_SELECTOR, f"header .route-{route}").value_of_css_property("color")
        assert shown == legend
    colours = {browser.find_element(By.CSS_SELECTOR, f"header .route-{r}").value_of_css_property("color")
               for r in CLUSTERS}
    assert len(colours) == 4
    # The histogram followed the tokens as they arrived, not all at once at the end.
    seen = browser.execute_script("return window.seen")
    assert all(shown == counted for shown, counted in seen), seen
    assert len({shown for shown, _ in seen}) >= 3, seen
    # Nothing but the server itself was asked for (the page works offline).
    origins = browser.execute_script(
        "return performance.getEntriesByType('resource').map(e => new URL(e.name).origin)")
    assert set(origins) <= {server}


def test_chat_page_shows_japanese_as_the_api_answers_it(browser, server, client):
    """The page assembles streamed pieces into the same text as the API's plain answer: no
    character split over tokens is lost."""
    from selenium.webdriver.common.by import By

    prompt = "日本語で答えてください。東京は"
    expected = chat(client, prompt, 24, omega="off")[0]
    wait = open_page(browser, server, 24, "off")
    browser.find_element(By.ID, "prompt").send_keys(prompt)
    browser.find_element(By.ID, "send").click()
    wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, ".msg.assistant .meta"))
    shown = browser.execute_script("return Array.from(document.querySelectorAll('.msg.assistant .token'))"
                                   ".map(t => t.textContent).join('')")
    assert any(ord(ch) > 0x2E80 for ch in expected)
    assert shown == expected
