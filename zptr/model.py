"""ZptrModel: the ZPTR head attached to any supported Hugging Face causal LM.

The head attaches with a forward hook on the base model's final norm, so the base model's own
``forward``, ``generate``, PEFT wrapping, gradient checkpointing and Accelerate all keep working
unchanged. The hook turns the final normalised hidden state h_t into

    m_t = soul(f_t),  f_t = h_t + sigmoid(omega) o_t

and the untouched lm_head then computes W m_t = W' f_t: exactly the folded head of the GGUF.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterator, Optional

import torch
from torch import nn

from .config import ZptrConfig
from .errors import ConfigError
from .families import family_of
from .head import OmegaState, ZptrHead


def architecture_of(lm: nn.Module) -> str:
    """The registry family of a (possibly PEFT-wrapped) causal LM; unsupported ones refused."""
    return family_of(getattr(lm.config, "model_type", None)).name


def _unwrap(lm: nn.Module) -> nn.Module:
    """The plain transformers model under PEFT wrappers."""
    while hasattr(lm, "get_base_model") and lm.get_base_model() is not lm:
        lm = lm.get_base_model()
    return lm


def final_norm(lm: nn.Module) -> nn.Module:
    """The norm whose output is h_t (``model.model.norm`` in every registry family)."""
    decoder = _unwrap(lm).model
    if not hasattr(decoder, "norm"):
        raise ConfigError(f"{type(decoder).__name__} has no final norm")
    return decoder.norm


@dataclass
class ZptrOutput:
    logits: torch.Tensor
    routes: torch.Tensor  # (B, T) cluster indices
    omega_state: OmegaState
    loss: Optional[torch.Tensor] = None
    task_loss: Optional[torch.Tensor] = None
    orthogonality_loss: Optional[torch.Tensor] = None
    past_key_values: object = None


class ZptrModel(nn.Module):
    def __init__(self, lm: nn.Module, config: ZptrConfig):
        super().__init__()
        self.architecture = architecture_of(lm)
        hidden = _unwrap(lm).config.hidden_size
        if config.hidden_size != hidden:
            raise ConfigError(f"zptr hidden_size {config.hidden_size} != base model hidden size {hidden}")
        self.lm = lm
        self.config = config
        self.head = ZptrHead(config)
        device = next(lm.parameters()).device
        self.head.to(device)
        self._norm = final_norm(lm)
        self._hook = self._norm.register_forward_hook(self._apply_head)
        self._active = True
        self._state: Optional[OmegaState] = None
        self._origin: Optional[torch.Tensor] = None
        self.last_routes: list[torch.Tensor] = []

    @classmethod
    def from_base(cls, lm: nn.Module, **config_kwargs) -> "ZptrModel":
        return cls(lm, ZptrConfig(hidden_size=_unwrap(lm).config.hidden_size, **config_kwargs))

    # ---------------------------------------------------------------- the hook
    def _apply_head(self, module: nn.Module, inputs, hidden: torch.Tensor) -> torch.Tensor:
        if not self._active:
            return hidden
        if self._state is None:
            self._state = OmegaState.fresh(hidden.shape[0], hidden.shape[-1], self._origin,
                                           device=hidden.device, dtype=torch.float32)
        f, routes, self._state = self.head.omega_residual(hidden, self._state)
        self.last_routes.append(routes)
        return self.head.soul(f)

    @contextlib.contextmanager
    def head_disabled(self) -> Iterator[None]:
        """Run the plain base model (h_t, base logits) inside this context."""
        active, self._active = self._active, False
        try:
            yield
        finally:
            self._active = active

    def _begin(self, origin: Optional[torch.Tensor], state: Optional[OmegaState]) -> None:
        self._origin = origin
        self._state = state
        self.last_routes = []

    # ---------------------------------------------------------------- public API
    @property
    def hidden_size(self) -> int:
        return self.config.hidden_size

    def forward(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
                labels: Optional[torch.Tensor] = None, origin: Optional[torch.Tensor] = None,
                omega_state: Optional[OmegaState] = None, past_key_values=None,
                use_cache: bool = False, logits_to_keep: int = 0) -> ZptrOutput:
        """Logits, loss (task + weight * orthogonality) and routes for every position.

        ``omega_state`` continues a sequence (token-by-token use); None starts one with the
        origin signature ``origin`` ((B, D) or (D,), zero when None). ``logits_to_keep`` = N
        computes the vocabulary product for the last N positions only (0: all), as in HF; the
        Omega state and routes still cover every position.
        """
        self._begin(origin, omega_state)
        out = self.lm(input_ids=input_ids, attention_mask=attention_mask, labels=labels,
                      past_key_values=past_key_values, use_cache=use_cache,
                      logits_to_keep=logits_to_keep)
        routes = torch.cat(self.last_routes, 1)
        result = ZptrOutput(logits=out.logits, routes=routes, omega_state=self._state,
                            past_key_values=getattr(out, "past_key_values", None))
        if labels is not None:
            ortho = self.head.orthogonality_loss()
            result.task_loss = out.loss
            result.orthogonality_loss = ortho
            result.loss = out.loss + self.config.orthogonality_weight * ortho.to(out.loss.dtype)
        return result

    def hidden_states(self, input_ids: torch.Tensor,
                      attention_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """h_t: the base model's final normalised hidden states, (B, T, D)."""
        with self.head_disabled():
            decoder = _unwrap(self.lm).model
            return decoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state

    def origin_signature(self, input_ids: torch.Tensor,
                         attention_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """s: the mean of h over the origin text's tokens, (B, D)."""
        hidden = self.hidden_states(input_ids, attention_mask).float()
        if attention_mask is None:
            return hidden.mean(1)
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, origin: Optional[torch.Tensor] = None,
                 **generate_kwargs) -> torch.Tensor:
        """HF ``generate`` with the head on; routes of every position land in ``last_routes``."""
        self._begin(origin, None)
        return self.lm.generate(input_ids=input_ids, **generate_kwargs)

    def routes_of_last_call(self) -> torch.Tensor:
        return torch.cat(self.last_routes, 1)

    def set_alpha(self, alpha: float) -> None:
        self.head.soul.set_alpha(alpha)

    def folded_lm_head(self) -> torch.Tensor:
        """W' = W (I + sigmoid(alpha) R) in float32."""
        return self.head.soul.folded_lm_head(_unwrap(self.lm).get_output_embeddings().weight)

    def detach_head(self) -> None:
        """Remove the hook: the base model is left exactly as it was."""
        self._hook.remove()


def load_zptr_model(checkpoint, dtype: torch.dtype = torch.float32, load_in_4bit: bool = False,
                    device_map=None):
    """(ZptrModel, Checkpoint) of a checkpoint directory on its recorded base model: the LoRA
    merged (kept unmerged on a 4-bit base, which cannot absorb it), the head's tensors loaded.
    The PyTorch side of ``zptr bench`` and ``zptr eval --kl-base CHECKPOINT``."""
    from .checkpoint import load_checkpoint, load_head_tensors
    from .models import load_base_model

    ckpt = load_checkpoint(checkpoint)
    lm = load_base_model(ckpt.base_model, dtype=dtype, load_in_4bit=load_in_4bit, device_map=device_map)
    if ckpt.adapter_dir is not None:
        from peft import PeftModel

        lm = PeftModel.from_pretrained(lm, str(ckpt.adapter_dir))
        if not load_in_4bit:
            lm = lm.merge_and_unload()
    model = ZptrModel(lm, ckpt.config)
    load_head_tensors(model.head, ckpt.tensors)
    return (model if load_in_4bit else model.to(dtype)).eval(), ckpt
