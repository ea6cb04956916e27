"""ZptrLlama: a GGUF on llama-cpp-python with Omega routing as a logits post-processor.

    from zptr.runtime.engine import ZptrLlama
    llm = ZptrLlama("model.q4_k_m.gguf", omega="fast", origin="I write terse haiku.")
    out = llm.generate("Tell me about the sea.", max_tokens=64)
    out.text, out.route_names, llm.stats.certified_share

Per token, llama.cpp returns h_t (embeddings, pooling NONE) and the logits of the same decode;
the NumPy recurrences run over every token, prompt included; the correction
sigma(omega) W' o_t uses W' = the GGUF's own output matrix, dequantised once.

The Omega state lives per *position* (h_t and phi_t of each token in llama.cpp's context), not
per request: when llama-cpp-python reuses the KV prefix of an earlier prompt, the states of those
positions are the ones computed when they were decoded, and the new suffix continues from them.
A request therefore always sees the same phi/delta as a fresh run of the same tokens.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence, Union

import numpy as np
from llama_cpp import GGML_TYPE_F32, LLAMA_POOLING_TYPE_NONE

from zptr.config import CLUSTERS
from zptr.errors import OmegaModeError, ZptrError
from zptr.formats.gguf import output_matrix
from zptr.formats.sidecar import Sidecar, check_pairing, read_sidecar, sidecar_path_for

from .llama import HiddenLlama, open_llama
from .omega import Corrector, CorrectionStats, OmegaRouter, recurrences

OMEGA_MODES = ("auto", "off", "exact", "fast")
# llama-cpp-python's repeat penalty looks back this many tokens (Llama(last_n_tokens_size=64)).
PENALTY_WINDOW = 64


@dataclass
class Generation:
    """One generated continuation: the same shape for the llama.cpp and the PyTorch path."""

    prompt_tokens: list[int]
    tokens: list[int] = field(default_factory=list)
    routes: list[int] = field(default_factory=list)  # cluster index per generated token
    pieces: list[str] = field(default_factory=list)  # text of each generated token
    prefill_s: float = 0.0  # prompt decode up to the first sampled token
    decode_s: float = 0.0  # every later token

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


def collect(prompt_tokens: list[int], stream: Iterator[tuple[int, str, Optional[int]]]
            ) -> Generation:
    """Drain a ``stream`` of (token, piece, route) into a :class:`Generation`, timed: prefill
    is the time to the first token, decode the time of every later one."""
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
    return result


class OmegaTrack:
    """h_t and phi_t of every position in the llama.cpp context (the Omega state per position)."""

    def __init__(self, n_ctx: int, hidden_size: int, decay: float):
        self.hidden = np.zeros((n_ctx, hidden_size), np.float32)
        self.phase = np.zeros((n_ctx, hidden_size), np.float32)
        self.decay = decay
        self.filled = 0  # positions [0, filled) hold states of the tokens now in the context

    def write(self, start: int, rows: np.ndarray) -> None:
        """States for positions start.. from h rows; the earlier positions are the prefix."""
        if start > self.filled:
            raise ZptrError(f"Omega state of position {start - 1} is missing (context restored "
                            "from a cache the runtime did not decode?)")
        previous = (self.phase[start - 1], self.hidden[start - 1]) if start else (None, None)
        phases, _ = recurrences(rows, previous[0], previous[1], self.decay)
        end = start + len(rows)
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
        self.hidden[: len(hidden)], self.phase[: len(phase)] = hidden, phase
        self.filled = min(n_tokens, len(hidden))

    def at(self, position: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(h, phi, delta) of one position."""
        if position >= self.filled:
            raise ZptrError(f"no Omega state for position {position} (decoded: {self.filled})")
        h = self.hidden[position]
        delta = h - self.hidden[position - 1] if position else np.zeros_like(h)
        return h, self.phase[position], delta


