"""The HTTP application of ``zptr serve``: OpenAI's chat and completion endpoints on one
:class:`~zptr.runtime.engine.ZptrLlama`, Omega routes on every generated token, a chat page.

    app = create_app(ZptrLlama("model.gguf"), model_name="model", api_key=None, queue_size=16,
                     max_body_bytes=2 << 20, timeout=20.0)

One model, ``n_parallel`` requests decoding together (continuous batching, as llama-server's
slots). The engine is not thread-safe, so every request becomes a :class:`Job` for the single
model thread of a :class:`ModelWorker`, which runs the engine's slot loop: a job gets a slot as
soon as one is free and joins the running ones at the next step (its prompt read in chunks
beside their decoding); beyond the slots a bounded FIFO (``queue_size`` may wait; one more gets
503 with Retry-After). Everything that touches the engine — chat template, tokenizer, the
request's Omega mode and origin, generation — runs on that thread; it hands events (start, token,
end, error) to the request's asyncio queue. A client that goes away cancels its job: a waiting
job leaves the queue, a running one frees its slot before the next step.

OpenAI's shapes, plus ZPTR's fields: requests may carry ``omega`` (off | exact | fast) and
``origin`` (text), and llama-server's ``top_k``, ``min_p``, ``repeat_penalty``; every choice
carries ``routes`` (one route name per generated token; null with Omega off) and every streamed
chunk's ``delta`` (``choices[0]`` for completions) a ``route`` (null on the chunks that carry no
token). Ranges are checked by :class:`~zptr.runtime.sampling.SamplingSettings`, JSON types by
strict pydantic models; every error is OpenAI's ``{"error": {message, type, param, code}}``.

Before any of that, :class:`Guard` refuses what a page of another site, a DNS-rebound name or a
client that sends too much or too slowly could ask (``Host``, ``Origin``, Content-Type, body size
and read time); SIGTERM ends every stream with an error event and ``[DONE]`` (see ``httpd``).
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import ipaddress
import json
import logging
import queue
import threading
import time
import uuid
from collections import deque
from dataclasses import dataclass, field
from importlib import resources
from typing import Any, AsyncIterator, Callable, Literal, Optional, Sequence, Union
from urllib.parse import urlsplit

from fastapi import Depends, FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from prometheus_client import (CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram,
                               generate_latest)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.datastructures import Headers
from starlette.requests import ClientDisconnect

from ..choices import FinishReason, JobState, OmegaMode, RequestMode
from ..config import CLUSTERS
from ..errors import ConfigError, OmegaModeError, ZptrError, error_summary
from ..runtime.engine import ZptrLlama
from ..runtime.engine import Request as EngineRequest
from ..runtime.sampling import SamplingSettings

log = logging.getLogger("zptr.serve")

RETRY_AFTER_S = 1
SAMPLING_FIELDS = ("max_tokens", "temperature", "top_k", "top_p", "min_p", "repeat_penalty",
                   "presence_penalty", "frequency_penalty", "seed", "stop", "logit_bias")
ENDPOINTS = ("/", "/health", "/metrics", "/v1/models", "/v1/chat/completions", "/v1/completions")
JSON_POSTS = ("/v1/chat/completions", "/v1/completions")


# ------------------------------------------------------------------------------ errors


class ApiError(Exception):
    """An answer in OpenAI's error shape."""

    TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
             404: "not_found_error", 405: "invalid_request_error", 408: "invalid_request_error",
             413: "invalid_request_error", 415: "invalid_request_error", 499: "client_closed_request",
             503: "unavailable_error"}

    def __init__(self, status: int, message: str, param: Optional[str] = None,
                 code: Optional[str] = None, headers: Optional[dict[str, str]] = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.headers = headers

    def body(self) -> dict:
        kind = self.TYPES.get(self.status, "server_error")
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def _param_of(message: str, fields: tuple[str, ...] = SAMPLING_FIELDS) -> Optional[str]:
    """The request field a ZPTR error message starts with (SamplingSettings names its field)."""
    head = message.split(" ", 1)[0]
    return head if head in fields else None


def _loc(loc: tuple) -> str:
    """pydantic's error location as a field path (``messages[0].content``), union tags dropped."""
    path = ""
    for part in loc:
        if isinstance(part, int):
            path += f"[{part}]"
        elif "[" in part or part in ("str", "int", "float", "bool", "list", "dict", "none"):
            continue  # which member of a Union pydantic tried
        else:
            path += f".{part}" if path else part
    return path


# ------------------------------------------------------------------------------ request bodies


class _Strict(BaseModel):
    # Strict: a string is not a number, a number not a string (OpenAI refuses both); fields
    # OpenAI's clients send that ZPTR does not use (user, metadata, ...) are ignored.
    model_config = ConfigDict(strict=True, extra="ignore")


class StreamOptions(_Strict):
    include_usage: bool = False


class _Generation(_Strict):
    model: Optional[str] = None
    max_tokens: Optional[int] = None
    temperature: Optional[float] = None
    top_k: Optional[int] = None
    top_p: Optional[float] = None
    min_p: Optional[float] = None
    repeat_penalty: Optional[float] = None
    presence_penalty: Optional[float] = None
    frequency_penalty: Optional[float] = None
    seed: Optional[int] = None
    stop: Union[str, list[str], None] = None
    logit_bias: Optional[dict[str, float]] = None
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    n: int = 1
    logprobs: Any = None
    omega: Optional[RequestMode] = None
    origin: Optional[str] = None

    def unsupported(self) -> Optional[str]:
        """The first field asking for something ZPTR does not do (refused, not ignored)."""
        if self.n != 1:
            return "n"
        if self.logprobs not in (None, False):
            return "logprobs"
        return None


class ContentPart(_Strict):
    type: str
    text: Optional[str] = None


class Message(_Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: Union[str, list[ContentPart], None] = None

    def as_template_input(self, index: int) -> dict:
        content = self.content
        if isinstance(content, list):
            for number, part in enumerate(content):
                if part.type != "text" or part.text is None:
                    param = f"messages[{index}].content[{number}]"
                    raise ApiError(400, f"{param}: only text parts are supported (got type {part.type!r})",
                                   param=param)
            content = "".join(part.text for part in content)
        # OpenAI's "developer" is the system prompt of newer models.
        return {"role": "system" if self.role == "developer" else self.role, "content": content or ""}


class ChatRequest(_Generation):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: Optional[int] = None
    tools: Optional[list] = None
    response_format: Optional[dict] = None

    def unsupported(self) -> Optional[str]:
        if self.tools:
            return "tools"
        if self.response_format and self.response_format.get("type", "text") != "text":
            return "response_format"
        return super().unsupported()


class CompletionRequest(_Generation):
    prompt: Union[str, list[int], list[str]]
    echo: bool = False
    suffix: Optional[str] = None
    best_of: Optional[int] = None

    def unsupported(self) -> Optional[str]:
        if self.echo:
            return "echo"
        if self.suffix:
            return "suffix"
        if self.best_of not in (None, 1):
            return "best_of"
        return super().unsupported()


async def _parse(request: Request, model: type[_Generation]) -> _Generation:
    """The request's JSON body as ``model`` (its size, read time and Content-Type are
    :class:`Guard`'s to check)."""
    try:
        raw = await request.body()
    except ClientDisconnect:  # it hung up mid-upload: nothing to run, nobody to answer
        raise ApiError(499, "the client closed the request while it sent its body",
                       code="client_closed_request") from None
    try:
        data = json.loads(raw)
    except (ValueError, RecursionError) as err:
        raise ApiError(400, f"the request body is not valid JSON ({err})") from None
    if not isinstance(data, dict):
        raise ApiError(400, "the request body must be a JSON object")
    try:
        body = model.model_validate(data)
    except ValidationError as err:
        first = err.errors(include_url=False)[0]
        param = _loc(first["loc"]) or None
        raise ApiError(400, f"{param}: {first['msg']}" if param else first["msg"], param=param) from None
    field_name = body.unsupported()
    if field_name:
        raise ApiError(400, f"{field_name} is not supported by zptr serve", param=field_name)
    return body


# ------------------------------------------------------------------------------ the model thread


@dataclass
class Job:
    """One request for the model thread; its events come back through ``events``."""

    prompt: Callable[[ZptrLlama], list[int]]  # builds the prompt's tokens (on the model thread)
    prompt_param: str  # the request field the prompt came from, for errors
    settings: SamplingSettings
    omega: Optional[str]
    origin: Optional[str]
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)
    arrived: float = field(default_factory=time.perf_counter)
    state: JobState = JobState.NEW
    request: Optional[EngineRequest] = None  # the engine's request, once the job has a slot
    answered: bool = False  # its first token went out

    def emit(self, *event: Any) -> None:
        self.loop.call_soon_threadsafe(self.events.put_nowait, event)


class ModelWorker:
    """The model thread: the engine's slot loop (continuous batching) and a bounded FIFO of the
    jobs waiting for a slot.

    Each turn of the loop admits waiting jobs into free slots (their prompt and origin checked,
    a request started), then runs one step of every active request together, hands each request's
    new tokens to its job, and frees the slot of every request that finished or whose client left.
    With nothing active it sleeps until a job arrives.
    """

    def __init__(self, engine: ZptrLlama, queue_size: int, metrics: "Metrics"):
        self.engine, self.queue_size, self.metrics = engine, queue_size, metrics
        self.batcher = engine.batcher
        self._arrivals: "queue.SimpleQueue[Optional[Job]]" = queue.SimpleQueue()
        self._waiting: deque[Job] = deque()  # arrived, not yet admitted (model thread only)
        self._lock = threading.Lock()
        self.waiting = 0
        self.running: list[Job] = []
        self._stopping = False
        self._thread = threading.Thread(target=self._loop, name="zptr-model", daemon=True)
        self._thread.start()

    @property
    def busy(self) -> bool:
        return bool(self.running)

    @property
    def slots(self) -> int:
        return self.batcher.n_slots

    def submit(self, job: Job) -> None:
        """Queue ``job``, or refuse it with 503 when every slot is busy and ``queue_size`` jobs
        already wait."""
        with self._lock:
            if self._stopping:
                raise ApiError(503, "the server is shutting down", code="shutting_down")
            if self.waiting + len(self.running) >= self.queue_size + self.slots:
                raise ApiError(503, f"the server is busy: {self.waiting} requests are waiting for a "
                               f"slot ({self.slots} slots, --queue {self.queue_size}); retry later",
                               code="queue_full", headers={"Retry-After": str(RETRY_AFTER_S)})
            self.waiting += 1
            job.state = JobState.WAITING
            self._arrivals.put(job)

    def cancel(self, job: Job) -> None:
        """The client went away: a waiting job leaves the queue now, a running one frees its slot
        before the next step."""
        job.cancelled.set()
        with self._lock:
            if job.state != JobState.WAITING:
                return
            job.state = JobState.DROPPED
            self.waiting -= 1
        # Its handler waits for a first event that the model thread will never send.
        job.emit("error", ApiError(499, "the client closed the request while it waited",
                                   code="client_closed_request"))

    def stop(self, timeout: float = 10.0) -> None:
        """End every running job with a final event and the thread (server shutdown); a second
        call only waits for the thread."""
        with self._lock:  # no job can arrive behind the stop marker, unanswered
            if not self._stopping:
                self._stopping = True
                self._arrivals.put(None)
        self._thread.join(timeout)

    # ---------------------------------------------------------------- the loop
    def _loop(self) -> None:
        while True:
            idle = not self.running
            try:
                job = self._arrivals.get() if idle and not self._waiting else self._arrivals.get_nowait()
            except queue.Empty:
                job = None
            else:
                if job is None:  # stop
                    self._shutdown()
                    return
                self._waiting.append(job)
                continue  # take every arrival before the next step
            self._admit()
            self._drop_cancelled()
            if not self.running:
                continue
            try:
                touched = self.batcher.step()
            except Exception as err:  # a bug in the step: every running job hears of it
                log.exception("zptr serve: internal error in a decode step")
                for running in list(self.running):
                    self._fail(running, _internal(err))
                continue
            self.metrics.batch_tokens.observe(self.batcher.last_batch)
            for request in touched:
                self._deliver(request.owner)

    def _admit(self) -> None:
        while self._waiting and self.batcher.has_room:
            job = self._waiting.popleft()
            with self._lock:
                if job.state != JobState.WAITING:
                    continue  # cancelled while it waited
                job.state = JobState.RUNNING
                self.waiting -= 1
            try:
                job.request = request = self._start(job)
            except ApiError as err:
                self._fail(job, err, running=False)
                continue
            except ZptrError as err:
                self._fail(job, ApiError(400, str(err), param=_param_of(str(err))), running=False)
                continue
            except Exception as err:
                log.exception("zptr serve: internal error starting a generation")
                self._fail(job, _internal(err), running=False)
                continue
            request.owner = job
            self.batcher.add(request)
            self.running.append(job)
            job.emit("start", len(request.prompt), request.mode)
            if request.done:  # max_tokens 0
                self._deliver(job)

    def _start(self, job: Job) -> EngineRequest:
        engine = self.engine
        try:
            engine.request_mode(job.omega, job.origin)
        except OmegaModeError as err:
            raise ApiError(400, str(err), param="omega" if job.omega else "origin") from None
        signature = None
        if job.origin:
            try:
                signature = engine.origin_signature(job.origin)
            except ConfigError as err:  # the origin text does not fit the context, ...
                raise ApiError(400, f"origin: {err}", param="origin") from None
        try:
            tokens = job.prompt(engine)
            engine.check_prompt(tokens)
        except ConfigError as err:
            raise ApiError(400, str(err), param=job.prompt_param) from None
        try:
            engine.check_settings(job.settings)
        except ConfigError as err:
            raise ApiError(400, str(err), param=_param_of(str(err))) from None
        self.metrics.prompt_tokens.inc(len(tokens))
        return engine.start(tokens, job.settings, omega=job.omega, origin_signature=signature)

    def _drop_cancelled(self) -> None:
        for job in list(self.running):
            if job.cancelled.is_set():
                self.batcher.cancel(job.request)
                self.metrics.cancelled.inc()
                # Its handler may still wait for an event (a plain request): without one it would
                # wait until shutdown, and be cancelled there mid-await.
                job.emit("error", ApiError(499, "the client closed the request", code="client_closed_request"))
                self._finish(job)

    def _deliver(self, job: Job) -> None:
        """Hand the job its request's new tokens; the final event once it is done."""
        request = job.request
        metrics = self.metrics
        while request.outbox:
            token = request.outbox.popleft()
            if not job.answered:
                job.answered = True
                metrics.first_token.observe(time.perf_counter() - job.arrived)
            metrics.completion_tokens.inc()
            job.emit("token", token.piece, None if token.route is None else CLUSTERS[token.route])
        if not request.done:
            return
        count = len(request.tokens)
        if count > 1 and request.first_at is not None:
            metrics.decode_tps.set((count - 1) / max(request.last_at - request.first_at, 1e-9))
        # llama.cpp's "context" (the context filled up) is OpenAI's "length".
        finish = FinishReason.STOP if request.finish_reason == FinishReason.STOP else FinishReason.LENGTH
        omega = {"mode": request.mode}
        if request.mode == OmegaMode.FAST:
            omega.update(certified=request.stats.certified, fallback=request.stats.fallback)
        job.emit("end", finish, request.tail, {"completion_tokens": count, "omega": omega})
        self._finish(job)

    def _finish(self, job: Job) -> None:
        with self._lock:
            job.state = JobState.DONE
            if job in self.running:
                self.running.remove(job)

    def _fail(self, job: Job, err: ApiError, running: bool = True) -> None:
        if running and job.request is not None:
            self.batcher.cancel(job.request)
        job.emit("error", err)
        self._finish(job)

    def _shutdown(self) -> None:
        """Every running stream ends with an error event (the server is going away); waiting
        jobs are refused."""
        for job in list(self.running):
            self._fail(job, ApiError(503, "the server is shutting down", code="shutting_down"))
        while self._waiting:
            job = self._waiting.popleft()
            if job.state == JobState.WAITING:
                self._fail(job, ApiError(503, "the server is shutting down", code="shutting_down"),
                           running=False)


def _internal(err: Exception) -> ApiError:
    message = error_summary(err) if str(err).strip() else ""
    return ApiError(500, f"internal error (a bug): {type(err).__name__}: {message}")


# ------------------------------------------------------------------------------ metrics


class _OmegaCollector:
    """Omega fast's certificate counts, read from the engine at each scrape."""

    def __init__(self, engine: ZptrLlama):
        self.engine = engine

    def collect(self):
        stats = self.engine.stats
        certified = CounterMetricFamily("zptr_omega_certified_tokens",
                                        "Omega-fast tokens decided by the norm bound alone")
        certified.add_metric([], stats.certified)
        fallback = CounterMetricFamily("zptr_omega_fallback_tokens",
                                       "Omega-fast tokens that needed the full correction")
        fallback.add_metric([], stats.fallback)
        share = GaugeMetricFamily("zptr_omega_certified_share",
                                  "certified / (certified + fallback) since the server started")
        share.add_metric([], stats.certified_share)
        return [certified, fallback, share]


class Metrics:
    """The server's Prometheus metrics (a registry of its own: several apps in one process)."""

    def __init__(self, engine: ZptrLlama):
        self.registry = registry = CollectorRegistry()
        self.requests = Counter("zptr_requests", "HTTP requests answered, by endpoint and status",
                                ["endpoint", "status"], registry=registry)
        self.prompt_tokens = Counter("zptr_prompt_tokens", "prompt tokens of the requests run",
                                     registry=registry)
        self.completion_tokens = Counter("zptr_completion_tokens", "tokens generated",
                                         registry=registry)
        self.cancelled = Counter("zptr_cancelled_generations",
                                 "generations stopped early because the client went away",
                                 registry=registry)
        self.first_token = Histogram("zptr_time_to_first_token_seconds",
                                     "from the request's arrival (queue wait included) to its first token",
                                     buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
                                     registry=registry)
        self.decode_tps = Gauge("zptr_decode_tokens_per_second",
                                "decode speed of the last finished generation (tokens/s)",
                                registry=registry)
        self.queue_depth = Gauge("zptr_queue_depth", "requests waiting for a free slot",
                                 registry=registry)
        self.busy = Gauge("zptr_busy", "1 while any request is generating", registry=registry)
        self.slots = Gauge("zptr_slots", "slots (requests that decode together)", registry=registry)
        self.slots_busy = Gauge("zptr_slots_busy", "slots holding a request", registry=registry)
        self.batch_tokens = Histogram("zptr_batch_tokens", "tokens decoded per step of the slot loop",
                                      buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048),
                                      registry=registry)
        registry.register(_OmegaCollector(engine))

    def watch(self, worker: ModelWorker) -> None:
        self.queue_depth.set_function(lambda: worker.waiting)
        self.busy.set_function(lambda: float(worker.busy))
        self.slots.set_function(lambda: float(worker.slots))
        self.slots_busy.set_function(lambda: float(len(worker.running)))


