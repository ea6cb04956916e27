"""A thin layer over llama-cpp-python: open a GGUF safely, and read h_t and logits of one decode.

Facts this module relies on (checked against llama-cpp-python 0.3.36 / its llama.cpp):

* With ``embeddings=True`` and pooling type NONE (``LLAMA_POOLING_TYPE_NONE``) the per-token
  embedding is the output of the model's final norm - the h_t of the head - and the logits of the
  same tokens come out of the same ``llama_decode``. llama.cpp then marks every token of a batch
  as an output ("embeddings required but some input tokens were not marked as outputs ->
  overriding"), so h_t exists for every prompt token, which the Omega recurrences need.
* On CPUs that advertise AMX, llama.cpp's AMX "extra buffer type" for quantized weights crashes
  (SIGSEGV in ``ggml_backend_amx_mul_mat``) on multi-token batches where the VM does not grant AMX
  tile state. :func:`open_llama` therefore loads models with ``use_extra_bufts = False`` unless
  ``ZPTR_LLAMA_EXTRA_BUFTS=1``; ``llama_cpp.Llama`` offers no argument for it, so the default
  model parameters are patched for the duration of the load only.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import threading
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence

import gguf
import llama_cpp
import numpy as np

from zptr.errors import ModelLoadError, ZptrError
from zptr.formats.gguf import check_model, open_gguf
from zptr.native_log import install as install_native_log

_PATCH_LOCK = threading.Lock()


def extra_buffers_enabled() -> bool:
    return os.environ.get("ZPTR_LLAMA_EXTRA_BUFTS", "0") == "1"


@contextlib.contextmanager
def _patched_defaults(getter: str, **overrides: Any) -> Iterator[None]:
    """Override fields of llama.cpp's ``getter()`` defaults (``llama_model_default_params``,
    ``llama_context_default_params``) while a Llama loads: ``llama_cpp.Llama`` offers no argument
    for them."""
    import llama_cpp.llama as llama_module

    lib = llama_module.llama_cpp
    original = getattr(lib, getter)

    def patched():
        params = original()
        for key, value in overrides.items():
            setattr(params, key, value)
        return params

    setattr(lib, getter, patched)
    try:
        yield
    finally:
        setattr(lib, getter, original)


@contextlib.contextmanager
def _sequences(n_seq_max: int) -> Iterator[None]:
    """Contexts made meanwhile hold ``n_seq_max`` sequences in one unified KV cache of ``n_ctx``
    cells (as llama-server's). llama-cpp-python sets both fields itself (with embeddings: up to
    256 sequences) just before it creates the context, so they are set at the creation call."""
    import llama_cpp._internals as internals

    lib = internals.llama_cpp
    original = lib.llama_init_from_model

    def create(model, params):
        params.n_seq_max, params.kv_unified = n_seq_max, True
        return original(model, params)

    lib.llama_init_from_model = create
    try:
        yield
    finally:
        lib.llama_init_from_model = original


def open_llama(model_path: Path, llama_class: Optional[type] = None,
               checked: Optional[gguf.GGUFReader] = None, n_seq_max: int = 1, **kwargs: Any):
    """A ``llama_cpp.Llama`` (or subclass) on ``model_path`` with the AMX workaround applied.

    The file is checked first (missing, a directory, not GGUF, truncated, hyper-parameters
    llama.cpp would abort on: each named), so llama.cpp's own load only fails on what only it
    can judge; ``checked`` is the caller's own
    :func:`open_gguf` reader of it, which spares a second parse of the metadata. The context
    holds ``n_seq_max`` sequences in one unified cache of ``n_ctx`` tokens.
    """
    model_path = Path(model_path)
    check_model(checked if checked is not None else open_gguf(model_path), model_path)
    install_native_log()
    cls = llama_class or llama_cpp.Llama
    kwargs.setdefault("verbose", False)
    overrides = {} if extra_buffers_enabled() else {"use_extra_bufts": False}
    try:
        with _PATCH_LOCK, _patched_defaults("llama_model_default_params", **overrides), \
                _sequences(n_seq_max):
            return cls(str(model_path), **kwargs)
    except ValueError as err:  # llama-cpp-python reports a failed load as ValueError
        raise ModelLoadError(f"{model_path}: llama.cpp could not load the model ({err})") from err


HiddenListener = Callable[[int, np.ndarray], None]


class HiddenLlama(llama_cpp.Llama):
    """``llama_cpp.Llama`` that hands h_t of every decoded token to a listener.

    Open it through :func:`open_llama` with ``embedding=True, pooling_type=POOLING_NONE``.
    ``eval`` is the stock one plus: after each ``llama_decode`` the batch's embeddings (one row
    per token, every token being an output in embeddings mode) go to ``hidden_listener(start,
    rows)`` where ``start`` is the position of the first row. Everything else - sampling, the
    prefix cache, streaming, chat formats - is llama-cpp-python's own.
    """

    hidden_listener: Optional[HiddenListener] = None
    # (save(n_tokens) -> snapshot, load(snapshot or None, n_tokens)): whoever keeps per-position
    # state next to the KV cache travels with llama-cpp-python's save_state / load_state, which
    # its LlamaCache uses to restore an earlier prompt's context.
    state_hooks: Optional[tuple[Callable[[int], Any], Callable[[Any, int], None]]] = None

    def save_state(self):
        state = super().save_state()
        if self.state_hooks is not None:
            state.zptr_positions = self.state_hooks[0](self.n_tokens)
        return state

    def load_state(self, state) -> None:
        super().load_state(state)
        if self.state_hooks is not None:
            self.state_hooks[1](getattr(state, "zptr_positions", None), self.n_tokens)

    def eval(self, tokens: Sequence[int]) -> None:
        self._ctx.kv_cache_seq_rm(-1, self.n_tokens, -1)
        # Embeddings mode needs every token as an output (llama.cpp would override anyway);
        # decode_all asks for every token's logits too.
        outputs_all = (self._logits_all or self._outputs_all
                       or bool(self.context_params.embeddings))
        for i in range(0, len(tokens), self.n_batch):
            batch = tokens[i : min(len(tokens), i + self.n_batch)]
            n_past, n_tokens = self.n_tokens, len(batch)
            self._batch.set_batch(batch=batch, n_past=n_past, logits_all=outputs_all)
            self._ctx.decode(self._batch)
            self.input_ids[n_past : n_past + n_tokens] = batch
            if self._logits_all:
                self.scores[n_past : n_past + n_tokens, :] = self.batch_logits(n_tokens)
            self._after_decode(n_past, n_tokens)
            self.n_tokens += n_tokens
            self._requires_eval = False

    _outputs_all = False

    def _after_decode(self, start: int, count: int) -> None:
        """Run after each ``llama_decode`` of ``count`` tokens from position ``start``."""
        if self.hidden_listener is not None:
            self.hidden_listener(start, self.batch_hidden(count))

    def batch_hidden(self, count: int) -> np.ndarray:
        """h of the ``count`` tokens of the last decode (embeddings mode), a copy."""
        pointer = llama_cpp.llama_get_embeddings(self._ctx.ctx)
        if not pointer:
            raise ModelLoadError("llama.cpp returned no embeddings: open the model with "
                                 "embedding=True and pooling_type=0 (NONE)")
        return np.ctypeslib.as_array(pointer, shape=(count, self.n_embd())).copy()

    def batch_logits(self, count: int) -> np.ndarray:
        """Logits of the ``count`` tokens of the last decode, all of them outputs, a copy."""
        pointer = llama_cpp.llama_get_logits(self._ctx.ctx)
        return np.ctypeslib.as_array(pointer, shape=(count, self._n_vocab)).copy()

    def decode_all(self, tokens: Sequence[int]) -> tuple[Optional[np.ndarray], np.ndarray]:
        """(h or None without embeddings, logits) of every token, decoded from an empty context.

        Used for teacher-forced parity, scoring and the origin signature; leaves the context
        empty.
        """
        with_hidden = bool(self.context_params.embeddings)
        hidden = np.empty((len(tokens), self.n_embd()), np.float32) if with_hidden else None
        logits = np.empty((len(tokens), self._n_vocab), np.float32)

        def collect(start: int, count: int) -> None:
            logits[start : start + count] = self.batch_logits(count)
            if hidden is not None:
                hidden[start : start + count] = self.batch_hidden(count)

        self.reset()
        self._after_decode, self._outputs_all = collect, True
        try:
            self.eval(list(tokens))
        finally:
            del self._after_decode, self._outputs_all
            self.reset()
        return hidden, logits


class Decoder:
    """Many sequences in one llama.cpp context: one ``llama_decode`` carries tokens of several
    ``seq_id`` s at their own positions (the unified KV cache keeps them apart).

    ``decode(tokens, positions, seqs, outputs, embeddings)``: ``outputs[i]`` asks for row i's
    logits; with ``embeddings`` on llama.cpp makes every row an output and h_t (the final norm's
    output) of each row readable by :meth:`hidden`. The switch is per decode
    (``llama_set_embeddings``), so rows that need no h_t pay no lm_head.
    """

    def __init__(self, llm: "HiddenLlama", capacity: int):
        self.llm, self.capacity = llm, capacity
        self.ctx = llm._ctx.ctx
        self.memory = llama_cpp.llama_get_memory(self.ctx)
        self.n_vocab, self.n_embd = llm.n_vocab(), llm.n_embd()
        self.with_hidden = bool(llm.context_params.embeddings)  # a context made for embeddings
        self._embeddings = self.with_hidden
        self._batch = llama_cpp.llama_batch_init(capacity, 0, 1)
        batch = self._batch
        self._token = np.ctypeslib.as_array(batch.token, shape=(capacity,))
        self._pos = np.ctypeslib.as_array(batch.pos, shape=(capacity,))
        self._n_seq = np.ctypeslib.as_array(batch.n_seq_id, shape=(capacity,))
        self._logits = np.ctypeslib.as_array(batch.logits, shape=(capacity,))
        self._seq = [batch.seq_id[i] for i in range(capacity)]
        self._n_seq[:] = 1

    def decode(self, tokens: Sequence[int], positions: Sequence[int], seqs: Sequence[int],
               outputs: Sequence[bool], embeddings: bool) -> None:
        count = len(tokens)
        if not 0 < count <= self.capacity:
            raise ZptrError(f"a decode of {count} tokens (the batch holds {self.capacity})")
        if embeddings and not self.with_hidden:
            raise ModelLoadError("h_t needs a context opened with embedding=True")
        if embeddings != self._embeddings:
            llama_cpp.llama_set_embeddings(self.ctx, embeddings)
            self._embeddings = embeddings
        self._token[:count] = tokens
        self._pos[:count] = positions
        self._logits[:count] = outputs
        for row, seq in zip(self._seq, seqs):
            row[0] = seq
        self._batch.n_tokens = count
        code = llama_cpp.llama_decode(self.ctx, self._batch)
        if code != 0:
            raise ZptrError(f"llama_decode failed with code {code} ({count} tokens; "
                            "1 means the KV cache is full)")

    def logits(self, row: int) -> np.ndarray:
        """Logits of batch row ``row`` of the last decode, a view into llama.cpp's buffer
        (writable: a sampler chain reads what is written there; valid until the next decode)."""
        pointer = llama_cpp.llama_get_logits_ith(self.ctx, row)
        return np.ctypeslib.as_array(pointer, shape=(self.n_vocab,))

    def output_logits(self, count: int) -> np.ndarray:
        """Logits of the ``count`` output rows of the last decode, in batch order (a view, valid
        until the next decode)."""
        pointer = llama_cpp.llama_get_logits(self.ctx)
        return np.ctypeslib.as_array(pointer, shape=(count, self.n_vocab))

    def hidden(self, first: int, count: int) -> np.ndarray:
        """h of batch rows first..first+count of the last decode (embeddings on), a copy."""
        pointer = llama_cpp.llama_get_embeddings(self.ctx)
        if not pointer:
            raise ModelLoadError("llama.cpp returned no embeddings")
        rows = np.ctypeslib.as_array(pointer, shape=(first + count, self.n_embd))
        return rows[first:].copy()

    def forget(self, seq: int, start: int = 0) -> None:
        """Drop sequence ``seq`` 's cache (-1: every sequence's) from position ``start`` on."""
        llama_cpp.llama_memory_seq_rm(self.memory, seq, start, -1)

    def restore_embeddings(self) -> None:
        """Embeddings as the context was opened with (llama-cpp-python's own loop expects it)."""
        if self._embeddings != self.with_hidden:
            llama_cpp.llama_set_embeddings(self.ctx, self.with_hidden)
            self._embeddings = self.with_hidden

    def close(self) -> None:
        if self._batch is not None:
            llama_cpp.llama_batch_free(self._batch)
            self._batch = None


def token_piece(vocab, token: int, special: bool = False) -> bytes:
    """The bytes of one token's text (control tokens empty unless ``special``)."""
    size = 64
    while True:
        buffer = (ctypes.c_char * size)()
        count = llama_cpp.llama_token_to_piece(vocab, token, buffer, size, 0, special)
        if count >= 0:
            return bytes(buffer[:count])
        size = -count  # the piece needs this many bytes


class Sampler:
    """One request's llama.cpp sampler chain, in llama-cpp-python's order: penalties over the last
    ``penalty_window`` tokens, then greedy, or top-k, top-p, min-p, temperature and a seeded draw.

    :meth:`sample` draws from the logits row of the last decode (after the caller has written
    the corrected logits there) and records the token for the penalties.
    """

    def __init__(self, n_vocab: int, *, temperature: float, top_k: int, top_p: float, min_p: float,
                 repeat_penalty: float, frequency_penalty: float, presence_penalty: float,
                 penalty_window: int, seed: Optional[int]):
        params = llama_cpp.llama_sampler_chain_default_params()
        self.chain = llama_cpp.llama_sampler_chain_init(params)
        parts = [llama_cpp.llama_sampler_init_penalties(n_vocab, penalty_window, repeat_penalty,
                                                        frequency_penalty, presence_penalty)]
        if temperature == 0:
            parts.append(llama_cpp.llama_sampler_init_greedy())
        else:
            # No seed: llama.cpp draws a fresh one for every chain (LLAMA_DEFAULT_SEED).
            draw = llama_cpp.LLAMA_DEFAULT_SEED if seed is None else _seed32(seed)
            parts += [llama_cpp.llama_sampler_init_top_k(top_k),
                      llama_cpp.llama_sampler_init_top_p(top_p, 1),
                      llama_cpp.llama_sampler_init_min_p(min_p, 1),
                      llama_cpp.llama_sampler_init_temp(temperature),
                      llama_cpp.llama_sampler_init_dist(draw)]
        for part in parts:
            llama_cpp.llama_sampler_chain_add(self.chain, part)

    def accept(self, token: int) -> None:
        llama_cpp.llama_sampler_accept(self.chain, token)

    def sample(self, decoder: Decoder, row: int) -> int:
        return int(llama_cpp.llama_sampler_sample(self.chain, decoder.ctx, row))

    def close(self) -> None:
        if self.chain is not None:
            llama_cpp.llama_sampler_free(self.chain)
            self.chain = None


def _seed32(seed: int) -> int:
    """llama.cpp's samplers take 32-bit seeds; a larger seed folds its higher words in (so seeds
    that differ only above bit 31 still draw differently), and the one value llama.cpp reads as
    "draw a random seed" moves to 0."""
    folded = 0
    while True:
        folded ^= seed & 0xFFFFFFFF
        seed >>= 32
        if not seed:
            break
    return 0 if folded == llama_cpp.LLAMA_DEFAULT_SEED else folded


def teacher_logits(model_path: Path, tokens: Sequence[int], f32_kv: bool = True, threads: int = 2,
                   hidden: bool = False) -> tuple[Optional[np.ndarray], np.ndarray]:
    """(h or None, logits) of every position of ``tokens`` decoded in one batch from an empty
    context, float64 logits; the f32 KV cache by default (parity against float32 references)."""
    n = len(tokens) + 8
    kwargs = dict(type_k=llama_cpp.GGML_TYPE_F32, type_v=llama_cpp.GGML_TYPE_F32) if f32_kv else {}
    if hidden:
        kwargs.update(embedding=True, pooling_type=llama_cpp.LLAMA_POOLING_TYPE_NONE)
    llm = open_llama(Path(model_path), HiddenLlama, logits_all=True, n_ctx=n, n_batch=n, n_ubatch=n,
                     n_threads=threads, **kwargs)
    try:
        states, logits = llm.decode_all(list(tokens))
    finally:
        llm.close()
    return states, logits.astype(np.float64)
