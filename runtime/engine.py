"""ZptrLlama: a GGUF on llama-cpp-python with Omega routing as a logits post-processor.

    from zptr.runtime.engine import ZptrLlama
    llm = ZptrLlama("model.q4_k_m.gguf", omega="fast", origin="I write terse haiku.")
    out = llm.generate("Tell me about the sea.", max_tokens=64)
    out.text, out.route_names, llm.stats.certified_share

Per token, llama.cpp returns h_t (embeddings, pooling NONE) and the logits of the same decode;
the NumPy recurrences run over every token, prompt included; the correction
sigma(omega) W' o_t uses W' = the GGUF's own output matrix, dequantised once.

Two token loops. Greedy decoding without penalties runs a lean loop on llama-cpp-python's
low-level API: decode, read the last logits in place, choose, decode — no copies of the
vocabulary, no sampler objects, and in ``fast`` mode no cluster product when the base margin
alone decides the token. Everything else (sampling, penalties, grammars) goes through
llama-cpp-python's own generator with Omega as a ``LogitsProcessor``. Both stop at any
end-of-generation token of the vocabulary and at the end of the context.

The Omega state lives per *position* (h_t and phi_t of each token in llama.cpp's context), not
per request: when a KV prefix of an earlier prompt is reused, the states of those positions are
the ones computed when they were decoded, and the new suffix continues from them. A request
therefore always sees the same phi/delta as a fresh run of the same tokens.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, NamedTuple, Optional, Sequence, Union

import llama_cpp
import numpy as np

from zptr.config import CLUSTERS
from zptr.errors import ConfigError, OmegaModeError, ZptrError
from zptr.formats.gguf import check_gguf_file, open_gguf, output_matrix
from zptr.formats.sidecar import Sidecar, check_pairing, read_sidecar, sidecar_path_for

from .llama import HiddenLlama, open_llama
from .omega import Corrector, CorrectionStats, OmegaRouter, recurrences
from .sampling import SamplingSettings

OMEGA_MODES = ("auto", "off", "exact", "fast")
FINISH_STOP, FINISH_LENGTH, FINISH_CONTEXT = "stop", "length", "context"


class Token(NamedTuple):
    id: int
    piece: str  # its text (empty while a multi-byte character is incomplete)
    route: Optional[int]  # cluster index, None with Omega off


@dataclass
class Generation:
    """One generated continuation: the same shape for the llama.cpp and the PyTorch path."""

    prompt_tokens: list[int]
    tokens: list[int] = field(default_factory=list)
    routes: list[int] = field(default_factory=list)  # cluster index per generated token
    pieces: list[str] = field(default_factory=list)  # text of each generated token
    prefill_s: float = 0.0  # prompt decode up to the first sampled token
    decode_s: float = 0.0  # every later token
    finish_reason: str = FINISH_LENGTH  # stop (end of generation token) | length | context

    @property
    def text(self) -> str:
        return "".join(self.pieces)

    @property
    def route_names(self) -> list[str]:
        return [CLUSTERS[r] for r in self.routes]

    @property
    def decode_tps(self) -> float:
        return (len(self.tokens) - 1) / self.decode_s if self.decode_s > 0 else 0.0

    def route_histogram(self) -> dict[str, int]:
        return {name: self.route_names.count(name) for name in CLUSTERS}


def collect(prompt_tokens: list[int], stream: Iterator[Token], finish=lambda: FINISH_LENGTH) -> Generation:
    """Drain a ``stream`` of tokens into a :class:`Generation`, timed: prefill is the time to the
    first token, decode the time of every later one. ``finish()`` gives the finish reason."""
    result = Generation(prompt_tokens=prompt_tokens)
    start = time.perf_counter()
    first = None
    for token, piece, route in stream:
        first = first or time.perf_counter()
        result.tokens.append(token)
        result.pieces.append(piece)
        if route is not None:
            result.routes.append(route)
    end = time.perf_counter()
    result.prefill_s = (first or end) - start
    result.decode_s = end - (first or end)
    result.finish_reason = finish()
    return result


class OmegaTrack:
    """h_t and phi_t of every position in the llama.cpp context (the Omega state per position).

    Storage grows with the positions decoded (doubling), up to the context size, so a large
    context costs memory only when it is used."""

    def __init__(self, n_ctx: int, hidden_size: int, decay: float):
        self.n_ctx, self.decay = n_ctx, decay
        self.hidden = np.zeros((0, hidden_size), np.float32)
        self.phase = np.zeros((0, hidden_size), np.float32)
        self.filled = 0  # positions [0, filled) hold states of the tokens now in the context

    def _reserve(self, end: int) -> None:
        if end > len(self.hidden):
            size = min(self.n_ctx, max(end, 2 * len(self.hidden), 64))
            for name in ("hidden", "phase"):
                grown = np.zeros((size, self.hidden.shape[1]), np.float32)
                grown[: self.filled] = getattr(self, name)[: self.filled]
                setattr(self, name, grown)

    def write(self, start: int, rows: np.ndarray) -> None:
        """States for positions start.. from h rows; the earlier positions are the prefix."""
        if start > self.filled:
            raise ZptrError(f"Omega state of position {start - 1} is missing (context restored "
                            "from a cache the runtime did not decode?)")
        previous = (self.phase[start - 1], self.hidden[start - 1]) if start else (None, None)
        phases, _ = recurrences(rows, previous[0], previous[1], self.decay)
        end = start + len(rows)
        self._reserve(end)
        self.hidden[start:end], self.phase[start:end] = rows, phases
        self.filled = end

    def snapshot(self, n_tokens: int) -> tuple[np.ndarray, np.ndarray]:
        return self.hidden[:n_tokens].copy(), self.phase[:n_tokens].copy()

    def restore(self, snapshot: Optional[tuple[np.ndarray, np.ndarray]], n_tokens: int) -> None:
        """Back to a saved context; a state saved without Omega leaves no position known."""
        if snapshot is None:
            self.filled = 0
            return
        hidden, phase = snapshot
        self.filled = 0
        self._reserve(len(hidden))
        self.hidden[: len(hidden)], self.phase[: len(phase)] = hidden, phase
        self.filled = min(n_tokens, len(hidden))

    def at(self, position: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(h, phi, delta) of one position."""
        if position >= self.filled:
            raise ZptrError(f"no Omega state for position {position} (decoded: {self.filled})")
        h = self.hidden[position]
        delta = h - self.hidden[position - 1] if position else np.zeros_like(h)
        return h, self.phase[position], delta


