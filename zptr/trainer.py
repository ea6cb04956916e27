"""The training loop: LoRA + soul + Omega on a HF causal LM, under HF Accelerate.

``train(TrainConfig) -> Path`` runs in-process (the demo calls it) and under
``accelerate launch`` unchanged. What makes it exact and restartable:

* The data position is a count of examples consumed; the example order of every epoch is a pure
  function of (seed, epoch), so a resumed run reads exactly what an uninterrupted one would.
* The loss of one optimizer step is the token-level mean over the *global* batch (all processes,
  all accumulation micro-batches): every process knows the global token count, so DDP's gradient
  average over N processes with batch b equals one process with batch N*b.
* ``trainer_state/`` holds the optimizer moments (safetensors), the schedule position, the data
  position and every process's RNG states (torch as uint8 safetensors, python/numpy as JSON).
* SIGINT/SIGTERM set a flag; the step in flight finishes, is saved atomically, and the run exits.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import re
import shutil
import signal
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from .checkpoint import atomic_file, load_checkpoint, load_head_tensors, save_checkpoint
from .config import CLUSTERS, AlphaSchedule, OmegaConfig, ZptrConfig, phase_status
from .dataset import (IGNORE_INDEX, TokenizedExample, collate, fingerprint, global_batch_indices,
                      read_jsonl, sample_corpus_path, tokenize)
from .errors import ZptrError
from .model import ZptrModel, architecture_of

# LoRA on the attention projections; Phi-3 fuses q, k and v into one qkv_proj.
LORA_TARGETS: dict[str, tuple[str, ...]] = {
    "llama": ("q_proj", "k_proj", "v_proj", "o_proj"),
    "qwen2": ("q_proj", "k_proj", "v_proj", "o_proj"),
    "gemma3_text": ("q_proj", "k_proj", "v_proj", "o_proj"),
    "phi3": ("qkv_proj", "o_proj"),
}
# Router parameters a routing mode never uses: frozen, so DDP sees no unused trainable parameter.
UNUSED_BY_ROUTING: dict[str, tuple[str, ...]] = {
    "threshold": ("resonance_linear", "resonance_sin"),
    "resonance": ("boundary", "router_depth", "router_phase"),
}
STEP_DIR = re.compile(r"^step_(\d{6,})$")
STATE_DIR = "trainer_state"
METRICS_FILE = "metrics.jsonl"
EXIT_CODES = {signal.SIGINT: 130, signal.SIGTERM: 143}


class TrainError(ZptrError, ValueError):
    """A training setting or a resume source is unusable."""


class TrainingInterrupted(ZptrError):
    """A signal stopped the run after saving the step in flight."""

    def __init__(self, signum: int, checkpoint: Path, step: int):
        super().__init__(f"interrupted by {signal.Signals(signum).name} at step {step}; "
                         f"saved {checkpoint} (resume with --resume {checkpoint})")
        self.exit_code = EXIT_CODES.get(signum, 1)
        self.checkpoint = checkpoint


@dataclass
class TrainConfig:
    base_model: Optional[str] = None  # default: the resumed checkpoint's base model, else bundled
    data: Optional[str] = None  # None: the bundled sample corpus
    output_dir: Optional[str] = None  # default: the resumed checkpoint's directory, else zptr-output
    max_steps: int = 500
    warmup_steps: int = 50
    annealing_steps: int = 400
    batch_size: int = 1
    gradient_accumulation_steps: int = 1
    max_length: int = 512
    learning_rate: float = 2e-4
    save_steps: int = 100
    save_total_limit: Optional[int] = None
    load_in_4bit: bool = False
    gradient_checkpointing: bool = False
    rotation: str = "so8"
    routing: str = "threshold"
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.05
    lora_targets: Optional[list[str]] = None
    origin: Optional[str] = None
    seed: int = 42
    resume: Optional[str] = None
    skip_bad_lines: bool = False
    progress: bool = True

    def validate(self) -> None:
        positive = ("max_steps", "batch_size", "gradient_accumulation_steps", "max_length",
                    "save_steps", "lora_r", "lora_alpha")
        for name in positive:
            if getattr(self, name) <= 0:
                raise TrainError(f"--{name.replace('_', '-')} must be positive, got {getattr(self, name)}")
        if self.warmup_steps < 0 or self.annealing_steps < 0:
            raise TrainError("--warmup-steps and --annealing-steps must not be negative")
        if not self.learning_rate > 0:
            raise TrainError(f"--learning-rate must be positive, got {self.learning_rate}")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise TrainError(f"--lora-dropout must lie in [0, 1), got {self.lora_dropout}")
        if self.save_total_limit is not None and self.save_total_limit < 1:
            raise TrainError(f"--save-total-limit must be at least 1, got {self.save_total_limit}")

    @property
    def data_path(self) -> Path:
        return Path(self.data) if self.data else sample_corpus_path()

    def schedule(self) -> AlphaSchedule:
        return AlphaSchedule(warmup_steps=self.warmup_steps, annealing_steps=self.annealing_steps)


# ------------------------------------------------------------------------------ model assembly


def linear_module_names(model: nn.Module) -> list[str]:
    """Leaf names of the Linear layers LoRA can target (bitsandbytes' Linear4bit included)."""
    names = {name.rsplit(".", 1)[-1] for name, module in model.named_modules()
             if isinstance(module, nn.Linear)}
    names.discard("lm_head")
    return sorted(names)


def resolve_lora_targets(model: nn.Module, architecture: str,
                         requested: Optional[list[str]] = None) -> list[str]:
    """The LoRA target module names; every requested name must exist in the model.

    A partial match is refused too: on Phi-3 the usual q/k/v/o list would train o_proj alone.
    """
    targets = list(requested) if requested else list(LORA_TARGETS[architecture])
    available = linear_module_names(model)
    missing = [t for t in targets if t not in available]
    if missing:
        raise TrainError(f"--lora-targets {','.join(missing)} match no linear module of this "
                         f"{architecture} model; available: {','.join(available)}")
    return targets


def build_model(cfg: TrainConfig, head_config: Optional[ZptrConfig] = None) -> ZptrModel:
    """Base model (4-bit or full precision) + LoRA + the ZPTR head, trainable parts unfrozen."""
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    from .models import load_base_model

    device_map = None
    if cfg.load_in_4bit and torch.cuda.is_available():
        from accelerate import PartialState

        device_map = {"": PartialState().local_process_index}  # bnb weights live where they train
    lm = load_base_model(cfg.base_model, load_in_4bit=cfg.load_in_4bit, device_map=device_map)
    architecture = architecture_of(lm)
    if cfg.load_in_4bit:
        lm = prepare_model_for_kbit_training(lm, use_gradient_checkpointing=False)
    if cfg.gradient_checkpointing:
        # Recompute each decoder layer in the backward pass; the frozen embedding's output must
        # require grad or the checkpointed layers would see no gradient path.
        lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        lm.enable_input_require_grads()
    targets = resolve_lora_targets(lm, architecture, cfg.lora_targets)
    lora = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                      target_modules=targets, task_type="CAUSAL_LM")
    peft_model = get_peft_model(lm, lora)
    if head_config is None:
        head_config = ZptrConfig(hidden_size=lm.config.hidden_size, rotation=cfg.rotation,
                                 schedule=cfg.schedule(), omega=OmegaConfig(routing=cfg.routing))
    model = ZptrModel(peft_model, head_config)
    if model.head.omega is not None:
        for prefix in UNUSED_BY_ROUTING[head_config.omega.routing]:
            for param in getattr(model.head.omega, prefix).parameters():
                param.requires_grad_(False)
    return model


