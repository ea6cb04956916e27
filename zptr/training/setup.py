"""Assembling the model a run trains: base model (NF4 or full precision) + LoRA + the ZPTR head."""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from ..config import OmegaConfig, ZptrConfig
from ..errors import TrainError
from ..families import family_of
from ..head import unused_router_parameters
from ..model import ZptrModel
from .config import TrainConfig


def linear_module_names(model: nn.Module) -> list[str]:
    """Leaf names of the Linear layers LoRA can target (bitsandbytes' Linear4bit included)."""
    names = {name.rsplit(".", 1)[-1] for name, module in model.named_modules()
             if isinstance(module, nn.Linear)}
    names.discard("lm_head")
    return sorted(names)


def resolve_lora_targets(model: nn.Module, requested: Optional[list[str]] = None) -> list[str]:
    """The LoRA target module names (default: the family's); every one must exist in the model.

    A partial match is refused too: on Phi-3 the usual q/k/v/o list would train o_proj alone.
    """
    family = family_of(getattr(model.config, "model_type", None))
    architecture = family.name
    targets = list(requested) if requested else list(family.lora_targets)
    available = linear_module_names(model)
    missing = [t for t in targets if t not in available]
    if missing:
        raise TrainError(f"--lora-targets {','.join(missing)} match no linear module of this "
                         f"{architecture} model; available: {','.join(available)}")
    return targets


def build_model(cfg: TrainConfig, head_config: Optional[ZptrConfig] = None) -> ZptrModel:
    """Base model (4-bit or full precision) + LoRA + the ZPTR head, trainable parts unfrozen."""
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    from ..models import load_base_model

    device_map = None
    if cfg.load_in_4bit and torch.cuda.is_available():
        from accelerate import PartialState

        device_map = {"": PartialState().local_process_index}  # bnb weights live where they train
    lm = load_base_model(cfg.base_model, load_in_4bit=cfg.load_in_4bit, device_map=device_map)
    if cfg.load_in_4bit:
        lm = prepare_model_for_kbit_training(lm, use_gradient_checkpointing=False)
    if cfg.gradient_checkpointing:
        # Recompute each decoder layer in the backward pass; the frozen embedding's output must
        # require grad or the checkpointed layers would see no gradient path.
        lm.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        lm.enable_input_require_grads()
    targets = resolve_lora_targets(lm, cfg.lora_targets)
    lora = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                      target_modules=targets, task_type="CAUSAL_LM")
    peft_model = get_peft_model(lm, lora)
    if head_config is None:
        head_config = ZptrConfig(hidden_size=lm.config.hidden_size, rotation=cfg.rotation,
                                 schedule=cfg.schedule(), omega=OmegaConfig(routing=cfg.routing))
    model = ZptrModel(peft_model, head_config)
    if model.head.omega is not None:
        # Frozen, so DDP sees no trainable parameter that never gets a gradient.
        for param in unused_router_parameters(model.head.omega):
            param.requires_grad_(False)
    return model


def trainable_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """(name, parameter) of everything that trains, in a fixed order (the optimizer's order)."""
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


