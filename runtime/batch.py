"""Requests and the slot loop: many sequences decoded together in one llama.cpp context.

A :class:`Request` owns everything that lives as long as one generation: its prompt, sampling
settings, Omega mode and origin term, its Omega state (phi and the previous h), the tokens and
routes it produced, its text, finish reason and correction counts. The :class:`Batcher` holds
``n_slots`` sequences (llama.cpp ``seq_id`` s in one unified KV cache) and advances every active
request by one :meth:`Batcher.step`:

1. each decoding request contributes its last sampled token; the remaining room of the batch
   (``n_batch`` tokens) goes to prompt chunks of the requests still reading their prompt, in
   arrival order, so a new request starts reading at the next step beside the others' decoding;
2. rows that need no h_t decode with embeddings off — llama.cpp then computes the lm_head only for
   rows marked as outputs (a prompt's last token) — and rows that need h_t with embeddings on;
3. the router runs over every routed row of the step in one product (of a fixed shape); each request corrects,
   samples (its own chain: seed, penalties) and stops on its own (end of generation, max tokens,
   a stop string, the end of its context); a finished request frees its slot at once.

The tail bound. phi_T = sum_t (1 - beta) beta^(T - t) h_t forgets geometrically: a term older than
K = ceil(ln 2^-24 / ln beta) tokens weighs below float32 resolution of phi. delta needs only the
previous h. So only the last max(K, 2) prompt tokens of an Omega request need h_t; the head of a
long prompt decodes like Omega off. K comes from the sidecar's ``phase_decay`` (158 at 0.9).
"""

from __future__ import annotations

import codecs
import math
import time
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Iterator, NamedTuple, Optional, Sequence

import numpy as np

from zptr.choices import FinishReason, OmegaMode
from zptr.config import CLUSTERS
from zptr.errors import ZptrError

from .omega import CorrectionStats, recurrences
from .sampling import PENALTY_WINDOW, SamplingSettings, StopFilter

if TYPE_CHECKING:
    from .engine import ZptrLlama
    from .llama import Sampler

# float32 keeps 24 bits of mantissa: a phase term weighted below 2^-24 of the newest is lost.
FLOAT32_RESOLUTION = 2.0 ** -24


def tail_length(decay: float) -> Optional[int]:
    """How many of a prompt's last tokens Omega needs h_t of (None: every token)."""
    if decay >= 1.0:
        return None
    if decay <= 0.0:
        return 2
    return max(2, math.ceil(math.log(FLOAT32_RESOLUTION) / math.log(decay)))


class Token(NamedTuple):
    id: int
    piece: str  # the text this token completes (empty while a character or a stop string is open)
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
    finish_reason: FinishReason = FinishReason.LENGTH
    tail: str = ""  # text held back until the end (an unfinished character, a stop string's start)

    @property
    def text(self) -> str:
        return "".join(self.pieces) + self.tail

    @property
    def route_names(self) -> list[str]:
        return [CLUSTERS[r] for r in self.routes]

    @property
    def decode_tps(self) -> float:
        return (len(self.tokens) - 1) / self.decode_s if self.decode_s > 0 else 0.0

    def route_histogram(self) -> dict[str, int]:
        return {name: self.route_names.count(name) for name in CLUSTERS}


class TextStream:
    """Token bytes in, text out: characters as soon as their bytes are complete (a character
    split over several tokens comes out whole, with its last token), cut at the first stop string,
    text that could still become a stop string held back until it cannot."""

    def __init__(self, stops: Sequence[str]):
        self._bytes = codecs.getincrementaldecoder("utf-8")("replace")
        self._stops = StopFilter(stops)

    @property
    def stopped(self) -> bool:
        return self._stops.stopped

    def feed(self, data: bytes) -> str:
        return self._stops.feed(self._bytes.decode(data))

    def flush(self) -> str:
        """The rest at the end: nothing after a stop string."""
        if self._stops.stopped:
            return ""
        return self._stops.feed(self._bytes.decode(b"", final=True)) + self._stops.flush()


