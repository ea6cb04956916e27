"""The merged, folded model at the Hugging Face level, one tensor at a time.

``MergedModel.tensor(name)`` yields a base weight with its LoRA delta added (float32) and, for
``lm_head.weight``, the soul folded in: W' = W (I + sigmoid(alpha) R). A tied embedding is untied:
``model.embed_tokens.weight`` stays the original, ``lm_head.weight`` becomes W'. Nothing is ever
held beyond the tensor being produced, so peak memory stays near the largest tensor.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch
from safetensors import safe_open

from zptr.checkpoint import ADAPTER_CONFIG, ADAPTER_WEIGHTS
from zptr.errors import ConvertError
from zptr.head import fold_lm_head
from zptr.jsonio import read_object

EMBED = "model.embed_tokens.weight"
LM_HEAD = "lm_head.weight"
PEFT_PREFIX = "base_model.model."
LORA_SUFFIXES = (".lora_A.weight", ".lora_B.weight")
# PEFT options whose merge is not W += scale * B @ A: refused rather than merged wrongly.
UNSUPPORTED_LORA_OPTIONS = ("use_dora", "fan_in_fan_out", "layers_to_transform")


class SafetensorsWeights:
    """Lazy float32 access to the weights of a HF directory (single file or sharded index)."""

    def __init__(self, directory: Path):
        self.directory = Path(directory)
        index = self.directory / "model.safetensors.index.json"
        if index.is_file():
            weight_map = read_object(index).get("weight_map", dict[str, str])
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

    def get(self, name: str, rows: Optional[slice] = None) -> torch.Tensor:
        """The tensor (or a block of its rows) in float32."""
        with safe_open(str(self._file_of[name]), framework="pt") as handle:
            if rows is None:
                return handle.get_tensor(name).float()
            return handle.get_slice(name)[rows].float()


class StateDictWeights:
    """The same interface over an in-memory model (a GGUF base dequantised by transformers)."""

    def __init__(self, state: dict[str, torch.Tensor]):
        self._state = state

    def names(self) -> list[str]:
        return list(self._state)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._state[name].shape)

    def get(self, name: str, rows: Optional[slice] = None) -> torch.Tensor:
        tensor = self._state[name].detach()
        return (tensor if rows is None else tensor[rows]).to(torch.float32, copy=True)


class LoraAdapter:
    """A PEFT LoRA adapter: ``delta(name)`` = scale * B @ A for a base weight name, and the
    full replacement of a module saved through ``modules_to_save`` (a resized embedding or
    head after tokens were added, say).

    Every tensor is checked when the adapter is opened (a name PEFT would write, A/B shapes that
    agree with the rank, finite values), so a bad adapter is refused before any output exists.
    """

    def __init__(self, directory: Path):
        directory = Path(directory)
        config_path, weights_path = directory / ADAPTER_CONFIG, directory / ADAPTER_WEIGHTS
        if not weights_path.is_file():
            raise ConvertError(f"{weights_path}: missing (the adapter config has no weights next to it)")
        config = read_object(config_path)
        peft_type = config.get("peft_type", str, "LORA")
        if peft_type != "LORA":
            raise ConvertError(f"{config_path}: peft_type {peft_type!r}; only LORA merges")
        for option in UNSUPPORTED_LORA_OPTIONS:
            if config.get(option, Any, None):
                raise ConvertError(f"{config_path}: LoRA option {option}={config.data[option]!r} is not supported")
        self.path = weights_path
        self.rank = config.get("r", int)
        self.alpha = config.get("lora_alpha", float)
        self.rslora = config.get("use_rslora", bool, False)
        self.rank_pattern = config.get("rank_pattern", Optional[dict], None) or {}
        self.alpha_pattern = config.get("alpha_pattern", Optional[dict], None) or {}
        self.modules_to_save = config.get("modules_to_save", Optional[list[str]], None) or []
        for name, value in [("r", self.rank), *self.rank_pattern.items()]:
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConvertError(f"{config_path}: LoRA rank {name} must be a positive integer, got {value!r}")
        for name, value in [("lora_alpha", self.alpha), *self.alpha_pattern.items()]:
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ConvertError(f"{config_path}: LoRA alpha {name} must be a finite number, got {value!r}")
        self._pairs: dict[str, str] = {}  # base weight name -> module key in the adapter file
        self._saved: dict[str, str] = {}  # base weight name -> key of its full replacement
        self._check_tensors()

    def _check_tensors(self) -> None:
        try:
            with safe_open(str(self.path), framework="pt") as handle:
                tensors = {key: handle.get_tensor(key) for key in handle.keys()}
        except Exception as err:  # safetensors raises several types on corrupt files
            raise ConvertError(f"{self.path}: unreadable safetensors file ({err})") from None
        for key, value in tensors.items():
            if not key.startswith(PEFT_PREFIX):
                raise ConvertError(f"{self.path}: tensor {key!r} is not a PEFT adapter weight")
            if not torch.isfinite(value.float()).all():
                raise ConvertError(f"{self.path}: tensor {key} contains NaN or Inf")
            suffix = next((s for s in LORA_SUFFIXES if key.endswith(s)), None)
            # PEFT saves a module of modules_to_save under its own name, and may add copies
            # named .modules_to_save. (the same values) and .original_module. (the base's).
            name = key[len(PEFT_PREFIX):].replace(".modules_to_save.", ".")
            if suffix is not None:
                self._pairs[key[len(PEFT_PREFIX):-len(suffix)] + ".weight"] = key[:-len(suffix)]
            elif ".original_module." in key:
                continue
            elif any(name.rsplit(".", 1)[0].endswith(m) for m in self.modules_to_save):
                if name not in self._saved or ".modules_to_save." not in key:
                    self._saved[name] = key
            else:
                raise ConvertError(f"{self.path}: tensor {key!r} is neither a LoRA A/B weight nor a "
                                   "module listed in modules_to_save; cannot merge it")
        for name, key in self._pairs.items():
            a, b = tensors.get(key + ".lora_A.weight"), tensors.get(key + ".lora_B.weight")
            if a is None or b is None:
                raise ConvertError(f"{self.path}: {key} has lora_{'A' if a is None else 'B'} missing")
            rank = self._pattern(self.rank_pattern, name[: -len(".weight")], self.rank)
            if a.dim() != 2 or b.dim() != 2 or a.shape[0] != rank or b.shape[1] != rank:
                raise ConvertError(f"{self.path}: {key} has lora_A {tuple(a.shape)} and lora_B "
                                   f"{tuple(b.shape)}, which do not agree with rank {rank:g}")

    def targets(self) -> list[str]:
        return list(self._pairs)

    def replaced(self) -> list[str]:
        return list(self._saved)

    def check_shapes(self, shape_of) -> None:
        """Every LoRA product must have the shape of the base weight it is added to."""
        with safe_open(str(self.path), framework="pt") as handle:
            for name, key in self._pairs.items():
                out_features = handle.get_slice(key + ".lora_B.weight").get_shape()[0]
                in_features = handle.get_slice(key + ".lora_A.weight").get_shape()[1]
                if (out_features, in_features) != tuple(shape_of(name)):
                    raise ConvertError(f"{self.path}: {key} makes a ({out_features}, {in_features}) "
                                       f"update for {name}, which is {tuple(shape_of(name))} in the base model")

    def replacement_shape(self, name: str) -> Optional[tuple[int, ...]]:
        if name not in self._saved:
            return None
        with safe_open(str(self.path), framework="pt") as handle:
            return tuple(handle.get_slice(self._saved[name]).get_shape())

    def replacement(self, name: str, rows: Optional[slice] = None) -> Optional[torch.Tensor]:
        if name not in self._saved:
            return None
        with safe_open(str(self.path), framework="pt") as handle:
            whole = handle.get_slice(self._saved[name])
            return (whole[:] if rows is None else whole[rows]).float()

    def _pattern(self, pattern: dict, module: str, default: float) -> float:
        # PEFT keys patterns by a module-name suffix; the longest matching one wins.
        matches = [key for key in pattern if module == key or module.endswith("." + key)]
        return float(pattern[max(matches, key=len)]) if matches else default

    def scale(self, module: str) -> float:
        rank = self._pattern(self.rank_pattern, module, self.rank)
        alpha = self._pattern(self.alpha_pattern, module, self.alpha)
        return alpha / (rank ** 0.5 if self.rslora else rank)

    def delta(self, name: str, rows: Optional[slice] = None) -> Optional[torch.Tensor]:
        """scale * B @ A for a base weight (or a block of its rows: B's rows)."""
        key = self._pairs.get(name)
        if key is None:
            return None
        with safe_open(str(self.path), framework="pt") as handle:
            a = handle.get_tensor(key + ".lora_A.weight").float()
            b = handle.get_tensor(key + ".lora_B.weight").float()
        return self.scale(name[: -len(".weight")]) * ((b if rows is None else b[rows]) @ a)


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
        replaced = set(adapter.replaced()) if adapter is not None else set()
        names = [n for n in weights.names() if not n.endswith("rotary_emb.inv_freq")]
        if EMBED not in names:
            raise ConvertError(f"base model has no {EMBED}; is it a supported causal LM?")
        has_head = LM_HEAD in names
        self.tied = (not has_head or bool(getattr(config, "tie_word_embeddings", False))) \
            and LM_HEAD not in replaced
        if self.tied and has_head:
            names.remove(LM_HEAD)  # transformers may save the tied copy; the embedding is the source
        # A tied head is written only when it differs from the embedding: when the soul is folded.
        if LM_HEAD not in names and (LM_HEAD in replaced or (self.tied and soul is not None)):
            names.append(LM_HEAD)
        self._names = names
        if adapter is not None:
            missing = [t for t in adapter.targets() + adapter.replaced()
                       if t not in self._names or (t == LM_HEAD and t in adapter.targets())]
            if missing:
                raise ConvertError(f"{adapter.path}: adapter modules not found in the base model: {missing[:5]}")
            adapter.check_shapes(self.shape)
        vocab = self.shape(EMBED)[0]
        if LM_HEAD in self._names and self.shape(LM_HEAD)[0] != vocab:
            raise ConvertError(f"the output matrix has {self.shape(LM_HEAD)[0]} rows but the embedding "
                               f"{vocab}: the vocabulary was resized on one side only")

    @property
    def folded(self) -> bool:
        return self.soul is not None

    def names(self) -> list[str]:
        return list(self._names)

    def _source(self, name: str) -> str:
        return EMBED if name == LM_HEAD and self.tied else name

    def shape(self, name: str) -> tuple[int, ...]:
        source = self._source(name)
        replaced = self.adapter.replacement_shape(source) if self.adapter is not None else None
        return replaced or self.weights.shape(source)

    def _base(self, name: str, rows: Optional[slice]) -> torch.Tensor:
        replaced = self.adapter.replacement(name, rows) if self.adapter is not None else None
        return replaced if replaced is not None else self.weights.get(name, rows)

    def tensor(self, name: str, rows: Optional[slice] = None) -> torch.Tensor:
        """The tensor as written (or a block of its rows): merged, folded, and checked finite (a
        NaN in a base weight would make a GGUF that loads and prints nothing)."""
        weight = self._base(self._source(name), rows)
        if name == LM_HEAD:
            if self.soul is not None:
                weight = fold_lm_head(weight, self.soul.rotation, self.soul.gate)
        elif self.adapter is not None:
            delta = self.adapter.delta(name, rows)
            if delta is not None:
                weight += delta
        if not torch.isfinite(weight).all():
            raise ConvertError(f"tensor {name} of the base model contains NaN or Inf")
        return weight