class CountRequests:
    """ASGI middleware: every answered request counted by endpoint and status (a pure ASGI
    wrapper: Starlette's BaseHTTPMiddleware would get between streams and disconnects)."""

    def __init__(self, app, metrics: Metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        endpoint = scope["path"] if scope["path"] in ENDPOINTS else "other"

        async def counting_send(message):
            if message["type"] == "http.response.start":
                self.metrics.requests.labels(endpoint, str(message["status"])).inc()
            await send(message)

        await self.app(scope, receive, counting_send)


# ------------------------------------------------------------------------------ what a request may be


def _host_name(value: str) -> str:
    """The name in a Host header or --host value, lower case, without port, brackets or the
    root's trailing dot (``[::1]:8080`` → ``::1``, ``Example.COM.:80`` → ``example.com``)."""
    value = value.strip().lower()
    if value.startswith("["):
        value, bracket, _ = value[1:].partition("]")
        if not bracket:
            return ""
    elif value.count(":") == 1:
        value = value.partition(":")[0]
    return value.rstrip(".")


def _address(name: str) -> Union[ipaddress.IPv4Address, ipaddress.IPv6Address, None]:
    try:
        return ipaddress.ip_address(name)
    except ValueError:
        return None


class HostCheck:
    """The ``Host`` names the server answers to. A page of another site that rebinds its own DNS
    name to this machine (DNS rebinding) reaches the server as the same origin under that name,
    so names are checked: ``localhost`` (and ``*.localhost``), the bound host and ``allowed``.
    An IP address cannot be rebound: a loopback one always passes, and any of them when the
    server binds every interface (0.0.0.0, ::). The port is not checked: a forwarded port
    (``ssh -L 9000:localhost:8080``) changes it."""

    def __init__(self, bound: str, allowed: Sequence[str] = ()):
        self.names, self.any_address = {"localhost"}, False
        for value in (bound, *allowed):
            name = _host_name(value)
            if not name:
                raise ConfigError(f"--allowed-host {value!r}: not a host name")
            address = _address(name)
            if address is not None and address.is_unspecified:
                self.any_address = True
            else:
                self.names.add(name if address is None else str(address))

    def allows(self, header: str) -> bool:
        name = _host_name(header)
        address = _address(name)
        if address is not None:
            return address.is_loopback or self.any_address or str(address) in self.names
        return name in self.names or name.endswith(".localhost")


def cors_origin(value: str) -> str:
    """A --cors value as browsers send it in ``Origin`` (scheme://host[:port], lower case)."""
    parts = urlsplit(value.strip())
    if parts.scheme not in ("http", "https") or not parts.netloc or parts.path not in ("", "/") \
            or parts.query or parts.fragment:
        raise ConfigError(f"--cors {value!r}: an origin is scheme://host[:port], e.g. http://localhost:3000")
    return f"{parts.scheme}://{parts.netloc}".lower()


def check_limits(max_body_bytes: int, timeout: float) -> None:
    if max_body_bytes < 1:
        raise ConfigError(f"--max-body-bytes must be 1 or more, got {max_body_bytes}")
    if not timeout > 0:  # NaN too
        raise ConfigError(f"--timeout must be more than 0 seconds, got {timeout:g}")


class Guard:
    """ASGI middleware: the requests a page of another site, a DNS-rebound name, or a client that
    sends too much or too slowly could make, refused before the application reads their body.

    - ``Host`` must pass ``hosts`` (None: not checked);
    - an ``Origin`` header, when present, must be the server's own (the same host and port as
      ``Host``: the chat page) or one of ``cors``, whose preflight ``OPTIONS`` is answered and whose
      answers carry ``Access-Control-Allow-Origin``; browsers send ``Origin`` on every cross-site
      POST, forms and ``text/plain`` ones included;
    - the API's POST routes take ``Content-Type: application/json`` only (415): a form or
      ``text/plain`` POST is the one a page may send cross-site without asking first;
    - a body larger than ``max_body_bytes`` is refused with 413 from its ``Content-Length`` before
      any of it is read, or once a chunked body passes the limit; the body must have arrived
      ``timeout`` seconds after the headers (408). Both answers close the connection.
    """

    def __init__(self, app, *, hosts: Optional[HostCheck], cors: Sequence[str], max_body_bytes: int,
                 timeout: float):
        self.app, self.hosts, self.cors = app, hosts, frozenset(cors)  # as cors_origin writes them
        self.max_body_bytes, self.timeout = max_body_bytes, timeout

    def _refusal(self, scope, headers: Headers) -> Optional[ApiError]:
        host = headers.get("host", "")
        if self.hosts is not None and not self.hosts.allows(host):
            return ApiError(403, f"Host {host!r} is not a name this server answers to (allow it with "
                            "--allowed-host NAME, or --host-check off)", code="host_not_allowed")
        origin = headers.get("origin")
        if origin is not None and origin.lower() not in self.cors \
                and (not host or urlsplit(origin.lower()).netloc != host.lower()):
            return ApiError(403, f"requests from the origin {origin!r} are refused (another site; allow "
                            "it with --cors ORIGIN)", code="origin_not_allowed")
        length = headers.get("content-length", "")
        if length.isdigit() and int(length) > self.max_body_bytes:
            return ApiError(413, f"the request body is {length} bytes, more than the server takes "
                            f"(--max-body-bytes {self.max_body_bytes})", code="request_too_large",
                            headers={"Connection": "close"})
        if scope["method"] == "POST" and scope["path"] in JSON_POSTS:
            media = headers.get("content-type", "").partition(";")[0].strip().lower()
            if media != "application/json":
                return ApiError(415, f"Content-Type must be application/json (got {media or 'none'})",
                                code="unsupported_media_type")
        return None

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = Headers(scope=scope)
        refusal = self._refusal(scope, headers)
        if refusal is not None:
            return await refusal.response()(scope, receive, send)
        origin = headers.get("origin", "").lower()
        if origin in self.cors:
            allow = {"Access-Control-Allow-Origin": origin, "Vary": "Origin"}
            if scope["method"] == "OPTIONS" and "access-control-request-method" in headers:
                allow.update({"Access-Control-Allow-Methods": "GET, POST",
                              "Access-Control-Allow-Headers":
                                  headers.get("access-control-request-headers", "authorization, content-type"),
                              "Access-Control-Max-Age": "600"})
                return await Response(status_code=204, headers=allow)(scope, receive, send)
            send = self._with_headers(send, allow)
        await self.app(scope, self._bounded(receive), send)

    @staticmethod
    def _with_headers(send, extra: dict[str, str]):
        async def sending(message):
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []),
                                                  *((k.lower().encode(), v.encode()) for k, v in extra.items())]}
            await send(message)
        return sending

    def _bounded(self, receive):
        """``receive`` that counts the body against the limit and waits for it until the deadline."""
        deadline = time.monotonic() + self.timeout
        received, complete = 0, False

        async def receiving():
            nonlocal received, complete
            if complete:  # the body is in: what comes next is a disconnect, whenever it comes
                return await receive()
            try:
                message = await asyncio.wait_for(receive(), max(deadline - time.monotonic(), 0))
            except asyncio.TimeoutError:  # TimeoutError itself from Python 3.11
                raise ApiError(408, f"the request body did not arrive within --timeout {self.timeout:g} s",
                               code="request_timeout", headers={"Connection": "close"}) from None
            if message["type"] != "http.request":
                complete = True
                return message
            received += len(message.get("body", b""))
            if received > self.max_body_bytes:
                raise ApiError(413, f"the request body is more than the server takes (--max-body-bytes "
                               f"{self.max_body_bytes})", code="request_too_large",
                               headers={"Connection": "close"})
            complete = not message.get("more_body", False)
            return message

        return receiving


