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
import os
import threading
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence

import gguf
import llama_cpp
import numpy as np

from zptr.errors import ModelLoadError
from zptr.formats.gguf import open_gguf
from zptr.native_log import install as install_native_log

_PATCH_LOCK = threading.Lock()


def extra_buffers_enabled() -> bool:
    return os.environ.get("ZPTR_LLAMA_EXTRA_BUFTS", "0") == "1"


@contextlib.contextmanager
def _model_defaults(**overrides: Any) -> Iterator[None]:
    """Override fields of ``llama_model_default_params()`` while a Llama loads."""
    import llama_cpp.llama as llama_module

    lib = llama_module.llama_cpp
    original = lib.llama_model_default_params

    def patched():
        params = original()
        for key, value in overrides.items():
            setattr(params, key, value)
        return params

    with _PATCH_LOCK:
        lib.llama_model_default_params = patched
        try:
            yield
        finally:
            lib.llama_model_default_params = original


def open_llama(model_path: Path, llama_class: Optional[type] = None,
               checked: Optional[gguf.GGUFReader] = None, **kwargs: Any):
    """A ``llama_cpp.Llama`` (or subclass) on ``model_path`` with the AMX workaround applied.

    The file is checked first (missing, a directory, not GGUF, truncated: each named), so
    llama.cpp's own load only fails on what only it can judge; ``checked`` is the caller's own
    :func:`open_gguf` reader of it, which spares a second parse of the metadata.
    """
    model_path = Path(model_path)
    if checked is None:
        open_gguf(model_path)
    install_native_log()
    cls = llama_class or llama_cpp.Llama
    kwargs.setdefault("verbose", False)
    overrides = {} if extra_buffers_enabled() else {"use_extra_bufts": False}
    try:
        with _model_defaults(**overrides):
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