def trainable_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """(name, parameter) of everything that trains, in a fixed order (the optimizer's order)."""
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


# ------------------------------------------------------------------------------ trainer state


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


def _load_optimizer(optimizer: torch.optim.Optimizer, tensors: dict, meta: dict) -> None:
    state: dict[int, dict] = {}
    for name, value in tensors.items():
        _, index, key = name.split(".", 2)
        state.setdefault(int(index), {})[key] = value
    for name, value in meta["scalars"].items():
        index, key = name.split(".", 1)
        state.setdefault(int(index), {})[key] = value
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


def _rng_state() -> dict:
    """This process's RNG states: torch as a uint8 tensor, python/numpy as JSON-able values."""
    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"torch_cpu": torch.get_rng_state(),
             "python": [version, list(internal), gauss],
             "numpy": [kind, keys.tolist(), int(pos), int(has_gauss), float(cached)]}
    if torch.cuda.is_available():
        state["torch_cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch_cpu"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    if "torch_cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["torch_cuda"])


def write_trainer_state(directory: Path, optimizer: torch.optim.Optimizer, rng_states: list[dict],
                        scalars: dict) -> None:
    """``trainer_state/``: optimizer, schedule/data position and per-process RNG; no pickle."""
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


def read_trainer_state(checkpoint: Path) -> dict:
    directory = checkpoint / STATE_DIR
    needed = ("optimizer.safetensors", "optimizer.json", "rng.safetensors", "rng.json",
              "trainer_state.json")
    missing = [n for n in needed if not (directory / n).is_file()]
    if missing:
        raise TrainError(f"{checkpoint}: cannot resume, {STATE_DIR}/ lacks {', '.join(missing)}")
    rng_tensors = load_file(str(directory / "rng.safetensors"))
    rng = []
    for rank, extra in enumerate(json.loads((directory / "rng.json").read_text())):
        state = dict(extra, torch_cpu=rng_tensors[f"torch_cpu.rank{rank}"])
        if f"torch_cuda.rank{rank}" in rng_tensors:
            state["torch_cuda"] = rng_tensors[f"torch_cuda.rank{rank}"]
        rng.append(state)
    return {"optimizer_tensors": load_file(str(directory / "optimizer.safetensors")),
            "optimizer_meta": json.loads((directory / "optimizer.json").read_text()),
            "rng": rng, **json.loads((directory / "trainer_state.json").read_text())}


# ------------------------------------------------------------------------------ helpers


def step_dirs(output_dir: Path) -> list[Path]:
    """Completed checkpoint directories, oldest first (hidden temp dirs never match)."""
    if not output_dir.is_dir():
        return []
    found = [p for p in output_dir.iterdir() if p.is_dir() and STEP_DIR.match(p.name)]
    return sorted(found, key=lambda p: int(STEP_DIR.match(p.name).group(1)))


def step_dir(output_dir: Path, step: int) -> Path:
    return output_dir / f"step_{step:06d}"


def _prune(output_dir: Path, limit: Optional[int], keep: Path) -> None:
    if limit is None:
        return
    old = [p for p in step_dirs(output_dir) if p != keep]
    for path in old[: max(len(old) - (limit - 1), 0)]:
        shutil.rmtree(path)


def _origin_batch(model: ZptrModel, batch: list[TokenizedExample], pad_id: int,
                  device: torch.device) -> Optional[torch.Tensor]:
    """(B, D) origin signatures, zero rows for examples without one; None when none has one."""
    rows = [i for i, e in enumerate(batch) if e.origin_ids]
    if not rows:
        return None
    padded = collate([TokenizedExample(batch[i].origin_ids) for i in rows], pad_id)
    was_training = model.training
    model.eval()  # the signature is a description of the origin text: no dropout noise
    with torch.no_grad():
        signature = model.origin_signature(padded["input_ids"].to(device),
                                           padded["attention_mask"].to(device))
    model.train(was_training)
    origin = torch.zeros(len(batch), signature.shape[-1], device=device)
    origin[rows] = signature.to(device)
    return origin


def _micro_batches(indices: list[int], world: int, rank: int, batch_size: int) -> list[list[int]]:
    """This process's micro-batches of one global batch: micro m of rank r is slice m*world + r."""
    count = len(indices) // (world * batch_size)
    return [indices[(m * world + rank) * batch_size:(m * world + rank + 1) * batch_size]
            for m in range(count)]


@contextlib.contextmanager
def _stop_on_signals(flag: dict) -> "contextlib.AbstractContextManager[None]":
    """Turn SIGINT/SIGTERM into a flag for the loop; restore the old handlers afterwards."""
    def handler(signum, frame):
        flag["signum"] = signum

    previous = {}
    try:
        for signum in EXIT_CODES:
            previous[signum] = signal.signal(signum, handler)
    except ValueError:  # not the main thread: signals stay with the caller
        previous = {}
    try:
        yield
    finally:
        for signum, old in previous.items():
            signal.signal(signum, old)


# ------------------------------------------------------------------------------ the loop


def train(cfg: TrainConfig, on_step: Optional[Callable[[dict], None]] = None) -> Path:
    """Train and return the final checkpoint directory.

    ``on_step(metrics)`` is called on the main process after every optimizer step.
    Raises TrainingInterrupted (after saving) on SIGINT/SIGTERM.
    """
    from accelerate import Accelerator
    from accelerate.utils import gather_object, set_seed
    from tqdm.auto import tqdm

    from .models import load_tokenizer

    cfg.validate()
    output_dir = Path(cfg.output_dir or (Path(cfg.resume).parent if cfg.resume else "zptr-output"))
    resume = None
    if cfg.resume:
        resume = load_checkpoint(Path(cfg.resume))  # verifies sha256 and the soul tensors
        state = read_trainer_state(resume.path)
        if resume.step >= cfg.max_steps:
            raise TrainError(f"{resume.path} is at step {resume.step}; --max-steps {cfg.max_steps} "
                             "leaves nothing to train")
        # Unless told otherwise, continue on the checkpoint's own base model and data.
        cfg = replace(cfg, base_model=cfg.base_model or resume.base_model,
                      data=cfg.data or state["config"]["data"])
    elif step_dirs(output_dir):
        raise TrainError(f"{output_dir} already holds checkpoints ({step_dirs(output_dir)[-1].name}); "
                         "pass --resume or choose another --output-dir")

    cfg = replace(cfg, base_model=cfg.base_model or "bundled")
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    # Without a GPU, accelerate only joins torchrun's processes into one gloo group when told
    # to use the CPU; otherwise each would silently train alone.
    accelerator = Accelerator(cpu=launched > 1 and not torch.cuda.is_available())
    world, rank = accelerator.num_processes, accelerator.process_index
    if world != launched:
        raise TrainError(f"launched as {launched} processes but accelerate formed a group of {world}")
    set_seed(cfg.seed)

    tokenizer = load_tokenizer(cfg.base_model)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    examples, skipped = read_jsonl(cfg.data_path, tokenizer, cfg.skip_bad_lines)
    data = tokenize(examples, tokenizer, cfg.max_length, cfg.origin)
    data_sha = fingerprint(cfg.data_path)

    model = build_model(cfg, resume.config if resume else None)
    schedule = model.config.schedule = cfg.schedule()
    params = trainable_parameters(model)
    optimizer = torch.optim.AdamW([p for _, p in params], lr=cfg.learning_rate, weight_decay=0.0)
    start_step, examples_seen = 0, 0
    if resume:
        if state["data_sha256"] != data_sha:
            raise TrainError(f"{resume.path} was trained on different data (sha256 "
                             f"{state['data_sha256'][:12]}, now {data_sha[:12]}); exact resume needs "
                             "the same --data")
        if state["parameters"] != [n for n, _ in params]:
            raise TrainError(f"{resume.path}: its trained parameters differ from this model's "
                             "(other --lora-targets, --lora-r, --rotation or base model?)")
        _load_resumed_weights(model, resume)
        _load_optimizer(optimizer, state["optimizer_tensors"], state["optimizer_meta"])
        start_step, examples_seen = resume.step, state["examples_seen"]
        if len(state["rng"]) == world:
            _set_rng_state(state["rng"][rank])
        elif accelerator.is_main_process:
            print(f"zptr train: {resume.path} holds RNG states of {len(state['rng'])} processes, this run "
                  f"has {world}: continuing with fresh RNG (dropout differs from an unbroken run)")

    device_placement = not (cfg.load_in_4bit and torch.cuda.is_available())
    ddp_model = accelerator.prepare_model(model, device_placement=device_placement)
    optimizer = accelerator.prepare_optimizer(optimizer)
    model.train()
    device = accelerator.device

    global_batch = cfg.batch_size * world * cfg.gradient_accumulation_steps
    metrics_file = output_dir / METRICS_FILE
    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
        if resume:
            _truncate_metrics(metrics_file, start_step)
        if skipped:
            print(f"zptr train: skipped {skipped} bad lines of {cfg.data_path}")

    def save(step: int) -> Path:
        rng_states = gather_object([_rng_state()])
        target = step_dir(output_dir, step)
        if accelerator.is_main_process:
            scalars = {"step": step, "examples_seen": examples_seen, "seed": cfg.seed,
                       "data_sha256": data_sha, "num_examples": len(data), "world_size": world,
                       "global_batch": global_batch,
                       "schedule": {"step": step, "alpha": schedule.alpha_at(step),
                                    **asdict(schedule)},
                       "lr": cfg.learning_rate, "parameters": [n for n, _ in params],
                       "config": asdict(cfg)}
            peft_model = model.lm
            save_checkpoint(target, model.head, base_model=str(cfg.base_model),
                            architecture=model.architecture, step=step,
                            adapter_writer=lambda d: peft_model.save_pretrained(str(d)),
                            extra_writer=lambda d: write_trainer_state(d / STATE_DIR, optimizer,
                                                                       rng_states, scalars),
                            overwrite=resume is not None)
            _prune(output_dir, cfg.save_total_limit, target)
        accelerator.wait_for_everyone()
        return target

    stop: dict = {}
    bar = tqdm(total=cfg.max_steps, initial=start_step, desc="zptr train", unit="step",
               disable=not (cfg.progress and accelerator.is_main_process), dynamic_ncols=True)
    last_saved = None
    metrics_out = open(metrics_file, "a", encoding="utf-8") if accelerator.is_main_process else None
    with _stop_on_signals(stop), metrics_out if metrics_out else contextlib.nullcontext():
        for step in range(start_step + 1, cfg.max_steps + 1):
            started = time.perf_counter()
            alpha = schedule.alpha_at(step)
            model.set_alpha(alpha)
            indices = global_batch_indices(examples_seen, global_batch, len(data), cfg.seed)
            global_tokens = sum(data[i].label_count for i in indices)
            stats, ortho = _accumulate_gradients(ddp_model, model, accelerator, data, indices,
                                                 global_tokens, cfg.batch_size, pad_id)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            examples_seen += global_batch
            stats = accelerator.reduce(stats, "sum") if world > 1 else stats
            record = _metrics(step, stats, global_tokens, ortho, alpha, model,
                              cfg.learning_rate, time.perf_counter() - started)
            if accelerator.is_main_process:
                metrics_out.write(json.dumps(record) + "\n")
                metrics_out.flush()
                bar.set_postfix_str(_postfix(record), refresh=False)
                bar.update(1)
                if on_step:
                    on_step(record)
            if not math.isfinite(record["loss"]):
                raise TrainError(f"loss became {record['loss']} at step {step}; lower --learning-rate")
            if _stop_requested(stop, accelerator, device):
                path = save(step)
                bar.close()
                raise TrainingInterrupted(stop.get("signum", signal.SIGTERM), path, step)
            if step % cfg.save_steps == 0 or step == cfg.max_steps:
                last_saved = save(step)
    bar.close()
    return last_saved


def _accumulate_gradients(ddp_model: nn.Module, model: ZptrModel, accelerator, data: list,
                          indices: list[int], global_tokens: int, batch_size: int, pad_id: int
                          ) -> tuple[torch.Tensor, float]:
    """Forward/backward of this process's micro-batches of one global batch.

    Returns ([task CE sum, tokens, route counts...] of this process, orthogonality loss). The
    task loss is normalised by the global token count, so gradients summed over micro-batches
    and averaged by DDP over processes are the gradient of the global batch's mean loss.
    """
    world, device = accelerator.num_processes, accelerator.device
    micro_batches = _micro_batches(indices, world, accelerator.process_index, batch_size)
    stats = torch.zeros(2 + len(CLUSTERS), device=device)
    for m, micro in enumerate(micro_batches):
        batch = [data[i] for i in micro]
        tensors = {k: v.to(device) for k, v in collate(batch, pad_id).items()}
        origin = _origin_batch(model, batch, pad_id, device)
        last = m == len(micro_batches) - 1  # gradients are all-reduced once, after the last
        with contextlib.nullcontext() if last else accelerator.no_sync(ddp_model):
            out = ddp_model(input_ids=tensors["input_ids"], attention_mask=tensors["attention_mask"],
                            origin=origin)
            ce_sum = F.cross_entropy(out.logits[:, :-1].flatten(0, 1).float(),
                                     tensors["labels"][:, 1:].flatten(),
                                     ignore_index=IGNORE_INDEX, reduction="sum")
            ortho = model.head.orthogonality_loss()
            # DDP averages gradients over processes, hence the factor `world`.
            loss = (ce_sum * world / max(global_tokens, 1)
                    + model.config.orthogonality_weight * ortho / len(micro_batches))
            accelerator.backward(loss)
        mask = tensors["attention_mask"].bool()
        stats[0] += ce_sum.detach()
        stats[1] += mask.sum()
        stats[2:] += torch.bincount(out.routes[mask], minlength=len(CLUSTERS)).to(stats)
    return stats, float(ortho.detach())


def _stop_requested(stop: dict, accelerator, device) -> bool:
    """Whether any process got a signal (all processes must agree to save together)."""
    flag = torch.tensor([1.0 if stop else 0.0], device=device)
    if accelerator.num_processes > 1:
        flag = accelerator.reduce(flag, "sum")
    return bool(flag.item() > 0)


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop records after ``step`` (a run that went on past its last checkpoint), atomically."""
    if not path.exists():
        return
    lines = path.read_text(encoding="utf-8").splitlines(True)
    kept = [line for line in lines if line.strip() and json.loads(line)["step"] <= step]
    if len(kept) != len(lines):
        with atomic_file(path) as tmp:
            tmp.write_text("".join(kept), encoding="utf-8")


def _load_resumed_weights(model: ZptrModel, resume) -> None:
    from peft import set_peft_model_state_dict

    load_head_tensors(model.head, resume.tensors)
    adapter = load_file(str(resume.path / "adapter_model.safetensors"))
    result = set_peft_model_state_dict(model.lm, adapter)
    if getattr(result, "unexpected_keys", None):
        raise TrainError(f"{resume.path}: adapter has unexpected tensors {result.unexpected_keys[:3]}")


def _metrics(step: int, stats: torch.Tensor, global_tokens: int, ortho: float, alpha: float,
             model: ZptrModel, lr: float, seconds: float) -> dict:
    ce_sum, tokens, routes = float(stats[0]), float(stats[1]), stats[2:].tolist()
    task = ce_sum / max(global_tokens, 1)
    gate = 1 / (1 + math.exp(-alpha))
    omega = model.head.omega
    return {"step": step, "loss": task + model.config.orthogonality_weight * ortho,
            "task_loss": task, "orthogonality": ortho, "alpha": alpha, "sigmoid_alpha": gate,
            "phase": phase_status(alpha, model.config.schedule.target),
            "omega_gate": float(torch.sigmoid(omega.gate.detach())) if omega is not None else None,
            "routes": {name: count / max(tokens, 1) for name, count in zip(CLUSTERS, routes)},
            "lr": lr, "tokens": int(tokens), "tokens_per_s": tokens / max(seconds, 1e-9),
            "seconds": seconds}


def _postfix(record: dict) -> str:
    shares = " ".join(f"{name[:3]} {share * 100:.0f}%" for name, share in record["routes"].items())
    return (f"loss={record['loss']:.3f} α={record['alpha']:.3f} σ(α)={record['sigmoid_alpha']:.3f} "
            f"{record['phase']} routes[{shares}] {record['tokens_per_s']:.0f} tok/s")