# ------------------------------------------------------------------------------ the application


def _sse(data: Union[dict, str]) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)}\n\n"


async def _watch_disconnect(request: Request, job: Job, worker: ModelWorker) -> None:
    """Cancel ``job`` when the client goes away (the body is read: what comes next is that)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            worker.cancel(job)
            return


LOOPBACK_ONLY = HostCheck("127.0.0.1")  # create_app's default: a server bound to this machine


def create_app(engine: ZptrLlama, *, model_name: str, api_key: Optional[str] = None,
               queue_size: int = 16, hosts: Optional[HostCheck] = LOOPBACK_ONLY,
               cors: Sequence[str] = (), max_body_bytes: int, timeout: float) -> FastAPI:
    """The server's application around a loaded engine (the model thread starts with it): the
    engine's ``n_parallel`` slots decode together, ``queue_size`` more requests may wait; what
    requests it answers at all is :class:`Guard`'s (``hosts`` None: any ``Host``; a body over
    ``max_body_bytes`` is refused, headers and body each get ``timeout`` seconds).

    ``app.state.stop_generations()`` ends every generation with its final event: a server that
    waits for open responses before the lifespan's shutdown (uvicorn) calls it first."""
    if queue_size < 0:
        raise ConfigError(f"--queue must be 0 or more, got {queue_size}")
    check_limits(max_body_bytes, timeout)
    cors = [cors_origin(origin) for origin in cors]
    metrics = Metrics(engine)
    n_ctx = engine.n_ctx
    state: dict[str, Any] = {}
    created = int(time.time())
    page = resources.files("zptr.app").joinpath("static/chat.html").read_text(encoding="utf-8")

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        state["worker"] = worker = ModelWorker(engine, queue_size, metrics)
        metrics.watch(worker)
        try:
            yield
        finally:
            worker.stop()

    # No /docs or /redoc: their pages load assets from a CDN, and the server works offline. No
    # trailing-slash redirects: Starlette builds their Location from the request's Host.
    app = FastAPI(title="zptr serve", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan,
                  redirect_slashes=False)
    app.add_middleware(Guard, hosts=hosts, cors=cors, max_body_bytes=max_body_bytes, timeout=timeout)
    app.add_middleware(CountRequests, metrics=metrics)  # outside the guard: its refusals count too

    async def stop_generations() -> None:
        worker: Optional[ModelWorker] = state.get("worker")
        if worker is not None:
            await asyncio.to_thread(worker.stop)

    app.state.stop_generations = stop_generations

    @app.exception_handler(ApiError)
    async def api_error(request: Request, err: ApiError):
        return err.response()

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, err: StarletteHTTPException):
        return ApiError(err.status_code, str(err.detail), headers=getattr(err, "headers", None)).response()

    @app.exception_handler(Exception)
    async def bug(request: Request, err: Exception):
        return ApiError(500, f"internal error (a bug): {type(err).__name__}").response()

    def require_key(request: Request) -> None:
        if api_key is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), api_key.encode()):
            raise ApiError(401, "a valid API key is required (Authorization: Bearer KEY)",
                           code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})

    authorized = [Depends(require_key)]

    def settings_of(body: _Generation, max_tokens: Optional[int]) -> SamplingSettings:
        given = {name: getattr(body, name) for name in SAMPLING_FIELDS if getattr(body, name) is not None}
        # No max_tokens: up to the end of the context (as OpenAI and llama-server).
        given["max_tokens"] = n_ctx if max_tokens is None else max_tokens
        try:
            return SamplingSettings(**given)
        except ConfigError as err:
            raise ApiError(400, str(err), param=_param_of(str(err))) from None

    async def run(request: Request, job: Job) -> tuple:
        """Queue ``job`` and wait for its first event; a disconnect meanwhile cancels it."""
        worker: ModelWorker = state["worker"]
        worker.submit(job)
        watcher = asyncio.create_task(_watch_disconnect(request, job, worker))
        try:
            first = await job.events.get()
        except BaseException:
            worker.cancel(job)
            watcher.cancel()
            raise
        if first[0] == "error":
            watcher.cancel()
            raise first[1]
        return first, watcher

    async def complete(request: Request, body: _Generation, job: Job, chat: bool):
        first, watcher = await run(request, job)
        _, prompt_tokens, mode = first
        ident = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}"
        base = {"id": ident, "object": "chat.completion.chunk" if chat else "text_completion",
                "created": int(time.time()), "model": model_name}
        worker: ModelWorker = state["worker"]
        if body.stream:
            watcher.cancel()  # the streaming response watches for disconnects itself
            return StreamingResponse(stream(job, worker, base, prompt_tokens, mode, chat, body),
                                     media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        try:
            pieces, routes = [], []
            while True:
                event = await job.events.get()
                if event[0] == "token":
                    pieces.append(event[1])
                    routes.append(event[2])
                elif event[0] == "end":
                    _, finish, tail, info = event
                    break
                else:
                    raise event[1]
        finally:
            watcher.cancel()
            worker.cancel(job)  # a no-op once it is done
        text = "".join(pieces) + tail
        choice: dict[str, Any] = {"index": 0}
        if chat:
            choice["message"] = {"role": "assistant", "content": text}
        else:
            choice.update(text=text, logprobs=None)
        choice.update(finish_reason=finish, routes=None if mode == OmegaMode.OFF else routes)
        return {**base, "object": "chat.completion" if chat else "text_completion", "choices": [choice],
                "usage": usage(prompt_tokens, info["completion_tokens"]), "omega": info["omega"]}

    def usage(prompt_tokens: int, completion_tokens: int) -> dict:
        return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens}

    async def stream(job: Job, worker: ModelWorker, base: dict, prompt_tokens: int, mode: str,
                     chat: bool, body: _Generation) -> AsyncIterator[str]:
        def chunk(text: Optional[str], route: Optional[str], finish: Optional[str] = None,
                  role: bool = False) -> dict:
            if chat:
                delta: dict[str, Any] = {"role": "assistant"} if role else {}
                if text is not None:
                    delta["content"] = text
                delta["route"] = route
                choice = {"index": 0, "delta": delta, "finish_reason": finish}
            else:
                choice = {"index": 0, "text": text or "", "route": route, "logprobs": None,
                          "finish_reason": finish}
            return {**base, "choices": [choice]}

        try:
            if chat:
                yield _sse(chunk("", None, role=True))
            while True:
                event = await job.events.get()
                if event[0] == "token":
                    yield _sse(chunk(event[1], event[2]))
                elif event[0] == "end":
                    _, finish, tail, info = event
                    last = chunk(tail or None, None, finish)
                    last["omega"] = info["omega"]
                    yield _sse(last)
                    if body.stream_options and body.stream_options.include_usage:
                        yield _sse({**base, "choices": [],
                                    "usage": usage(prompt_tokens, info["completion_tokens"])})
                    yield _sse("[DONE]")
                    return
                else:  # an error after the answer began (or shutdown): in the stream, as OpenAI does
                    yield _sse(event[1].body())
                    yield _sse("[DONE]")  # the stream ends as every stream ends, for clients that wait for it
                    return
        finally:
            worker.cancel(job)  # the client went away (or the stream ended: then a no-op)

    @app.post("/v1/chat/completions", dependencies=authorized)
    async def chat_completions(request: Request):
        body: ChatRequest = await _parse(request, ChatRequest)
        messages = [m.as_template_input(i) for i, m in enumerate(body.messages)]
        max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        job = Job(lambda llm: llm.chat_tokens(messages), "messages", settings_of(body, max_tokens),
                  body.omega, body.origin, asyncio.get_running_loop())
        return await complete(request, body, job, chat=True)

    @app.post("/v1/completions", dependencies=authorized)
    async def completions(request: Request):
        body: CompletionRequest = await _parse(request, CompletionRequest)
        prompt = body.prompt
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], str):
            if len(prompt) != 1:
                raise ApiError(400, "one prompt per request (zptr serve runs n = 1)", param="prompt")
            prompt = prompt[0]
        build = (lambda llm: llm.tokenize(prompt)) if isinstance(prompt, str) else (lambda llm: list(prompt))
        job = Job(build, "prompt", settings_of(body, body.max_tokens), body.omega, body.origin,
                  asyncio.get_running_loop())
        return await complete(request, body, job, chat=False)

    @app.get("/v1/models", dependencies=authorized)
    async def models():
        return {"object": "list", "data": [{
            "id": model_name, "object": "model", "created": created, "owned_by": "zptr",
            "meta": {"n_ctx": n_ctx, "omega": engine.mode_at_load, "omega_available": engine.has_omega,
                     "chat_template": engine.chat_template is not None}}]}

    @app.get("/health")
    async def health():
        worker: Optional[ModelWorker] = state.get("worker")
        return {"status": "ok", "model": model_name, "omega": engine.mode_at_load,
                "omega_available": engine.has_omega, "routes": list(CLUSTERS), "n_ctx": n_ctx,
                "busy": bool(worker and worker.busy), "queue_depth": worker.waiting if worker else 0,
                "slots": engine.n_parallel, "slots_busy": len(worker.running) if worker else 0,
                "queue_size": queue_size, "api_key": api_key is not None}

    @app.get("/metrics", dependencies=authorized)
    async def prometheus():
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/", response_class=HTMLResponse)
    async def chat_page():
        return HTMLResponse(page)

    return app


__all__ = ["ApiError", "ChatRequest", "CompletionRequest", "Guard", "HostCheck", "Job", "Metrics", "ModelWorker",
           "check_limits", "cors_origin", "create_app"]
