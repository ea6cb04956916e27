"""``zptr train --dry-run``: the estimated peak memory of a training run, before running it.

Parameters are counted exactly on a meta-device copy of the model (no weights are read); the
activation term is a per-token, per-layer count of the tensors autograd keeps for the backward
pass of a LoRA run (frozen linears keep none; norms, rotary, attention, MLP and the LoRA branches
do), plus the logits and the cross-entropy at the end. It is an estimate: the benchmark
``benchmarks/bench_train.py`` prints it next to the measured peak RSS.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from .config import OmegaConfig, ZptrConfig
from .head import ZptrHead, unused_router_parameters

MIB = 2 ** 20
# What the Python process holds before any model: interpreter, torch, transformers, peft,
# accelerate, tokenizer (measured here at ~390 MiB after the imports alone).
RUNTIME_OVERHEAD = 450 * MIB
NF4_BLOCK, NF4_SUPER_BLOCK = 64, 256  # bitsandbytes blocksize, double-quant block of absmaxes
ADAM_SLOTS = 2  # exp_avg, exp_avg_sq


@dataclass
class MemoryEstimate:
    parts: dict[str, int] = field(default_factory=dict)  # label -> bytes
    details: dict[str, object] = field(default_factory=dict)

    @property
    def total(self) -> int:
        return sum(self.parts.values())


def _meta_model(cfg):
    from transformers import AutoConfig, AutoModelForCausalLM

    from .models import resolve_model_path

    directory, gguf_file = resolve_model_path(cfg.base_model or "bundled")
    kwargs = {"gguf_file": gguf_file} if gguf_file else {}
    config = AutoConfig.from_pretrained(str(directory), **kwargs)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return model, config


def _nf4_bytes(numel: int) -> int:
    """4-bit codes plus the double-quantised absmax (8-bit per block, fp32 per super-block)."""
    blocks = -(-numel // NF4_BLOCK)
    return numel // 2 + blocks + 4 * -(-blocks // NF4_SUPER_BLOCK)


def weight_bytes(model: nn.Module, load_in_4bit: bool, element: int) -> int:
    """Base weights as loaded: NF4 for the decoder's Linear layers when 4-bit (lm_head stays)."""
    quantised = set()
    if load_in_4bit:
        quantised = {id(m.weight) for name, m in model.named_modules()
                     if isinstance(m, nn.Linear) and not name.endswith("lm_head")}
    return sum(_nf4_bytes(p.numel()) if id(p) in quantised else p.numel() * element
               for p in model.parameters())


def lora_parameters(model: nn.Module, targets: list[str], r: int) -> tuple[int, int]:
    """(LoRA parameter count, sum of the targeted layers' input widths) over all layers."""
    count, inputs = 0, 0
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and name.rsplit(".", 1)[-1] in targets:
            count += r * (module.in_features + module.out_features)
            inputs += module.in_features
    return count, inputs


def head_parameters(hidden: int, rotation: str, routing: str) -> int:
    with torch.device("meta"):
        head = ZptrHead(ZptrConfig(hidden_size=hidden, rotation=rotation,
                                   omega=OmegaConfig(routing=routing)))
    unused = {id(p) for p in unused_router_parameters(head.omega)}
    return sum(p.numel() for p in head.parameters() if id(p) not in unused)


def activation_elements_per_token(config, seq_len: int, lora_inputs_per_layer: int,
                                  lora_targets_per_layer: int, r: int, dropout: bool) -> int:
    """Elements autograd keeps per token for one decoder layer of a LoRA run."""
    d = config.hidden_size
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or d // heads
    q = heads * head_dim
    kv = getattr(config, "num_key_value_heads", heads) * head_dim
    inter = config.intermediate_size
    norms = 2 * 3 * d                   # input, rsqrt-scaled, weighted copies of two RMSNorms
    rotary = 3 * (q + kv)               # q, k and their rotate_half copies
    attention = 2 * q + 2 * kv + 2 * heads * seq_len  # q, k, v, output; scores + probabilities
    mlp = 4 * inter                     # gate, up, activation, product
    lora = lora_inputs_per_layer * (2 if dropout else 1) + lora_targets_per_layer * r
    return norms + rotary + attention + mlp + lora


def estimate(cfg) -> MemoryEstimate:
    """Peak memory of ``zptr train`` with these settings (a TrainConfig), per process."""
    from .model import architecture_of
    from .training.setup import resolve_lora_targets

    model, config = _meta_model(cfg)
    architecture = architecture_of(model)
    element = 4  # float32 training; bnb computes in float32 too here
    targets = resolve_lora_targets(model, cfg.lora_targets)
    lora_count, lora_inputs = lora_parameters(model, targets, cfg.lora_r)
    head_count = head_parameters(config.hidden_size, cfg.rotation, cfg.routing)
    trainable = lora_count + head_count
    layers = config.num_hidden_layers
    seq = cfg.max_length
    tokens = cfg.batch_size * seq
    per_layer = activation_elements_per_token(
        config, seq, lora_inputs // layers, len(targets), cfg.lora_r, cfg.lora_dropout > 0)
    d, vocab = config.hidden_size, config.vocab_size
    head_elements = 3 * d + 18 * d      # final norm; Omega recurrences, z, four clusters, soul
    logits_elements = 4 * vocab         # logits, float copy, log-softmax, their gradient

    est = MemoryEstimate()
    est.parts["weights"] = weight_bytes(model, cfg.load_in_4bit, element)
    if cfg.load_in_4bit:
        # The float checkpoint is read (memory-mapped) while bitsandbytes quantises it.
        est.parts["4-bit loading (float weights read)"] = weight_bytes(model, False, element) \
            - est.parts["weights"]
    est.parts["lora + head (trainable)"] = trainable * element
    est.parts["gradients"] = trainable * element
    est.parts["optimizer (AdamW)"] = ADAM_SLOTS * trainable * element
    if cfg.gradient_checkpointing:  # layer inputs kept; one layer's activations live at a time
        layer_elements = layers * config.hidden_size + per_layer
    else:
        layer_elements = layers * per_layer
    est.parts["activations"] = tokens * (layer_elements + head_elements) * element
    est.parts["logits + loss"] = tokens * logits_elements * element
    est.parts["runtime (python, torch, libraries)"] = RUNTIME_OVERHEAD
    est.details = {"architecture": architecture, "parameters": sum(p.numel() for p in model.parameters()),
                   "lora_targets": targets, "lora_parameters": lora_count,
                   "head_parameters": head_count, "tokens_per_micro_batch": tokens,
                   "load_in_4bit": cfg.load_in_4bit}
    return est


def format_estimate(est: MemoryEstimate) -> str:
    d = est.details
    lines = [f"memory check: {d['architecture']}, {d['parameters'] / 1e6:.1f}M parameters, "
             f"{'4-bit NF4' if d['load_in_4bit'] else 'full precision'}, "
             f"{d['tokens_per_micro_batch']} tokens per micro-batch",
             f"  LoRA on {','.join(d['lora_targets'])}: {d['lora_parameters'] / 1e6:.2f}M parameters; "
             f"soul + Omega head: {d['head_parameters'] / 1e6:.2f}M parameters"]
    width = max(len(k) for k in est.parts)
    for label, value in est.parts.items():
        lines.append(f"  {label:<{width}}  {value / MIB:10.1f} MiB")
    lines.append(f"  {'estimated peak (per process)':<{width}}  {est.total / MIB:10.1f} MiB")
    return "\n".join(lines)
