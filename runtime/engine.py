"""ZptrLlama: a GGUF on llama-cpp-python with Omega routing as a logits post-processor.

    from zptr.runtime.engine import ZptrLlama
    llm = ZptrLlama("model.q4_k_m.gguf", omega="fast", origin="I write terse haiku.")
    out = llm.generate("Tell me about the sea.", max_tokens=64)
    out.text, out.route_names, llm.stats.certified_share

    request = llm.start("Tell me about the sea.", max_tokens=64, omega="exact", origin="a sailor")
    for token in llm.run(request): ...          # request.finish_reason, .routes, .stats after

The engine holds what lives as long as the model: the llama.cpp model and context, the router,
W' (the GGUF's own output matrix, dequantised once) and the corrector. A generation is a
:class:`~zptr.runtime.batch.Request` that owns its mode, origin term, Omega state, routes, finish
reason and correction counts; ``n_parallel`` of them decode together in the context's sequences
(:class:`~zptr.runtime.batch.Batcher`, the slot loop ``zptr serve`` drives). ``zptr run``, the
benchmarks and :meth:`generate` use the same loop with one request.

Per token llama.cpp returns h_t (embeddings, pooling NONE) and the logits of the same decode; the
recurrences run in NumPy over the last ``tail`` prompt tokens and every generated one (the head of
a long prompt decodes as with Omega off: see ``runtime/batch.py``), and the correction
sigma(omega) W' o_t is added to the logits. Greedy decoding without penalties chooses in place on
llama.cpp's logits (in ``fast`` mode no cluster product when the base margin alone decides);
sampling runs each request's own llama.cpp sampler chain on the corrected logits.

The llama-cpp-python path stays as well: :meth:`create_completion` / :meth:`create_chat_completion`
run llama-cpp-python's own loop with Omega as a ``LogitsProcessor``. There the Omega state lives
per *position* of llama-cpp-python's single sequence (:class:`OmegaTrack`), so its prefix cache
and ``LlamaCache`` restore the states of reused positions. The two paths share the context, one
at a time: switching empties it.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Iterable, Iterator, Optional, Sequence, Union

import llama_cpp
import numpy as np

from zptr.choices import REQUEST_MODES, FinishReason, OmegaMode
from zptr.config import CLUSTERS
from zptr.errors import ConfigError, OmegaModeError, ZptrError
from zptr.formats.gguf import check_gguf_file, open_gguf, output_matrix
from zptr.formats.sidecar import Sidecar, check_pairing, read_sidecar, sidecar_path_for

from .batch import Batcher, Generation, Request, Token, prompt_history, tail_length
from .llama import Decoder, HiddenLlama, Sampler, open_llama, token_piece
from .omega import Corrector, CorrectionStats, OmegaRouter, recurrences
from .sampling import PENALTY_WINDOW, SamplingSettings

DEFAULT_BATCH = 512


def collect(prompt_tokens: list[int], stream: Iterator[Token], finish=lambda: FinishReason.LENGTH) -> Generation:
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
        self.mode = engine.mode if keep is not None else OmegaMode.EXACT
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
        if self.mode == OmegaMode.FAST:
            return engine.corrector.fast(logits, routing.outputs[0], self.keep)
        return engine.corrector.exact(logits, routing.outputs[0])


class ZptrLlama:
    """A GGUF (+ Omega sidecar) on llama-cpp-python; Omega ``off | exact | fast | auto``.

    ``auto`` is ``fast`` when a sidecar pairs with the model (``X.omega.gguf`` next to
    ``X.gguf``, or ``sidecar=``), else ``off``. ``n_ctx`` is each request's context;
    ``n_parallel`` requests decode together (the KV cache holds ``n_ctx`` tokens for each),
    ``n_batch`` tokens at most per decode. ``cache_prompt`` lets a request reuse the KV cache of
    the prefix it shares with what its slot held. llama.cpp options pass through (``n_threads``,
    ``n_gpu_layers``, ...); ``f32_kv=True`` keeps the KV cache in f32 (parity). With Omega on,
    NumPy's BLAS is limited to ``blas_threads`` for the process (None: untouched).
    """

    def __init__(self, model_path: Union[str, Path], *, omega: str = "auto",
                 sidecar: Optional[Union[str, Path]] = None, origin: Optional[str] = None,
                 n_ctx: int = 2048, n_parallel: int = 1, n_batch: int = DEFAULT_BATCH,
                 cache_prompt: bool = True, f32_kv: bool = False, max_candidates: int = 256,
                 blas_threads: Optional[int] = 1, **llama_kwargs: Any):
        omega = OmegaMode.parse(omega, "omega mode", OmegaModeError)
        for name, value in (("n_ctx (-c)", n_ctx), ("n_parallel (-np)", n_parallel),
                            ("n_batch (-b)", n_batch)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        self.model_path = check_gguf_file(model_path)  # before its sidecar's name is derived from it
        self.sidecar: Optional[Sidecar] = self._find_sidecar(sidecar, omega)
        self.mode = (OmegaMode.FAST if self.sidecar else OmegaMode.OFF) if omega == OmegaMode.AUTO else omega
        self.mode_at_load = self.mode
        on = self.mode != OmegaMode.OFF
        if origin and not on:
            raise OmegaModeError("an origin text needs Omega on, but Omega is off "
                                 f"({'--omega off' if omega == OmegaMode.OFF else 'no sidecar found'})")
        # Flash attention (llama-server's default where it runs) skips the masked cells of the
        # other sequences instead of summing their zeros: a request's answer is then bit for bit
        # the same alone and among others. Without it the unified cache's interleaved cells change
        # the rounding, by up to ~1 logit on the bundled model (measured). The f32 parity mode
        # keeps llama.cpp's plain attention: the CPU flash kernel's online softmax lands up to
        # 0.1 logit from float32 attention on SmolLM2 (measured), the plain one within rounding.
        llama_kwargs.setdefault("flash_attn", not f32_kv)
        if f32_kv:
            llama_kwargs.update(type_k=llama_cpp.GGML_TYPE_F32, type_v=llama_cpp.GGML_TYPE_F32)
        if on:
            llama_kwargs.update(embedding=True, pooling_type=llama_cpp.LLAMA_POOLING_TYPE_NONE)
        reader = open_gguf(self.model_path)
        self._n_ctx = n_ctx
        # A physical batch of at most DEFAULT_BATCH keeps llama.cpp's compute buffer small for a
        # large -b; a caller that decodes whole chunks at once (eval) asks for its own.
        llama_kwargs.setdefault("n_ubatch", min(n_batch, DEFAULT_BATCH))
        self.llm: HiddenLlama = open_llama(self.model_path, HiddenLlama, checked=reader,
                                           n_ctx=n_ctx * n_parallel, n_batch=n_batch,
                                           n_seq_max=n_parallel, **llama_kwargs)
        self.stats = CorrectionStats()
        self.origin_term: Optional[np.ndarray] = None
        self.last_routes: list[int] = []  # the llama-cpp-python path's last request
        self._vocab = self.llm._model.vocab
        self._pieces: dict[int, bytes] = {}
        self.decoder = Decoder(self.llm, n_batch)  # one sequence per slot
        self.batcher = Batcher(self, n_parallel, n_batch, cache_prompt)
        self._user = "batch"  # who used the context last: "batch" or "llama" (llama-cpp-python)
        self.tail: Optional[int] = None
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
            self.phase_decay = self.sidecar.config.phase_decay
            self.tail = tail_length(self.phase_decay)
            self.track = OmegaTrack(self.llm.n_ctx(), self.llm.n_embd(), self.phase_decay)
            self.llm.hidden_listener = self.track.write
            self.llm.state_hooks = (self.track.snapshot, self.track.restore)
            self.set_origin(origin)

    def _find_sidecar(self, sidecar: Optional[Union[str, Path]], omega: OmegaMode) -> Optional[Sidecar]:
        if omega == OmegaMode.OFF:
            return None
        path = Path(sidecar) if sidecar else sidecar_path_for(self.model_path)
        if not path.exists():
            if omega == OmegaMode.AUTO and sidecar is None:
                return None
            raise OmegaModeError(f"omega {omega}: no Omega sidecar at {path} (convert the "
                                 "checkpoint to get one, or run with --omega off)")
        return read_sidecar(path)

    # ---------------------------------------------------------------- setup
    @property
    def omega_on(self) -> bool:
        """Whether requests correct logits with Omega unless they ask otherwise."""
        return self.mode != OmegaMode.OFF

    @property
    def has_omega(self) -> bool:
        """Whether a sidecar is loaded (h_t is available, any mode can run)."""
        return self.sidecar is not None and self.mode_at_load != OmegaMode.OFF

    def request_mode(self, omega: Optional[str] = None, origin: Optional[str] = None) -> OmegaMode:
        """The Omega mode a request runs in (None: the engine's), refused when it cannot run."""
        if omega is not None:
            omega = OmegaMode.parse(omega, "omega mode", OmegaModeError, REQUEST_MODES)
        if (omega not in (None, OmegaMode.OFF) or origin) and not self.has_omega:
            raise OmegaModeError("this model runs without Omega (no sidecar, or started with omega "
                                 "off): a request cannot turn it on")
        return omega or self.mode

    @property
    def n_ctx(self) -> int:
        """Each request's context (llama.cpp pads its own size; the request's is what was asked)."""
        return min(self._n_ctx, self.llm.n_ctx())

    @property
    def n_parallel(self) -> int:
        return self.batcher.n_slots

    @property
    def chat_template(self) -> Optional[str]:
        return self.llm.metadata.get("tokenizer.chat_template")

    def tokenize(self, text: str, special: bool = True) -> list[int]:
        """Token ids as llama.cpp makes them (BOS as the model's metadata asks)."""
        return self.llm.tokenize(_utf8(text), add_bos=True, special=special)

    def token_bytes(self, token: int) -> bytes:
        """The bytes of one token's text (a multi-byte character may span several tokens)."""
        piece = self._pieces.get(token)
        if piece is None:
            piece = self._pieces[token] = token_piece(self._vocab, token)
        return piece

    def chat_tokens(self, messages: list[dict], add_generation_prompt: bool = True) -> list[int]:
        """The messages through the GGUF's own chat template (as llama-cli's conversation mode)."""
        from jinja2 import TemplateError
        from llama_cpp.llama_chat_format import Jinja2ChatFormatter

        template = self.chat_template
        if not template:
            raise ConfigError(f"{self.model_path.name} carries no chat template: use plain completion")
        piece = lambda token: self.token_bytes(token).decode("utf-8", "replace")  # noqa: E731
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
        """s: the mean of h_t over the origin text's tokens (None without a text), decoded in a
        free slot beside whatever else runs."""
        if not text:
            return None
        if not self.has_omega:
            raise OmegaModeError("an origin needs Omega on (a sidecar)")
        tokens = self.tokenize(text, special=False)
        self.check_prompt(tokens, generating=False)
        return self.batcher.mean_hidden(tokens, self._free_slot("read an origin text"))

    def _free_slot(self, purpose: str) -> int:
        """A slot no request holds, the context handed to the batcher (``purpose`` names what it
        is for in the refusal when every slot is busy)."""
        self._use("batch")
        free = [seq for seq, holder in enumerate(self.batcher.slots) if holder is None]
        if not free:
            raise ZptrError(f"all {self.n_parallel} slots are busy: no room to {purpose}")
        return free[-1]

    def set_origin(self, text: Optional[str] = None, signature: Optional[np.ndarray] = None) -> None:
        """The default origin of the following requests, as a text or a ready signature s."""
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

    # ---------------------------------------------------------------- requests
    def start(self, prompt: Union[str, Sequence[int]], settings: Optional[SamplingSettings] = None, *,
              omega: Optional[str] = None, origin: Optional[str] = None,
              origin_signature: Optional[np.ndarray] = None, **sampling: Any) -> Request:
        """A new request, checked (prompt, settings, mode, origin) but not yet scheduled: give it
        to :meth:`run` (or ``batcher.add`` in a slot loop of your own). ``sampling`` are
        :class:`SamplingSettings` fields; ``omega`` / ``origin`` default to the engine's."""
        settings = settings or SamplingSettings(**sampling)
        tokens = self.tokenize(prompt) if isinstance(prompt, str) else list(prompt)
        self.check_prompt(tokens)
        self.check_settings(settings)
        mode = self.request_mode(omega, origin)
        origin_term = None
        if mode != OmegaMode.OFF:
            if origin_signature is None and origin:
                origin_signature = self.origin_signature(origin)
            origin_term = (self.router.origin_term(origin_signature) if origin_signature is not None
                           else self.origin_term if self.origin_term is not None
                           else self.router.origin_term(None))
        sampler = None
        if not settings.greedy or settings.penalized:
            sampler = Sampler(self.llm.n_vocab(), temperature=settings.temperature,
                              top_k=settings.top_k, top_p=settings.top_p, min_p=settings.min_p,
                              repeat_penalty=settings.repeat_penalty,
                              frequency_penalty=settings.frequency_penalty,
                              presence_penalty=settings.presence_penalty,
                              penalty_window=PENALTY_WINDOW, seed=settings.seed)
            for token in prompt_history(tokens):
                sampler.accept(token)
        return Request(tokens, settings, mode, origin_term, self.tail, sampler)

    def run(self, request: Request) -> Iterator[Token]:
        """``request`` 's tokens as they come (scheduled now if it is not yet)."""
        self._use("batch")
        return self.batcher.drive(request)

    def stream(self, prompt: Union[str, Sequence[int]], settings: Optional[SamplingSettings] = None,
               **options: Any) -> Iterator[Token]:
        """The generated tokens with their text and route, as they come (:meth:`start`'s
        arguments). The text held back at the end is the request's ``tail``: use :meth:`start`
        and :meth:`run` to read it and the finish reason."""
        return self.run(self.start(prompt, settings, **options))

    def generate(self, prompt: Union[str, Sequence[int]], max_tokens: int = 128,
                 **options: Any) -> Generation:
        """Generate ``max_tokens`` (or up to the end) with timings split into prefill and decode."""
        request = self.start(prompt, max_tokens=max_tokens, **options)
        for _ in self.run(request):
            pass
        return request.result()

    # ---------------------------------------------------------------- the math of one row
    def choose_greedy(self, logits: np.ndarray, mode: OmegaMode, routed, stats: CorrectionStats) -> int:
        """The greedy token of one row: argmax of the base logits with Omega off; with Omega the
        argmax of the corrected ones (``fast``: certified by the norm bound, often before o_t is
        computed). ``routed`` = (routing of the step, this row's index in it)."""
        if routed is None:
            return int(np.argmax(logits))
        routing, k = routed
        corrector = self.corrector
        if mode == OmegaMode.FAST:
            token = corrector.greedy_before_output(logits, routing.output_bound(k, self.router.hidden_size),
                                                   stats)
            if token is not None:
                return token
            return int(np.argmax(corrector.fast(logits, routing.output(k), 1, stats)))
        return corrector.exact_choice(logits, routing.output(k), stats)

    def correct(self, logits: np.ndarray, mode: OmegaMode, routed, keep: Optional[int],
                stats: CorrectionStats) -> np.ndarray:
        """One row's corrected logits for a sampler: exact, or ``fast`` (whose top ``keep``
        tokens and their values equal the exact mode's; None: unbounded, so exact)."""
        routing, k = routed
        if mode == OmegaMode.FAST and keep is not None:
            return self.corrector.fast(logits, routing.output(k), keep, stats)
        return self.corrector.exact(logits, routing.output(k), stats)

    # ---------------------------------------------------------------- the shared context
    def _use(self, user: str) -> None:
        """Hand the context to the batched loop or to llama-cpp-python's: emptied on a switch."""
        if user == self._user:
            return
        if user == "llama" and self.batcher.busy:
            raise ZptrError(f"{self.batcher.busy} requests are running in the batched loop")
        self.reset()
        self._user = user

    def reset(self) -> None:
        """Forget the context: the next prompt is decoded from scratch. llama.cpp's logits of a
        prompt decoded in one batch differ (by up to ~1 logit on the bundled Q4 SmolLM2) from
        those of a reused prefix plus a suffix decoded apart, which can flip a greedy choice; a
        reset before each request makes its answer depend on that request alone."""
        if self.batcher.busy:
            raise ZptrError(f"{self.batcher.busy} requests are running: cannot empty the context")
        self.llm.reset()
        self.decoder.forget(-1)
        self.decoder.restore_embeddings()
        self.batcher.invalidate()
        if self.has_omega:
            self.track.filled = 0

    # ---------------------------------------------------------------- llama-cpp-python API
    def route_position(self, position: int):
        """The Omega routing of one position of llama-cpp-python's sequence."""
        h, phi, delta = self.track.at(position)
        return self.router.route(h, phi, delta, self.origin_term)

    def logits_processor(self, keep: Optional[int] = 1, logit_bias: Optional[dict] = None
                         ) -> OmegaLogitsProcessor:
        """A fresh processor for one request (route tags start empty)."""
        self._use("llama")
        processor = OmegaLogitsProcessor(self, keep, logit_bias)
        self.last_routes = processor.routes
        return processor

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

    # ---------------------------------------------------------------- parity / scoring
    def teacher_forced(self, tokens: Sequence[int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(ZPTR logits (T, V), routes (T,), route margins (T,)) for every position of tokens,
        decoded in one batch from an empty context.

        The exact correction at every position (the reference the fast mode is held to).
        """
        self.check_prompt(list(tokens), generating=False)
        self._use("llama")
        hidden, logits = self.llm.decode_all(tokens)
        if not self.omega_on:
            return logits, np.full(len(tokens), CLUSTERS.index("BASE")), np.full(len(tokens), np.inf)
        self.track.filled = 0
        phases, deltas = recurrences(hidden, None, None, self.phase_decay)
        routing = self.router.route(hidden, phases, deltas, self.origin_term)
        return self.corrector.exact_rows(logits, routing.outputs), routing.routes, routing.margins

    def logits_from(self, tokens: Sequence[int], first: int = 0) -> np.ndarray:
        """ZPTR logits (T - first, V) of positions ``first``.. of ``tokens`` decoded from an empty
        context, what llama-perplexity scores: with Omega off only those rows are outputs (the
        head runs over them alone); with Omega on every row's h is read, as :meth:`teacher_forced`."""
        if self.omega_on:
            return self.teacher_forced(tokens)[0][first:]
        self.check_prompt(list(tokens), generating=False)
        return self.batcher.logits_alone(list(tokens), self._free_slot("score a text"), first)

    def close(self) -> None:
        self.decoder.close()
        self.llm.close()


__all__ = ["Generation", "OmegaLogitsProcessor", "OmegaTrack", "Request", "Token", "ZptrLlama", "collect"]
