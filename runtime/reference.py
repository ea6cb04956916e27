"""The PyTorch reference path: the ZPTR head over the HF model, same interface as ZptrLlama.

Ground truth for parity tests and the other side of benchmarks. It runs ``zptr.model.ZptrModel``
(the hook applies Omega and the soul before the untouched lm_head), carrying the KV cache and the
Omega state token by token, and samples with the same rules as llama.cpp's default chain
(top-k, top-p, min-p, temperature; greedy at temperature 0).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator, Optional, Sequence, Union

import numpy as np
import torch

from zptr.model import ZptrModel

from .engine import Generation, Token, collect
from .sampling import SamplingSettings


def sample_token(logits: np.ndarray, temperature: float, top_k: int, top_p: float,
                 min_p: float, rng: np.random.Generator) -> int:
    """One draw from ``logits`` under llama.cpp's default filters; argmax at temperature 0."""
    if temperature <= 0:
        return int(np.argmax(logits))
    order = np.argsort(-logits, kind="stable")
    if top_k > 0:
        order = order[:top_k]
    values = logits[order].astype(np.float64)
    probs = np.exp(values - values[0])
    probs /= probs.sum()
    keep = max(1, int(np.searchsorted(np.cumsum(probs), top_p) + 1)) if top_p < 1 else len(order)
    keep = min(keep, int((probs >= min_p * probs[0]).sum()) if min_p > 0 else keep)
    values = values[:keep] / temperature
    probs = np.exp(values - values.max())
    return int(order[rng.choice(keep, p=probs / probs.sum())])


class TorchReference:
    """``generate`` / ``stream`` / ``teacher_forced`` of a :class:`ZptrModel` with a tokenizer."""

    def __init__(self, model: ZptrModel, tokenizer, origin: Optional[str] = None):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.device = next(model.parameters()).device
        self.set_origin(origin)

    def tokenize(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=True)["input_ids"]

    @torch.no_grad()
    def origin_signature(self, ids: Sequence[int]) -> torch.Tensor:
        return self.model.origin_signature(torch.tensor([list(ids)], device=self.device))

    def set_origin(self, text: Optional[str] = None, ids: Optional[Sequence[int]] = None) -> None:
        """Origin of the following requests, from a text or ready token ids (None: s = 0)."""
        if ids is None and text:
            ids = self.tokenize(text)
        self.origin = self.origin_signature(ids) if ids else None

    @torch.no_grad()
    def teacher_forced(self, tokens: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
        """(ZPTR logits (T, V), routes (T,)) for every position, in float32."""
        out = self.model(torch.tensor([list(tokens)], device=self.device), origin=self.origin)
        return out.logits[0].float().cpu().numpy(), out.routes[0].cpu().numpy()

    @torch.no_grad()
    def stream(self, prompt: Union[str, Sequence[int]], settings: Optional[SamplingSettings] = None,
               **sampling: Any) -> Iterator[Token]:
        """The generated tokens with their text and route, KV cache and Omega state carried."""
        settings = settings or SamplingSettings(**sampling)
        tokens = self.tokenize(prompt) if isinstance(prompt, str) else list(prompt)
        rng = np.random.default_rng(settings.seed)
        eos = self.tokenizer.eos_token_id
        state, past = None, None
        step = torch.tensor([tokens], device=self.device)
        text_so_far = ""
        generated: list[int] = []
        for _ in range(settings.max_tokens):
            # Only the last position's logits are sampled: skip the prompt's vocabulary products.
            out = self.model(step, origin=self.origin, omega_state=state, past_key_values=past,
                             use_cache=True, logits_to_keep=1)
            state, past = out.omega_state, out.past_key_values
            token = sample_token(out.logits[0, -1].float().cpu().numpy(), settings.temperature,
                                 settings.top_k, settings.top_p, settings.min_p, rng)
            if token == eos and not settings.ignore_eos:
                return
            generated.append(token)
            text = self.tokenizer.decode(generated)
            piece, text_so_far = text[len(text_so_far):], text
            yield Token(token, piece, int(out.routes[0, -1]))
            step = torch.tensor([[token]], device=self.device)

    def generate(self, prompt: Union[str, Sequence[int]], max_tokens: int = 128,
                 **sampling: Any) -> Generation:
        tokens = self.tokenize(prompt) if isinstance(prompt, str) else list(prompt)
        return collect(tokens, self.stream(tokens, max_tokens=max_tokens, **sampling))


def unfolded_soul_logits(gguf_path: Path, tokens: Sequence[int], checkpoint_dir: Path) -> np.ndarray:
    """The unfolded alternative to the fold, for comparison: h_t from llama.cpp on a GGUF without
    the soul, then the soul and the GGUF's own (dequantised) output matrix applied in float64:
    W (h + sigmoid(alpha) R h)."""
    from zptr.checkpoint import load_checkpoint
    from zptr.formats.gguf import output_matrix
    from zptr.head import dense_rotation

    from .llama import teacher_logits

    hidden, _ = teacher_logits(gguf_path, tokens, hidden=True)
    ckpt = load_checkpoint(checkpoint_dir)
    rotation = dense_rotation(ckpt.rotation).double().numpy()
    h = hidden.astype(np.float64)
    return (h + ckpt.gate * h @ rotation.T) @ output_matrix(gguf_path).astype(np.float64).T
