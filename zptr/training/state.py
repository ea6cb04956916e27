"""``trainer_state/``: what an exact resume needs next to the checkpoint's weights; no pickle.

* ``optimizer.safetensors`` + ``optimizer.json``: the AdamW moments and the rest of its state;
* ``rng.safetensors`` + ``rng.json``: every process's torch, python and numpy RNG states;
* ``trainer_state.json``: step, data position, data fingerprint, the trained parameter names
  and the run's settings.

Reading validates every file: garbage in any of them is a one-line error naming the file.
"""

from __future__ import annotations

import json
import random
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from ..errors import TrainError, ZptrError, error_summary
from ..jsonio import JsonObject, read_json
from .config import RUN_SETTINGS, TrainConfig

STATE_DIR = "trainer_state"
_FILES = ("optimizer.safetensors", "optimizer.json", "rng.safetensors", "rng.json",
          "trainer_state.json")


@dataclass
class ResumeState:
    step: int
    examples_seen: int
    data_sha256: str
    data: str  # the data file the run trained on
    parameters: list[str]  # names of the trained parameters, in the optimizer's order
    settings: dict[str, Any]  # the run's RUN_SETTINGS, as it was started
    optimizer_tensors: dict[str, torch.Tensor]
    optimizer_meta: dict[str, Any]
    rng: list[dict]  # one per process


def _optimizer_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
    """Optimizer state as (tensors for safetensors, JSON-able rest)."""
    state = optimizer.state_dict()
    tensors, scalars = {}, {}
    for index, entry in state["state"].items():
        for key, value in entry.items():
            if torch.is_tensor(value):
                tensors[f"state.{index}.{key}"] = value.detach().cpu().contiguous()
            else:
                scalars[f"{index}.{key}"] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def load_optimizer(optimizer: torch.optim.Optimizer, state: ResumeState, where: Path) -> None:
    grouped: dict[int, dict] = {}
    try:
        for name, value in state.optimizer_tensors.items():
            _, index, key = name.split(".", 2)
            grouped.setdefault(int(index), {})[key] = value
        for name, value in state.optimizer_meta["scalars"].items():
            index, key = name.split(".", 1)
            grouped.setdefault(int(index), {})[key] = value
        optimizer.load_state_dict({"state": grouped, "param_groups": state.optimizer_meta["param_groups"]})
    except (KeyError, ValueError, TypeError, RuntimeError, IndexError) as err:
        raise TrainError(f"{where}: optimizer state does not fit this model ({err})") from None


def rng_state() -> dict:
    """This process's RNG states: torch as a uint8 tensor, python/numpy as JSON-able values."""
    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"torch_cpu": torch.get_rng_state(),
             "python": [version, list(internal), gauss],
             "numpy": [kind, keys.tolist(), int(pos), int(has_gauss), float(cached)]}
    if torch.cuda.is_available():
        state["torch_cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict, where: Path) -> None:
    try:
        torch.set_rng_state(state["torch_cpu"])
        version, internal, gauss = state["python"]
        random.setstate((version, tuple(internal), gauss))
        kind, keys, pos, has_gauss, cached = state["numpy"]
        np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    except (KeyError, ValueError, TypeError, RuntimeError) as err:
        raise TrainError(f"{where}: RNG state is malformed ({err})") from None
    if "torch_cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["torch_cuda"])


def write_trainer_state(directory: Path, optimizer: torch.optim.Optimizer, rng_states: list[dict],
                        scalars: dict) -> None:
    directory.mkdir()
    tensors, optimizer_meta = _optimizer_tensors(optimizer)
    save_file(tensors, str(directory / "optimizer.safetensors"))
    (directory / "optimizer.json").write_text(json.dumps(optimizer_meta, indent=1))
    rng_tensors = {f"{key}.rank{rank}": state[key] for rank, state in enumerate(rng_states)
                   for key in ("torch_cpu", "torch_cuda") if key in state}
    save_file(rng_tensors, str(directory / "rng.safetensors"))
    rng_json = [{"python": s["python"], "numpy": s["numpy"]} for s in rng_states]
    (directory / "rng.json").write_text(json.dumps(rng_json))
    (directory / "trainer_state.json").write_text(json.dumps(scalars, indent=2))


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path))
    except Exception as err:  # safetensors raises several types on corrupt headers
        raise TrainError(f"{path}: unreadable safetensors file ({error_summary(err)})") from None


def read_trainer_state(checkpoint: Path) -> ResumeState:
    directory = checkpoint / STATE_DIR
    missing = [n for n in _FILES if not (directory / n).is_file()]
    if missing:
        raise TrainError(f"{checkpoint}: cannot resume, {STATE_DIR}/ lacks {', '.join(missing)}")
    try:
        scalars = JsonObject(read_json(directory / "trainer_state.json"), str(directory / "trainer_state.json"))
        optimizer = JsonObject(read_json(directory / "optimizer.json"), str(directory / "optimizer.json"))
        rng_path = directory / "rng.json"
        rng_json = read_json(rng_path)
        if not isinstance(rng_json, list) or not rng_json:
            raise TrainError(f"{rng_path}: must be a non-empty list of per-process RNG states")
        rng_tensors = _tensors(directory / "rng.safetensors")
        rng = []
        for rank, extra in enumerate(rng_json):
            entry = JsonObject(extra, str(rng_path), f"[{rank}]")
            state = {"python": entry.get("python", list), "numpy": entry.get("numpy", list)}
            if f"torch_cpu.rank{rank}" not in rng_tensors:
                raise TrainError(f"{directory / 'rng.safetensors'}: no torch_cpu.rank{rank} tensor")
            state["torch_cpu"] = rng_tensors[f"torch_cpu.rank{rank}"]
            if f"torch_cuda.rank{rank}" in rng_tensors:
                state["torch_cuda"] = rng_tensors[f"torch_cuda.rank{rank}"]
            rng.append(state)
        config = scalars.object("config")
        step = scalars.get("step", int)
        seen = scalars.get("examples_seen", int)
        if step < 0 or seen < 0:
            raise TrainError(f"{directory / 'trainer_state.json'}: negative step or examples_seen")
        hints = typing.get_type_hints(TrainConfig)
        settings = {name: config.get(name, hints[name]) for name in RUN_SETTINGS if name in config}
        return ResumeState(
            step=step, examples_seen=seen,
            data_sha256=scalars.get("data_sha256", str),
            data=config.get("data", Optional[str]),
            parameters=scalars.get("parameters", list[str]),
            settings=settings,
            optimizer_tensors=_tensors(directory / "optimizer.safetensors"),
            optimizer_meta={"param_groups": optimizer.get("param_groups", list),
                            "scalars": optimizer.get("scalars", dict)},
            rng=rng)
    except ZptrError as err:
        if isinstance(err, TrainError):
            raise
        raise TrainError(f"cannot resume: {err}") from None