class Request:
    """One generation: made by :meth:`ZptrLlama.start`, advanced by a :class:`Batcher`."""

    def __init__(self, prompt: list[int], settings: SamplingSettings, mode: OmegaMode,
                 origin_term: Optional[np.ndarray], tail: Optional[int],
                 sampler: Optional["Sampler"]):
        self.prompt, self.settings, self.mode = prompt, settings, mode
        self.origin_term = origin_term
        self.sampler = sampler  # None: the lean greedy choice
        self.tail_start = 0 if (tail is None or mode == OmegaMode.OFF) else max(0, len(prompt) - tail)
        self.seq: Optional[int] = None
        self.n_past = 0  # positions of this request's sequence in the KV cache
        self.pending: Optional[int] = None  # sampled, not yet decoded
        self.tokens: list[int] = []
        self.routes: list[int] = []
        self.pieces: list[str] = []
        self.tail = ""
        self.finish_reason: Optional[str] = None
        self.stats = CorrectionStats()
        self.phase: Optional[np.ndarray] = None  # phi of the last decoded position
        self.last_hidden: Optional[np.ndarray] = None  # h of the last decoded position
        self.text = TextStream(settings.stop)
        self.hidden_rows = 0  # prompt and generated positions decoded with embeddings on
        self.outbox: deque[Token] = deque()  # produced, not yet taken by its consumer
        self.owner: object = None  # whoever waits for it (the server's job)
        self.created = time.perf_counter()
        self.first_at: Optional[float] = None
        self.last_at: Optional[float] = None

    @property
    def omega_on(self) -> bool:
        return self.mode != OmegaMode.OFF

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    @property
    def reading_prompt(self) -> bool:
        return self.n_past < len(self.prompt)

    def finish(self, reason: str) -> None:
        self.finish_reason = reason
        self.tail = self.text.flush()
        if self.sampler is not None:
            self.sampler.close()

    def result(self) -> Generation:
        """The generation so far, timed: prefill up to the first token, decode after it."""
        end = self.last_at or time.perf_counter()
        first = self.first_at or end
        return Generation(prompt_tokens=list(self.prompt), tokens=list(self.tokens),
                          routes=list(self.routes), pieces=list(self.pieces),
                          prefill_s=first - self.created, decode_s=end - first,
                          finish_reason=self.finish_reason or FinishReason.LENGTH, tail=self.tail)


@dataclass
class _Row:
    request: Request
    token: int
    position: int
    output: bool