class OmegaLogitsProcessor:
    """A llama-cpp-python ``LogitsProcessor``: adds sigma(omega) W' o_t to the logits.

    ``keep`` is the number of top tokens whose identity and values ``fast`` must certify: 1 for
    greedy, the sampler's top-k when sampling (plus the penalty window when penalties can lower
    logits after this processor). ``None`` means exact. Route tags land in ``routes``.
    """

    def __init__(self, engine: "ZptrLlama", mode: str, keep: Optional[int]):
        self.engine = engine
        self.mode = mode if keep is not None else "exact"
        self.keep = keep or 1
        self.routes: list[int] = []

    def __call__(self, input_ids: np.ndarray, scores: np.ndarray) -> np.ndarray:
        engine = self.engine
        h, phi, delta = engine.track.at(len(input_ids) - 1)
        routing = engine.router.route(h, phi, delta, engine.origin_term)
        self.routes.append(int(routing.routes[0]))
        logits = np.asarray(scores, np.float32)
        if self.mode == "fast":
            return engine.corrector.fast(logits, routing.outputs[0], self.keep)
        return engine.corrector.exact(logits, routing.outputs[0])


def sampling_keep(temperature: float, top_k: int, penalized: bool, mirostat: int = 0
                  ) -> Optional[int]:
    """How many top tokens the sampler can draw from; None when unbounded (fast -> exact).

    Penalties run after the processor and only lower logits, of at most PENALTY_WINDOW tokens:
    the top ``k`` after them lies within the top ``k + PENALTY_WINDOW`` before them.
    """
    if mirostat:
        return None
    if temperature <= 0:
        keep = 1
    elif top_k > 0:
        keep = top_k
    else:
        return None
    return keep + PENALTY_WINDOW if penalized else keep


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
        self.model_path = Path(model_path)
        self.sidecar: Optional[Sidecar] = self._find_sidecar(sidecar, omega)
        self.mode = ("fast" if self.sidecar else "off") if omega == "auto" else omega
        on = self.mode != "off"
        if origin and not on:
            raise OmegaModeError("an origin text needs Omega on, but Omega is off "
                                 f"({'--omega off' if omega == 'off' else 'no sidecar found'})")
        if f32_kv:
            llama_kwargs.update(type_k=GGML_TYPE_F32, type_v=GGML_TYPE_F32)
        if on:
            llama_kwargs.update(embedding=True, pooling_type=LLAMA_POOLING_TYPE_NONE)
        self.llm: HiddenLlama = open_llama(self.model_path, HiddenLlama, n_ctx=n_ctx,
                                           **llama_kwargs)
        self.stats = CorrectionStats()
        self.origin_term: Optional[np.ndarray] = None
        self.last_routes: list[int] = []
        if on:
            if blas_threads:
                # NumPy's BLAS threads spinning next to llama.cpp's threads after every token's
                # product slow both down; one BLAS thread keeps the per-token work out of the way.
                from threadpoolctl import threadpool_limits

                self._blas_limits = threadpool_limits(blas_threads, user_api="blas")
            check_pairing(self.sidecar, self.model_path, self.llm.n_embd())
            self.router = OmegaRouter(self.sidecar.tensors, self.sidecar.config)
            self.corrector = Corrector(output_matrix(self.model_path), self.router.gate,
                                       max_candidates)
            self.stats = self.corrector.stats
            self.track = OmegaTrack(self.llm.n_ctx(), self.llm.n_embd(),
                                    self.sidecar.config.phase_decay)
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
        return self.mode != "off"

    def tokenize(self, text: str, special: bool = True) -> list[int]:
        """Token ids as llama.cpp makes them (BOS as the model's metadata asks)."""
        return self.llm.tokenize(text.encode("utf-8"), add_bos=True, special=special)

    def origin_signature(self, text: Optional[str]) -> Optional[np.ndarray]:
        """s: the mean of h_t over the origin text's tokens (None without a text)."""
        if not text:
            return None
        hidden, _ = self.llm.decode_all(self.tokenize(text, special=False))
        self.track.filled = 0  # decode_all emptied the context
        return hidden.mean(0)

    def set_origin(self, text: Optional[str] = None, signature: Optional[np.ndarray] = None
                   ) -> None:
        """The origin of the following requests, as a text or a ready signature s."""
        if not self.omega_on:
            if text or signature is not None:
                raise OmegaModeError("an origin needs Omega on (a sidecar); got --omega off")
            return
        s = signature if signature is not None else self.origin_signature(text)
        self.origin_term = self.router.origin_term(s)

    def logits_processor(self, keep: Optional[int] = 1) -> OmegaLogitsProcessor:
        """A fresh processor for one request (route tags start empty)."""
        if not self.omega_on:
            raise OmegaModeError("Omega is off: there is no Omega logits processor")
        processor = OmegaLogitsProcessor(self, self.mode, keep)
        self.last_routes = processor.routes
        return processor

    # ---------------------------------------------------------------- llama-cpp-python API
    def _with_processor(self, kwargs: dict[str, Any]) -> dict[str, Any]:
        if not self.omega_on:
            return kwargs
        from llama_cpp import LogitsProcessorList

        penalized = (kwargs.get("repeat_penalty", 1.0) != 1.0
                     or kwargs.get("frequency_penalty", 0.0) != 0.0
                     or kwargs.get("presence_penalty", 0.0) != 0.0)
        keep = sampling_keep(kwargs.get("temperature", 0.8), kwargs.get("top_k", 40), penalized,
                             kwargs.get("mirostat_mode", 0))
        if kwargs.get("logit_bias") or kwargs.get("grammar"):
            keep = None  # they can raise any token after us: certify nothing, correct exactly
        processors = LogitsProcessorList([self.logits_processor(keep)])
        processors.extend(kwargs.get("logits_processor") or [])
        return {**kwargs, "logits_processor": processors}

    def create_completion(self, prompt: Union[str, list[int]], **kwargs: Any):
        """``Llama.create_completion`` with Omega; route tags of the request in ``last_routes``."""
        return self.llm.create_completion(prompt, **self._with_processor(kwargs))

    def create_chat_completion(self, messages: list[dict], **kwargs: Any):
        return self.llm.create_chat_completion(messages, **self._with_processor(kwargs))

    # ---------------------------------------------------------------- token loop
    def stream(self, prompt: Union[str, Sequence[int]], max_tokens: int = 128,
               temperature: float = 0.0, top_k: int = 40, top_p: float = 0.95,
               min_p: float = 0.05, repeat_penalty: float = 1.0, seed: Optional[int] = None,
               stop_at_eos: bool = True) -> Iterator[tuple[int, str, Optional[int]]]:
        """(token, text piece, route or None) per generated token."""
        tokens = self.tokenize(prompt) if isinstance(prompt, str) else list(prompt)
        if seed is not None:
            self.llm.set_seed(seed)
        processors = None
        if self.omega_on:
            from llama_cpp import LogitsProcessorList

            keep = sampling_keep(temperature, top_k, repeat_penalty != 1.0)
            processors = LogitsProcessorList([self.logits_processor(keep)])
        eos = self.llm.token_eos()
        previous: list[int] = list(tokens)
        generator = self.llm.generate(tokens, top_k=top_k, top_p=top_p, min_p=min_p,
                                      temp=temperature, repeat_penalty=repeat_penalty,
                                      logits_processor=processors)
        for count, token in enumerate(generator):
            if stop_at_eos and token == eos:
                break
            piece = self.llm.detokenize([token], prev_tokens=previous).decode("utf-8", "replace")
            previous.append(token)
            route = self.last_routes[-1] if self.omega_on else None
            yield token, piece, route
            if count + 1 >= max_tokens:
                break

    def generate(self, prompt: Union[str, Sequence[int]], max_tokens: int = 128,
                 **sampling: Any) -> Generation:
        """Generate ``max_tokens`` (or up to EOS) with timings split into prefill and decode."""
        tokens = self.tokenize(prompt) if isinstance(prompt, str) else list(prompt)
        return collect(tokens, self.stream(tokens, max_tokens, **sampling))

    # ---------------------------------------------------------------- parity / scoring
    def teacher_forced(self, tokens: Sequence[int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(ZPTR logits (T, V), routes (T,), route margins (T,)) for every position of tokens.

        The exact correction at every position (the reference the fast mode is held to).
        """
        hidden, logits = self.llm.decode_all(tokens)
        if not self.omega_on:
            return logits, np.full(len(tokens), CLUSTERS.index("BASE")), np.full(len(tokens), np.inf)
        self.track.filled = 0
        phases, deltas = recurrences(hidden, None, None, self.sidecar.config.phase_decay)
        routing = self.router.route(hidden, phases, deltas, self.origin_term)
        return self.corrector.exact_rows(logits, routing.outputs), routing.routes, routing.margins

    def close(self) -> None:
        self.llm.close()


__all__ = ["Generation", "collect", "OMEGA_MODES", "OmegaLogitsProcessor", "OmegaModeError", "OmegaTrack",
           "ZptrLlama", "sampling_keep"]
