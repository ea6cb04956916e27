"""The merged, folded model at the Hugging Face level, one tensor at a time.

``MergedModel.tensor(name)`` yields a base weight with its LoRA delta added (float32) and, for
``lm_head.weight``, the soul folded in: W' = W (I + sigmoid(alpha) R). A tied embedding is untied:
``model.embed_tokens.weight`` stays the original, ``lm_head.weight`` becomes W'. Nothing is ever
held beyond the tensor being produced, so peak memory stays near the largest tensor.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

import torch
from safetensors import safe_open

from zptr.head import fold_lm_head

from .errors import ConvertError

EMBED = "model.embed_tokens.weight"
LM_HEAD = "lm_head.weight"
PEFT_PREFIX = "base_model.model."
LORA_SUFFIXES = (".lora_A.weight", ".lora_B.weight")
# PEFT options whose merge is not W += scale * B @ A: refused rather than merged wrongly.
UNSUPPORTED_LORA_OPTIONS = ("use_dora", "fan_in_fan_out", "modules_to_save", "layers_to_transform")


class SafetensorsWeights:
    """Lazy float32 access to the weights of a HF directory (single file or sharded index)."""

    def __init__(self, directory: Path):
        self.directory = Path(directory)
        index = self.directory / "model.safetensors.index.json"
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            files = sorted(set(weight_map.values()))
        elif (self.directory / "model.safetensors").is_file():
            files = ["model.safetensors"]
        else:
            raise ConvertError(f"{self.directory}: no model.safetensors or model.safetensors.index.json "
                               "(only safetensors weights are converted)")
        self._file_of: dict[str, Path] = {}
        self._shapes: dict[str, tuple[int, ...]] = {}
        for file in files:
            path = self.directory / file
            try:
                with safe_open(str(path), framework="pt") as handle:
                    for name in handle.keys():
                        self._file_of[name] = path
                        self._shapes[name] = tuple(handle.get_slice(name).get_shape())
            except Exception as err:  # safetensors raises several types on corrupt headers
                raise ConvertError(f"{path}: unreadable safetensors file ({err})") from err

    def names(self) -> list[str]:
        return list(self._shapes)

    def shape(self, name: str) -> tuple[int, ...]:
        return self._shapes[name]

    def get(self, name: str) -> torch.Tensor:
        with safe_open(str(self._file_of[name]), framework="pt") as handle:
            return handle.get_tensor(name).float()


class StateDictWeights:
    """The same interface over an in-memory model (a GGUF base dequantised by transformers)."""

    def __init__(self, state: dict[str, torch.Tensor]):
        self._state = state

    def names(self) -> list[str]:
        return list(self._state)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._state[name].shape)

    def get(self, name: str) -> torch.Tensor:
        return self._state[name].detach().to(torch.float32, copy=True)


class LoraAdapter:
    """A PEFT LoRA adapter read lazily: ``delta(name)`` = scale * B @ A for a base weight name."""

    def __init__(self, directory: Path):
        directory = Path(directory)
        config_path, weights_path = directory / "adapter_config.json", directory / "adapter_model.safetensors"
        if not weights_path.is_file():
            raise ConvertError(f"{weights_path}: missing (the adapter config has no weights next to it)")
        try:
            config = json.loads(config_path.read_text())
        except (OSError, json.JSONDecodeError) as err:
            raise ConvertError(f"{config_path}: unreadable adapter config ({err})") from err
        if config.get("peft_type", "LORA") != "LORA":
            raise ConvertError(f"{config_path}: peft_type {config.get('peft_type')!r}; only LORA merges")
        for option in UNSUPPORTED_LORA_OPTIONS:
            if config.get(option):
                raise ConvertError(f"{config_path}: LoRA option {option}={config[option]!r} is not supported")
        self.path = weights_path
        self.rank = int(config["r"])
        self.alpha = float(config["lora_alpha"])
        self.rslora = bool(config.get("use_rslora"))
        self.rank_pattern = config.get("rank_pattern") or {}
        self.alpha_pattern = config.get("alpha_pattern") or {}
        self._pairs: dict[str, str] = {}  # base weight name -> module key in the adapter file
        try:
            with safe_open(str(weights_path), framework="pt") as handle:
                keys = list(handle.keys())
        except Exception as err:
            raise ConvertError(f"{weights_path}: unreadable safetensors file ({err})") from err
        for key in keys:
            suffix = next((s for s in LORA_SUFFIXES if key.endswith(s)), None)
            if suffix is None or not key.startswith(PEFT_PREFIX):
                raise ConvertError(f"{weights_path}: tensor {key!r} is not a LoRA A/B weight; cannot merge it")
            module = key[len(PEFT_PREFIX):-len(suffix)]
            self._pairs[module + ".weight"] = key[:-len(suffix)]

    def targets(self) -> list[str]:
        return list(self._pairs)

    def _pattern(self, pattern: dict, module: str, default: float) -> float:
        # PEFT keys patterns by a module-name suffix; the longest matching one wins.
        matches = [key for key in pattern if module == key or module.endswith("." + key)]
        return float(pattern[max(matches, key=len)]) if matches else default

    def scale(self, module: str) -> float:
        rank = self._pattern(self.rank_pattern, module, self.rank)
        alpha = self._pattern(self.alpha_pattern, module, self.alpha)
        return alpha / (rank ** 0.5 if self.rslora else rank)

    def delta(self, name: str) -> Optional[torch.Tensor]:
        key = self._pairs.get(name)
        if key is None:
            return None
        with safe_open(str(self.path), framework="pt") as handle:
            a = handle.get_tensor(key + ".lora_A.weight").float()
            b = handle.get_tensor(key + ".lora_B.weight").float()
        return self.scale(name[: -len(".weight")]) * (b @ a)


@dataclass
class Soul:
    """What the fold needs: the materialised rotation and sigmoid(alpha)."""

    rotation: torch.Tensor
    gate: float


class MergedModel:
    """HF-named tensors of base + LoRA with the soul folded into ``lm_head.weight``."""

    def __init__(self, weights, config, adapter: Optional[LoraAdapter] = None, soul: Optional[Soul] = None):
        self.weights = weights
        self.config = config
        self.adapter = adapter
        self.soul = soul
        names = [n for n in weights.names() if not n.endswith("rotary_emb.inv_freq")]
        if EMBED not in names:
            raise ConvertError(f"base model has no {EMBED}; is it a supported causal LM?")
        has_head = LM_HEAD in names
        self.tied = not has_head or bool(getattr(config, "tie_word_embeddings", False))
        if self.tied and has_head:
            names.remove(LM_HEAD)  # transformers may save the tied copy; the embedding is the source
        # A tied head is written only when it differs from the embedding: when the soul is folded.
        if self.tied and soul is not None:
            names.append(LM_HEAD)
        self._names = names
        if adapter is not None:
            missing = [t for t in adapter.targets() if t not in self._names or t == LM_HEAD]
            if missing:
                raise ConvertError(f"{adapter.path}: LoRA targets not found in the base model: {missing[:5]}")

    @property
    def folded(self) -> bool:
        return self.soul is not None

    def names(self) -> list[str]:
        return list(self._names)

    def shape(self, name: str) -> tuple[int, ...]:
        return self.weights.shape(EMBED if name == LM_HEAD and self.tied else name)

    def tensor(self, name: str) -> torch.Tensor:
        if name == LM_HEAD:
            weight = self.weights.get(EMBED if self.tied else LM_HEAD)
            if self.soul is not None:
                weight = fold_lm_head(weight, self.soul.rotation, self.soul.gate)
            return weight
        weight = self.weights.get(name)
        if self.adapter is not None:
            delta = self.adapter.delta(name)
            if delta is not None:
                weight += delta
        return weight

    def items(self) -> Iterator[tuple[str, torch.Tensor]]:
        for name in self._names:
            yield name, self.tensor(name)
