"""Perplexity and KL divergence of a GGUF on a text, chunked as llama-perplexity chunks it.

The text is tokenized by the model's own llama.cpp vocabulary (BOS as its metadata asks, special
tokens not parsed) and cut into ``ctx``-token chunks; each chunk is decoded from an empty
context, its first token replaced by BOS when the model adds one, and only the second half is
scored (position i >= ctx/2 predicting token i + 1), so every scored token has at least ctx/2
tokens of context. Against a base (another GGUF, or a checkpoint on the PyTorch path) both sides
see the same tokens; the statistics are :func:`zptr.runtime.metrics.statistics`.

With ``omega="exact"`` both sides carry Omega: the GGUF's sidecar on llama.cpp (the exact
correction at every position) and the checkpoint's router on the PyTorch side.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Iterator, Optional, Protocol, Sequence, Union

import numpy as np
from tqdm import tqdm

from zptr.choices import EVAL_MODES
from zptr.dataset import check_chunking, llama_chunks, read_text
from zptr.errors import ZptrError

from .metrics import Scores, concatenate, score, statistics

PathLike = Union[str, Path]
DEFAULT_CTX = 512


class Scorer(Protocol):
    def logits_from(self, tokens: Sequence[int], first: int) -> np.ndarray: ...


class TorchScorer:
    """A checkpoint's ZPTR model in PyTorch (float32), Omega on or off, as a scorer."""

    def __init__(self, checkpoint: Path, omega: str, threads: int):
        import torch

        from zptr.model import load_zptr_model
        from zptr.models import load_tokenizer

        from .reference import TorchReference

        torch.set_num_threads(threads)
        model, ckpt = load_zptr_model(checkpoint)
        if omega == "off":
            model.head.omega = None  # the soul alone: what the folded GGUF computes
        elif model.head.omega is None:
            raise ZptrError(f"{checkpoint}: --omega exact, but the checkpoint has no Omega router")
        self.reference = TorchReference(model, load_tokenizer(ckpt.base_model))

    def logits_from(self, tokens: Sequence[int], first: int) -> np.ndarray:
        import torch

        with torch.inference_mode():
            return np.asarray(self.reference.teacher_forced(tokens)[0])[first:]


def _open_llama(path: Path, omega: str, ctx: int, threads: int):
    from .engine import ZptrLlama

    return ZptrLlama(path, omega=omega, n_ctx=ctx, n_batch=ctx, n_ubatch=ctx, n_threads=threads,
                     n_threads_batch=threads)


@contextlib.contextmanager
def open_base(reference: PathLike, omega: str, ctx: int, threads: int) -> Iterator[Scorer]:
    """The base model of ``--kl-base``: a GGUF on llama.cpp, or a checkpoint directory."""
    path = Path(reference)
    if path.is_file():
        llm = _open_llama(path, omega, ctx, threads)
        try:
            yield llm
        finally:
            llm.close()
        return
    from zptr.checkpoint import CONFIG_FILE, SEED_SOUL_FILE

    if not path.is_dir() or not any((path / f).exists() for f in (CONFIG_FILE, SEED_SOUL_FILE)):
        raise ZptrError(f"{path}: --kl-base must be a GGUF file or a checkpoint directory")
    yield TorchScorer(path, omega, threads)


def evaluation_chunks(llm, text: str, ctx: int, chunks: Optional[int], where: str) -> list[list[int]]:
    """llama-perplexity's chunks of ``text`` in ``llm``'s vocabulary (two chunks at least, as it
    asks)."""
    tokens = llm.tokenize(text, special=False)
    bos = llm.llm.token_bos() if _adds_bos(llm) else None
    return llama_chunks(tokens, ctx, chunks, bos, min_chunks=2, where=where)


def _adds_bos(llm) -> bool:
    import llama_cpp

    return bool(llama_cpp.llama_vocab_get_add_bos(llama_cpp.llama_model_get_vocab(llm.llm.model)))


def score_chunks(model: Scorer, chunks: Sequence[Sequence[int]], base: Optional[Scorer] = None,
                 progress: bool = True) -> Scores:
    """The scores of the second half of every chunk."""
    parts = []
    for chunk in tqdm(chunks, desc="eval", unit="chunk", disable=not progress):
        first = len(chunk) // 2
        logits = model.logits_from(chunk, first)[:-1]
        base_logits = None
        if base is not None:
            base_logits = base.logits_from(chunk, first)[:-1]
            if base_logits.shape != logits.shape:
                raise ZptrError(f"the base model's vocabulary has {base_logits.shape[-1]} tokens, "
                                f"the model's {logits.shape[-1]}: not the same tokenizer")
        parts.append(score(logits, chunk[first + 1:], base_logits))
    return concatenate(parts)


def evaluate(model: PathLike, text_file: PathLike, *, kl_base: Optional[PathLike] = None,
             ctx: int = DEFAULT_CTX, chunks: Optional[int] = None, omega: str = "off",
             threads: int = 1, progress: bool = True) -> dict:
    """``zptr eval``: llama-perplexity's statistics of ``model`` on ``text_file`` (against
    ``kl_base`` when given), with the chunk count and size."""
    if omega not in EVAL_MODES:
        raise ZptrError(f"--omega must be one of {', '.join(EVAL_MODES)}, got {omega!r}")
    check_chunking(ctx, chunks)
    text = read_text(text_file)
    llm = _open_llama(Path(model), omega, ctx, threads)
    try:
        windows = evaluation_chunks(llm, text, ctx, chunks, str(text_file))
        with contextlib.ExitStack() as stack:
            base = stack.enter_context(open_base(kl_base, omega, ctx, threads)) if kl_base else None
            scores = score_chunks(llm, windows, base, progress)
    finally:
        llm.close()
    return {"model": str(model), "kl_base": str(kl_base) if kl_base else None, "text": str(text_file),
            "omega": omega, "chunks": len(windows), "ctx": ctx, **statistics(scores)}


__all__ = ["DEFAULT_CTX", "TorchScorer", "evaluate", "evaluation_chunks",
           "open_base", "score_chunks"]