def _utf8(text: str) -> bytes:
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError as err:  # a command line's undecodable bytes arrive as surrogates
        raise ConfigError(f"the text is not valid UTF-8 (at character {err.start})") from None


def _add_bias(logits: np.ndarray, bias: dict[int, float]) -> np.ndarray:
    """``logits`` with the request's logit bias added (a copy when there is one)."""
    if not bias:
        return logits
    biased = np.array(logits, np.float32)
    ids = np.fromiter(bias, dtype=np.int64)
    biased[ids] += np.fromiter(bias.values(), dtype=np.float32)
    return biased


class OmegaLogitsProcessor:
    """A llama-cpp-python ``LogitsProcessor``: adds the request's logit bias, then
    sigma(omega) W' o_t to the logits.

    ``keep`` is the number of top tokens whose identity and values ``fast`` must certify (see
    :meth:`SamplingSettings.candidates`); ``None`` means exact. The bias is applied here, before
    Omega, because llama-cpp-python 0.3.36 drops every logits processor of a request that also
    carries ``logit_bias`` (it assigns ``list.extend``'s None); the certificate holds for the
    biased logits as for any others. Route tags land in ``routes``.
    """

    def __init__(self, engine: "ZptrLlama", keep: Optional[int], logit_bias: Optional[dict] = None):
        self.engine = engine
        self.mode = engine.mode if keep is not None else "exact"
        self.keep = keep or 1
        self.bias = dict(logit_bias or {})
        self.routes: list[int] = []

    def __call__(self, input_ids: np.ndarray, scores: np.ndarray) -> np.ndarray:
        logits = _add_bias(np.asarray(scores, np.float32), self.bias)
        engine = self.engine
        if not engine.omega_on:
            return logits
        routing = engine.route_position(len(input_ids) - 1)
        self.routes.append(int(routing.routes[0]))
        if self.mode == "fast":
            return engine.corrector.fast(logits, routing.outputs[0], self.keep)
        return engine.corrector.exact(logits, routing.outputs[0])