class Batcher:
    """``n_slots`` sequences of one context, advanced together (see the module docstring).

    ``cache_prompt``: a slot keeps the KV cache of its last request, and a new request takes the
    free slot sharing the longest prefix with it and decodes only the rest (with Omega, at least
    its tail). Without it every request decodes its whole prompt.
    """

    def __init__(self, engine: "ZptrLlama", n_slots: int, n_batch: int, cache_prompt: bool):
        self.engine, self.n_batch, self.cache_prompt = engine, n_batch, cache_prompt
        self.decoder = engine.decoder
        self.slots: list[Optional[Request]] = [None] * n_slots
        self.cached: list[list[int]] = [[] for _ in range(n_slots)]  # tokens in each slot's KV
        self.order: list[Request] = []  # active requests by arrival
        self.last_batch = 0  # tokens of the last step (the server's metrics)

    @property
    def n_slots(self) -> int:
        return len(self.slots)

    @property
    def busy(self) -> int:
        return len(self.order)

    @property
    def has_room(self) -> bool:
        return self.busy < self.n_slots

    def invalidate(self) -> None:
        """Forget what the slots held (another user of the context emptied it)."""
        for cached in self.cached:
            cached.clear()

    # ---------------------------------------------------------------- slots
    def add(self, request: Request) -> None:
        """Give ``request`` a free slot; it reads its prompt from the next step on."""
        if request.seq is not None or request.done:
            raise ZptrError("this request has already been started")
        free = [seq for seq, holder in enumerate(self.slots) if holder is None]
        if not free:
            raise ZptrError(f"all {self.n_slots} slots are busy")
        shared = {seq: _common_prefix(self.cached[seq], request.prompt) for seq in free}
        seq = max(free, key=lambda s: shared[s]) if self.cache_prompt else free[0]
        reuse = min(shared[seq], len(request.prompt) - 1) if self.cache_prompt else 0
        if request.omega_on:
            # Positions from the tail on are decoded again, with embeddings, for phi and delta.
            reuse = min(reuse, request.tail_start)
        self.decoder.forget(seq, reuse)
        self.cached[seq] = self.cached[seq][:reuse]
        request.seq, request.n_past = seq, reuse
        self.slots[seq] = request
        self.order.append(request)
        if request.settings.max_tokens == 0:
            self._release(request, FinishReason.LENGTH)

    def cancel(self, request: Request) -> None:
        """Stop ``request`` now (its client left); its slot is free for the next step."""
        if not request.done:
            self._release(request, FinishReason.CANCELLED)

    def _release(self, request: Request, reason: str) -> None:
        request.finish(reason)
        if request.seq is not None and self.slots[request.seq] is request:
            self.slots[request.seq] = None
            self.order.remove(request)
            # Its cells stay until the slot is taken again (add drops what is not reused): llama.cpp
            # puts new tokens in the first free cells, so a hole freed now would take the other
            # requests' next tokens out of position order, and attention sums in cell order.

    # ---------------------------------------------------------------- one step
    def step(self) -> list[Request]:
        """Advance every active request by one decode; the requests that produced a token or
        finished (their new tokens are in their ``outbox``)."""
        plain, hidden = self._rows()
        self.last_batch = len(plain) + len(hidden)
        touched: list[Request] = []
        if plain:
            self._decode(plain, embeddings=False)
            for index, row in enumerate(plain):
                if row.output:
                    self._emit(row.request, self._choose(row.request, index, None), None, touched)
        if hidden:
            self._decode(hidden, embeddings=True)
            touched += self._after_hidden(hidden)
        return touched

    def _rows(self) -> tuple[list[_Row], list[_Row]]:
        """This step's rows, split by whether they need h_t: decode tokens first, then prompt
        chunks in arrival order while the batch has room."""
        plain: list[_Row] = []
        hidden: list[_Row] = []
        budget = self.n_batch
        for request in self.order:
            if request.pending is not None:
                row = _Row(request, request.pending, request.n_past, True)
                (hidden if request.omega_on else plain).append(row)
                budget -= 1
        for request in self.order:
            if budget <= 0:
                break
            if request.pending is not None or not request.reading_prompt:
                continue
            start = request.n_past
            end = min(len(request.prompt), start + budget)
            last = len(request.prompt) - 1
            for position in range(start, end):
                needs_h = request.omega_on and position >= request.tail_start
                row = _Row(request, request.prompt[position], position, position == last)
                (hidden if needs_h else plain).append(row)
            budget -= end - start
        return plain, hidden

    def _decode(self, rows: list[_Row], embeddings: bool) -> None:
        self.decoder.decode([r.token for r in rows], [r.position for r in rows],
                            [r.request.seq for r in rows], [r.output for r in rows], embeddings)
        for row in rows:
            request = row.request
            request.n_past = row.position + 1
            if request.pending is not None and row.output:
                request.pending = None
            self.cached[request.seq].append(row.token)

    def _after_hidden(self, rows: list[_Row]) -> list[Request]:
        """Omega state from the h rows of the decode just done, then one routing of every row that
        chooses a token, then each request's choice."""
        engine = self.engine
        hidden = self.decoder.hidden(0, len(rows))
        choosing: list[tuple[Request, int]] = []  # (request, batch row)
        states, deltas = [], []
        start = 0
        while start < len(rows):
            request = rows[start].request
            end = start
            while end < len(rows) and rows[end].request is request:
                end += 1
            phases, delta = recurrences(hidden[start:end], request.phase, request.last_hidden,
                                        engine.phase_decay)
            request.phase, request.last_hidden = phases[-1], hidden[end - 1]
            request.hidden_rows += end - start
            if rows[end - 1].output:
                choosing.append((request, end - 1))
                states.append(phases[-1])
                deltas.append(delta[-1])
            start = end
        if not choosing:
            return []
        # One routing product for every row, always n_slots rows tall (zeros past the ones in
        # use): BLAS sums a product of another shape in another order, and a route decided
        # within rounding of its threshold would then depend on how many requests ran together.
        index = [row for _, row in choosing]
        origins = [request.origin_term for request, _ in choosing]
        routing = engine.router.route(*(_rows_of(np.stack(part), self.n_slots) for part in (
            hidden[index], states, deltas, origins)))
        touched: list[Request] = []
        for k, (request, row) in enumerate(choosing):
            token = self._choose(request, row, (routing, k))
            self._emit(request, token, int(routing.routes[k]), touched)
        return touched

    def _choose(self, request: Request, row: int, routed) -> int:
        """The next token of ``request`` from batch row ``row`` 's logits (corrected with Omega
        when ``routed`` = (routing, its row) is given)."""
        engine, settings = self.engine, request.settings
        logits = self.decoder.logits(row)
        if settings.logit_bias:
            ids = np.fromiter(settings.logit_bias, dtype=np.int64)
            logits[ids] += np.fromiter(settings.logit_bias.values(), dtype=np.float32)
        if request.sampler is None:
            return engine.choose_greedy(logits, request.mode, routed, request.stats)
        if routed is not None:
            logits[:] = engine.correct(logits, request.mode, routed, settings.candidates(), request.stats)
        return request.sampler.sample(self.decoder, row)

    def _emit(self, request: Request, token: int, route: Optional[int], touched: list) -> None:
        engine, settings = self.engine, request.settings
        touched.append(request)
        now = time.perf_counter()
        if engine.is_end(token) and not settings.ignore_eos:
            request.last_at = request.last_at or now
            self._release(request, FinishReason.STOP)
            return
        request.first_at = request.first_at or now
        request.last_at = now
        piece = request.text.feed(engine.token_bytes(token))
        request.tokens.append(token)
        request.pieces.append(piece)
        if route is not None:
            request.routes.append(route)
        request.outbox.append(Token(token, piece, route))
        if request.text.stopped:
            self._release(request, FinishReason.STOP)
        elif len(request.tokens) >= settings.max_tokens:
            self._release(request, FinishReason.LENGTH)
        elif request.n_past >= engine.n_ctx:
            self._release(request, FinishReason.CONTEXT)
        else:
            request.pending = token

    # ---------------------------------------------------------------- helpers
    def drive(self, request: Request) -> Iterator[Token]:
        """``request`` 's tokens as they come, stepping the whole batch (other active requests
        advance too and keep their tokens in their own outbox)."""
        if request.seq is None and not request.done:
            self.add(request)
        try:
            while True:
                while request.outbox:
                    yield request.outbox.popleft()
                if request.done:
                    return
                self.step()
        finally:
            if not request.done:  # the consumer stopped early
                self.cancel(request)

    def mean_hidden(self, tokens: Sequence[int], seq: int) -> np.ndarray:
        """The mean of h_t over ``tokens`` decoded alone in sequence ``seq`` (left empty)."""
        rows = [self.decoder.hidden(0, count) for _, count in self._alone(tokens, seq, 0, True)]
        return np.concatenate(rows).mean(0)

    def logits_alone(self, tokens: Sequence[int], seq: int, first: int) -> np.ndarray:
        """The base logits of positions ``first``.. of ``tokens`` decoded alone in sequence ``seq``
        (left empty); the rows before ``first`` are no outputs, so they pay no head."""
        rows = []
        for start, count in self._alone(tokens, seq, first, False):
            outputs = start + count - max(start, first)
            if outputs > 0:
                rows.append(self.decoder.output_logits(outputs).copy())
        return np.concatenate(rows)

    def _alone(self, tokens: Sequence[int], seq: int, outputs_from: int,
               embeddings: bool) -> Iterator[tuple[int, int]]:
        """Decode ``tokens`` from position 0 in the emptied sequence ``seq``, ``n_batch`` at a
        time, positions from ``outputs_from`` on as outputs; (start, count) after each decode."""
        self.decoder.forget(seq)
        try:
            for start in range(0, len(tokens), self.n_batch):
                chunk = tokens[start : start + self.n_batch]
                positions = range(start, start + len(chunk))
                self.decoder.decode(chunk, positions, [seq] * len(chunk),
                                    [p >= outputs_from for p in positions], embeddings)
                yield start, len(chunk)
        finally:
            self.decoder.forget(seq)
            self.cached[seq] = []


def _rows_of(matrix: np.ndarray, count: int) -> np.ndarray:
    """``matrix`` with zero rows appended up to ``count`` rows."""
    if len(matrix) >= count:
        return matrix
    return np.concatenate([matrix, np.zeros((count - len(matrix), matrix.shape[1]), matrix.dtype)])


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    shared = 0
    for x, y in zip(a, b):
        if x != y:
            break
        shared += 1
    return shared


def prompt_history(prompt: Sequence[int]) -> Sequence[int]:
    """The prompt tokens a request's penalties look back on (llama-server feeds them too)."""
    return prompt[-PENALTY_WINDOW:]


__all__ = ["Batcher", "Generation", "Request", "TextStream", "Token", "tail_length"]