class ZptrLlama:
    """A GGUF (+ Omega sidecar) on llama-cpp-python; Omega ``off | exact | fast | auto``.

    ``auto`` is ``fast`` when a sidecar pairs with the model (``X.omega.gguf`` next to
    ``X.gguf``, or ``sidecar=``), else ``off``. llama.cpp options pass through (``n_ctx``,
    ``n_threads``, ``n_gpu_layers``, ...); ``f32_kv=True`` keeps the KV cache in f32 (parity).
    With Omega on, NumPy's BLAS is limited to ``blas_threads`` for the process (None: untouched).
    """

    def __init__(self, model_path: Union[str, Path], *, omega: str = "auto",
                 sidecar: Optional[Union[str, Path]] = None, origin: Optional[str] = None,
                 n_ctx: int = 2048, f32_kv: bool = False, max_candidates: int = 256,
                 blas_threads: Optional[int] = 1, **llama_kwargs: Any):
        if omega not in OMEGA_MODES:
            raise OmegaModeError(f"omega mode {omega!r} is not one of {', '.join(OMEGA_MODES)}")
        if isinstance(n_ctx, bool) or not isinstance(n_ctx, int) or n_ctx < 1:
            raise ConfigError(f"n_ctx (-c) must be a positive integer, got {n_ctx!r}")
        self.model_path = check_gguf_file(model_path)  # before its sidecar's name is derived from it
        self.sidecar: Optional[Sidecar] = self._find_sidecar(sidecar, omega)
        self.mode = ("fast" if self.sidecar else "off") if omega == "auto" else omega
        self.mode_at_load = self.mode
        on = self.mode != "off"
        if origin and not on:
            raise OmegaModeError("an origin text needs Omega on, but Omega is off "
                                 f"({'--omega off' if omega == 'off' else 'no sidecar found'})")
        if f32_kv:
            llama_kwargs.update(type_k=llama_cpp.GGML_TYPE_F32, type_v=llama_cpp.GGML_TYPE_F32)
        if on:
            llama_kwargs.update(embedding=True, pooling_type=llama_cpp.LLAMA_POOLING_TYPE_NONE)
        reader = open_gguf(self.model_path)
        self.llm: HiddenLlama = open_llama(self.model_path, HiddenLlama, checked=reader, n_ctx=n_ctx,
                                           **llama_kwargs)
        self.stats = CorrectionStats()
        self.origin_term: Optional[np.ndarray] = None
        self.last_routes: list[int] = []
        self.finish_reason = FINISH_LENGTH
        self._vocab = self.llm._model.vocab
        if on:
            if blas_threads:
                # NumPy's BLAS threads spinning next to llama.cpp's threads after every token's
                # product slow both down; one BLAS thread keeps the per-token work out of the way.
                from threadpoolctl import threadpool_limits

                self._blas_limits = threadpool_limits(blas_threads, user_api="blas")
            check_pairing(self.sidecar, self.model_path, self.llm.n_embd())
            self.router = OmegaRouter(self.sidecar.tensors, self.sidecar.config)
            self.corrector = Corrector(output_matrix(reader), self.router.gate, max_candidates)
            self.stats = self.corrector.stats
            self.track = OmegaTrack(self.llm.n_ctx(), self.llm.n_embd(), self.sidecar.config.phase_decay)
            self.llm.hidden_listener = self.track.write
            self.llm.state_hooks = (self.track.snapshot, self.track.restore)
            self.set_origin(origin)

    def _find_sidecar(self, sidecar: Optional[Union[str, Path]], omega: str) -> Optional[Sidecar]:
        if omega == "off":
            return None
        path = Path(sidecar) if sidecar else sidecar_path_for(self.model_path)
        if not path.exists():
            if omega == "auto" and sidecar is None:
                return None
            raise OmegaModeError(f"omega {omega}: no Omega sidecar at {path} (convert the "
                                 "checkpoint to get one, or run with --omega off)")
        return read_sidecar(path)

    # ---------------------------------------------------------------- setup
    @property
    def omega_on(self) -> bool:
        """Whether the current request corrects logits with Omega."""
        return self.mode != "off"

    @property
    def has_omega(self) -> bool:
        """Whether a sidecar is loaded (h_t of every position is tracked, any mode can run)."""
        return self.sidecar is not None and self.mode_at_load != "off"

    @contextlib.contextmanager
    def request(self, omega: Optional[str] = None, origin: Optional[str] = None) -> Iterator[None]:
        """One request's Omega mode (off | exact | fast; None: the engine's) and origin text
        (None: the engine's), restored afterwards."""
        if omega is not None and omega not in OMEGA_MODES[1:]:
            raise OmegaModeError(f"omega mode {omega!r} is not one of {', '.join(OMEGA_MODES[1:])}")
        if (omega not in (None, "off") or origin) and not self.has_omega:
            raise OmegaModeError("this model runs without Omega (no sidecar, or started with omega "
                                 "off): a request cannot turn it on")
        mode, origin_term = self.mode, self.origin_term
        try:
            self.mode = omega or self.mode
            if origin:
                self.origin_term = self.router.origin_term(self.origin_signature(origin))
            yield
        finally:
            self.mode, self.origin_term = mode, origin_term

    @property
    def n_ctx(self) -> int:
        # The context asked for: llama.cpp pads its own to a multiple of 256, but llama-cpp-python
        # sizes its token buffers by the request, so a prompt past it would overrun them.
        return min(self.llm.context_params.n_ctx, self.llm.n_ctx())

    @property
    def chat_template(self) -> Optional[str]:
        return self.llm.metadata.get("tokenizer.chat_template")

    def tokenize(self, text: str, special: bool = True) -> list[int]:
        """Token ids as llama.cpp makes them (BOS as the model's metadata asks)."""
        return self.llm.tokenize(_utf8(text), add_bos=True, special=special)

    def chat_tokens(self, messages: list[dict], add_generation_prompt: bool = True) -> list[int]:
        """The messages through the GGUF's own chat template (as llama-cli's conversation mode)."""
        from jinja2 import TemplateError
        from llama_cpp.llama_chat_format import Jinja2ChatFormatter

        template = self.chat_template
        if not template:
            raise ConfigError(f"{self.model_path.name} carries no chat template: use plain completion")
        piece = lambda token: self.llm.detokenize([token]).decode("utf-8", "replace")  # noqa: E731
        formatter = Jinja2ChatFormatter(template, eos_token=piece(self.llm.token_eos()),
                                        bos_token=piece(self.llm.token_bos()),
                                        add_generation_prompt=add_generation_prompt)
        try:
            prompt = formatter(messages=messages).prompt
        except (TemplateError, TypeError, ValueError) as err:
            raise ConfigError(f"the chat template cannot format these messages ({err})") from None
        # The template writes BOS itself where the model wants it: none is added twice.
        return self.llm.tokenize(_utf8(prompt), add_bos=False, special=True)

    def origin_signature(self, text: Optional[str]) -> Optional[np.ndarray]:
        """s: the mean of h_t over the origin text's tokens (None without a text)."""
        if not text:
            return None
        tokens = self.tokenize(text, special=False)
        self.check_prompt(tokens, generating=False)
        hidden, _ = self.llm.decode_all(tokens)
        self.track.filled = 0  # decode_all emptied the context
        return hidden.mean(0)

    def set_origin(self, text: Optional[str] = None, signature: Optional[np.ndarray] = None) -> None:
        """The origin of the following requests, as a text or a ready signature s."""
        if not self.omega_on:
            if text or signature is not None:
                raise OmegaModeError("an origin needs Omega on (a sidecar); got --omega off")
            return
        s = signature if signature is not None else self.origin_signature(text)
        self.origin_term = self.router.origin_term(s)

    def check_prompt(self, tokens: Sequence[int], generating: bool = True) -> None:
        """Refuse a prompt that is empty or does not fit the context (with room for one more
        token when it is to be continued)."""
        if not tokens:
            raise ConfigError("the prompt is empty")
        if len(tokens) + int(generating) > self.n_ctx:
            raise ConfigError(f"the prompt is {len(tokens)} tokens, the context holds {self.n_ctx} "
                              "(raise -c/--ctx-size or shorten the prompt)")
        self._check_in_vocab("token id", tokens)

    def check_settings(self, settings: SamplingSettings) -> None:
        """Refuse a logit bias of a token outside the vocabulary (NumPy would index past the
        logits, or wrap a negative id around to the vocabulary's end)."""
        self._check_in_vocab("logit_bias token id", settings.logit_bias)

    def _check_in_vocab(self, what: str, tokens: Iterable[int]) -> None:
        n_vocab = self.llm.n_vocab()
        bad = [token for token in tokens if not 0 <= token < n_vocab]
        if bad:
            raise ConfigError(f"{what} {bad[0]} is outside the vocabulary (0..{n_vocab - 1})")

    def is_end(self, token: int) -> bool:
        """Whether ``token`` ends generation (EOS, end-of-turn, ... as the vocabulary says)."""
        return bool(llama_cpp.llama_vocab_is_eog(self._vocab, token))

    def route_position(self, position: int):
        """The Omega routing of one decoded position."""
        h, phi, delta = self.track.at(position)
        return self.router.route(h, phi, delta, self.origin_term)

    def logits_processor(self, keep: Optional[int] = 1, logit_bias: Optional[dict] = None
                         ) -> OmegaLogitsProcessor:
        """A fresh processor for one request (route tags start empty)."""
        processor = OmegaLogitsProcessor(self, keep, logit_bias)
        self.last_routes = processor.routes
        return processor

    # ---------------------------------------------------------------- llama-cpp-python API
    def _with_processor(self, kwargs: dict[str, Any]) -> dict[str, Any]:
        settings = SamplingSettings(**{key: kwargs[key] for key in (
            "temperature", "top_k", "top_p", "min_p", "repeat_penalty", "presence_penalty",
            "frequency_penalty", "logit_bias") if kwargs.get(key) is not None})
        keep = settings.candidates()
        if kwargs.get("logit_bias") or kwargs.get("grammar") or kwargs.get("mirostat_mode"):
            keep = None  # they can raise any token after us: certify nothing, correct exactly
        processors = llama_cpp.LogitsProcessorList([self.logits_processor(keep, settings.logit_bias)])
        processors.extend(kwargs.get("logits_processor") or [])
        return {**kwargs, "logits_processor": processors, "logit_bias": None}

    def create_completion(self, prompt: Union[str, list[int]], **kwargs: Any):
        """``Llama.create_completion`` with Omega; route tags of the request in ``last_routes``."""
        return self.llm.create_completion(prompt, **self._with_processor(kwargs))

    def create_chat_completion(self, messages: list[dict], **kwargs: Any):
        return self.llm.create_chat_completion(messages, **self._with_processor(kwargs))

    def reset(self) -> None:
        """Forget the context: the next prompt is decoded from scratch. llama.cpp's logits of a
        prompt decoded in one batch differ (by up to ~1 logit on the bundled Q4 SmolLM2) from
        those of a reused prefix plus a suffix decoded apart, which can flip a greedy choice; a
        reset before each request makes its answer depend on that request alone."""
        self.llm.reset()
        if self.has_omega:
            self.track.filled = 0

    # ---------------------------------------------------------------- token loops
    def _reuse_prefix(self, tokens: list[int]) -> list[int]:
        """Keep the KV cache (and Omega states) of the longest prefix shared with the last
        context; the returned suffix (at least one token, for fresh logits) is left to decode."""
        llm = self.llm
        shared = 0
        for a, b in zip(llm.input_ids[: llm.n_tokens], tokens):
            if a != b:
                break
            shared += 1
        shared = min(shared, len(tokens) - 1)
        if self.has_omega:
            shared = min(shared, self.track.filled)
        if shared <= 0 or not llm._ctx.kv_cache_seq_rm(-1, shared, -1):
            llm.reset()
            return tokens
        llm.n_tokens = shared
        return tokens[shared:]

    def _last_logits(self) -> np.ndarray:
        """The logits of the last decoded token, read in place (valid until the next decode)."""
        pointer = llama_cpp.llama_get_logits_ith(self.llm._ctx.ctx, -1)
        return np.ctypeslib.as_array(pointer, shape=(self.llm.n_vocab(),))

    def _choose_greedy(self, position: int, logits: np.ndarray) -> tuple[int, Optional[int]]:
        if not self.omega_on:
            return int(np.argmax(logits)), None
        routing = self.route_position(position)
        route = int(routing.routes[0])
        if self.mode == "fast":
            token = self.corrector.greedy_before_output(logits, routing.output_bound(0, self.router.hidden_size))
            if token is not None:
                return token, route
            return int(np.argmax(self.corrector.fast(logits, routing.outputs[0], 1))), route
        return self.corrector.exact_choice(logits, routing.outputs[0]), route

    def _greedy_ids(self, tokens: list[int], settings: SamplingSettings, routes: list[int]) -> Iterator[int]:
        """The lean loop: decode, choose in place, decode."""
        llm = self.llm
        llm.eval(self._reuse_prefix(tokens))
        for count in range(settings.max_tokens):
            logits = _add_bias(self._last_logits(), settings.logit_bias)
            token, route = self._choose_greedy(llm.n_tokens - 1, logits)
            if self.is_end(token) and not settings.ignore_eos:
                self.finish_reason = FINISH_STOP
                return
            if route is not None:
                routes.append(route)
            yield token
            if count + 1 == settings.max_tokens:
                return
            if llm.n_tokens >= self.n_ctx:
                self.finish_reason = FINISH_CONTEXT
                return
            llm.eval([token])

    def _sampled_ids(self, tokens: list[int], settings: SamplingSettings,
                     processor: OmegaLogitsProcessor) -> Iterator[int]:
        """llama-cpp-python's generator with Omega (and the logit bias) as its logits processor."""
        llm = self.llm
        # No seed: llama.cpp draws a fresh one (LLAMA_DEFAULT_SEED), rather than reusing the last
        # request's seed that llama-cpp-python keeps (one request's seed would fix the next's draws).
        llm.set_seed(llama_cpp.LLAMA_DEFAULT_SEED if settings.seed is None else settings.seed)
        processors = llama_cpp.LogitsProcessorList([processor])
        generator = llm.generate(tokens, top_k=settings.top_k, top_p=settings.top_p,
                                 min_p=settings.min_p, temp=settings.temperature,
                                 repeat_penalty=settings.repeat_penalty,
                                 presence_penalty=settings.presence_penalty,
                                 frequency_penalty=settings.frequency_penalty,
                                 logits_processor=processors)
        for count, token in enumerate(generator):
            if self.is_end(token) and not settings.ignore_eos:
                self.finish_reason = FINISH_STOP
                return
            yield token
            if count + 1 == settings.max_tokens:
                return
            if llm.n_tokens >= self.n_ctx:
                self.finish_reason = FINISH_CONTEXT
                return

    def stream(self, prompt: Union[str, Sequence[int]], settings: Optional[SamplingSettings] = None,
               **sampling: Any) -> Iterator[Token]:
        """The generated tokens with their text and route, as they come. Stops at an
        end-of-generation token, after ``max_tokens``, or at the end of the context;
        :attr:`finish_reason` says which. ``sampling`` are :class:`SamplingSettings` fields."""
        settings = settings or SamplingSettings(**sampling)
        tokens = self.tokenize(prompt) if isinstance(prompt, str) else list(prompt)
        self.check_prompt(tokens)
        self.check_settings(settings)
        self.finish_reason = FINISH_LENGTH
        if settings.max_tokens == 0:
            return
        if settings.greedy and not settings.penalized:
            routes: list[int] = []
            self.last_routes = routes
            ids = self._greedy_ids(tokens, settings, routes)
        else:
            processor = self.logits_processor(settings.candidates(), settings.logit_bias)
            routes = processor.routes
            ids = self._sampled_ids(tokens, settings, processor)
        previous = list(tokens)
        for token in ids:
            piece = self.llm.detokenize([token], prev_tokens=previous).decode("utf-8", "replace")
            previous.append(token)
            yield Token(token, piece, routes[-1] if self.omega_on else None)

    def generate(self, prompt: Union[str, Sequence[int]], max_tokens: int = 128,
                 **sampling: Any) -> Generation:
        """Generate ``max_tokens`` (or up to the end) with timings split into prefill and decode."""
        tokens = self.tokenize(prompt) if isinstance(prompt, str) else list(prompt)
        return collect(tokens, self.stream(tokens, max_tokens=max_tokens, **sampling),
                       lambda: self.finish_reason)

    # ---------------------------------------------------------------- parity / scoring
    def teacher_forced(self, tokens: Sequence[int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(ZPTR logits (T, V), routes (T,), route margins (T,)) for every position of tokens.

        The exact correction at every position (the reference the fast mode is held to).
        """
        self.check_prompt(list(tokens), generating=False)
        hidden, logits = self.llm.decode_all(tokens)
        if not self.omega_on:
            return logits, np.full(len(tokens), CLUSTERS.index("BASE")), np.full(len(tokens), np.inf)
        self.track.filled = 0
        phases, deltas = recurrences(hidden, None, None, self.sidecar.config.phase_decay)
        routing = self.router.route(hidden, phases, deltas, self.origin_term)
        return self.corrector.exact_rows(logits, routing.outputs), routing.routes, routing.margins

    def close(self) -> None:
        self.llm.close()


__all__ = ["FINISH_CONTEXT", "FINISH_LENGTH", "FINISH_STOP", "Generation", "OMEGA_MODES",
           "OmegaLogitsProcessor", "OmegaTrack", "Token", "ZptrLlama", "collect"]
