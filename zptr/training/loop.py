"""The training loop: LoRA + soul + Omega on a HF causal LM, under HF Accelerate.

``train(TrainConfig) -> Path`` runs in-process (the demo calls it) and under
``accelerate launch`` unchanged. What makes it exact and restartable:

* The data position is a count of examples consumed; the example order of every epoch is a pure
  function of (seed, epoch), so a resumed run reads exactly what an uninterrupted one would.
* The loss of one optimizer step is the token-level mean over the *global* batch (all processes,
  all accumulation micro-batches): every process knows the global token count, so DDP's gradient
  average over N processes with batch b equals one process with batch N*b.
* ``trainer_state/`` (``zptr.training.state``) holds what a resume needs beyond the weights.
* SIGINT/SIGTERM set a flag; the step in flight finishes, is saved atomically, and the run exits.

The work is split in three: :func:`resume_source` (what a ``--resume`` continues from),
:func:`prepare` (accelerator, data, model, optimizer) and :func:`run_steps` (the loop).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import shutil
import signal
import time
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Callable, Collection, Optional

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

from ..checkpoint import ADAPTER_WEIGHTS, Checkpoint, load_checkpoint, load_head_tensors, save_checkpoint
from ..config import CLUSTERS, AlphaSchedule, phase_status, sigmoid
from ..dataset import (IGNORE_INDEX, TokenizedExample, collate, fingerprint, global_batch_indices,
                       read_jsonl, tokenize)
from ..errors import Interrupted, TrainError, ZptrError
from ..fileio import atomic_file, check_separate, write_failure
from ..model import ZptrModel
from ..models import canonical_reference
from .config import TrainConfig
from .setup import build_model, trainable_parameters
from .state import (STATE_DIR, ResumeState, load_optimizer, read_trainer_state, rng_state,
                    set_rng_state, write_trainer_state)

STEP_DIR = re.compile(r"^step_(\d{6,})$")
METRICS_FILE = "metrics.jsonl"
DEFAULT_OUTPUT_DIR = "zptr-output"


class TrainingInterrupted(Interrupted):
    """A signal stopped the run after saving the step in flight."""

    def __init__(self, signum: int, checkpoint: Path, step: int):
        super().__init__(signum, f"interrupted by {signal.Signals(signum).name} at step {step}; "
                                 f"saved {checkpoint} (resume with --resume {checkpoint})")
        self.checkpoint = checkpoint


@dataclass
class Run:
    """Everything the loop works with."""

    cfg: TrainConfig
    output_dir: Path
    accelerator: object
    model: ZptrModel
    ddp_model: nn.Module
    optimizer: torch.optim.Optimizer
    parameter_names: list[str]
    data: list[TokenizedExample]
    data_sha: str
    pad_id: int
    schedule: AlphaSchedule
    resumed: bool
    start_step: int = 0
    examples_seen: int = 0

    @property
    def global_batch(self) -> int:
        return self.cfg.batch_size * self.accelerator.num_processes * self.cfg.gradient_accumulation_steps


# ------------------------------------------------------------------------------ checkpoint dirs


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


# ------------------------------------------------------------------------------ resume


def resume_source(cfg: TrainConfig, given: Optional[Collection[str]] = None
                  ) -> tuple[TrainConfig, Path, Optional[Checkpoint], Optional[ResumeState]]:
    """(settings with the resumed run's own filled in, output directory, checkpoint, trainer
    state); the last two None for a fresh run.

    A resume continues the saved run: its base model and data unless others are given, and its
    :data:`RUN_SETTINGS` always; ``given`` (the fields set on the command line; default: those
    that differ from TrainConfig's defaults) that contradict them are refused."""
    output_dir = Path(cfg.output_dir or (Path(cfg.resume).parent if cfg.resume else DEFAULT_OUTPUT_DIR))
    if output_dir.exists() and not output_dir.is_dir():
        raise TrainError(f"--output-dir {output_dir} is a file, not a directory")
    if not cfg.resume:
        if step_dirs(output_dir):
            raise TrainError(f"{output_dir} already holds checkpoints ({step_dirs(output_dir)[-1].name}); "
                             "pass --resume or choose another --output-dir")
        return replace(cfg, base_model=cfg.base_model or "bundled"), output_dir, None, None
    # Checkpoints and metrics go beside the resumed checkpoint, never into it.
    check_separate([cfg.resume], [output_dir], may_contain=True)
    checkpoint = load_checkpoint(Path(cfg.resume))  # verifies sha256 and the soul tensors
    state = read_trainer_state(checkpoint.path)
    if checkpoint.step >= cfg.max_steps:
        raise TrainError(f"{checkpoint.path} is at step {checkpoint.step}; --max-steps {cfg.max_steps} "
                         "leaves nothing to train")
    given = _non_default(cfg) if given is None else set(given)
    for name, saved in state.settings.items():
        if name in given and getattr(cfg, name) != saved:
            flag = "--" + name.replace("_", "-")
            raise TrainError(f"{flag} {_shown(getattr(cfg, name))} contradicts the run being resumed "
                             f"({checkpoint.path} was trained with {_shown(saved)}); drop {flag} to "
                             "continue that run, or start a new one without --resume")
    # Unless told otherwise, continue on the checkpoint's own base model and data.
    cfg = replace(cfg, base_model=cfg.base_model or checkpoint.base_model or "bundled",
                  data=cfg.data or state.data, **state.settings)
    return cfg, output_dir, checkpoint, state


def _non_default(cfg: TrainConfig) -> set[str]:
    return {f.name for f in fields(cfg) if getattr(cfg, f.name) != f.default}


def _shown(value) -> str:
    return ",".join(value) if isinstance(value, list) else str(value)


def _load_resumed_weights(model: ZptrModel, checkpoint: Checkpoint) -> None:
    from peft import set_peft_model_state_dict

    load_head_tensors(model.head, checkpoint.tensors)
    adapter_file = checkpoint.path / ADAPTER_WEIGHTS
    try:
        adapter = load_file(str(adapter_file))
    except Exception as err:  # safetensors raises several types on corrupt headers
        raise TrainError(f"{adapter_file}: unreadable safetensors file ({err})") from None
    result = set_peft_model_state_dict(model.lm, adapter)
    if getattr(result, "unexpected_keys", None):
        raise TrainError(f"{checkpoint.path}: adapter has unexpected tensors {result.unexpected_keys[:3]}")


# ------------------------------------------------------------------------------ setup


def prepare(cfg: TrainConfig, given: Optional[Collection[str]] = None) -> Run:
    """Accelerator, data, model and optimizer of a run, a resume's state loaded into them
    (``given``: see :func:`resume_source`)."""
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    from ..models import load_tokenizer

    cfg.validate()
    cfg, output_dir, checkpoint, state = resume_source(cfg, given)
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
    if skipped and accelerator.is_main_process:
        print(f"zptr train: skipped {skipped} bad lines of {cfg.data_path}")

    model = build_model(cfg, checkpoint.config if checkpoint else None)
    schedule = model.config.schedule = cfg.schedule()
    params = trainable_parameters(model)
    optimizer = torch.optim.AdamW([p for _, p in params], lr=cfg.learning_rate, weight_decay=0.0)
    run = Run(cfg=cfg, output_dir=output_dir, accelerator=accelerator, model=model, ddp_model=model,
              optimizer=optimizer, parameter_names=[n for n, _ in params], data=data,
              data_sha=data_sha, pad_id=pad_id, schedule=schedule, resumed=checkpoint is not None)
    if checkpoint is not None:
        if state.data_sha256 != data_sha:
            raise TrainError(f"{checkpoint.path} was trained on different data (sha256 "
                             f"{state.data_sha256[:12]}, now {data_sha[:12]}); exact resume needs "
                             "the same --data")
        if state.parameters != run.parameter_names:
            raise TrainError(f"{checkpoint.path}: its trained parameters differ from this model's "
                             "(other --lora-targets, --lora-r, --rotation or base model?)")
        _load_resumed_weights(model, checkpoint)
        load_optimizer(optimizer, state, checkpoint.path / STATE_DIR)
        run.start_step, run.examples_seen = checkpoint.step, state.examples_seen
        if len(state.rng) == world:
            set_rng_state(state.rng[rank], checkpoint.path / STATE_DIR)
        elif accelerator.is_main_process:
            print(f"zptr train: {checkpoint.path} holds RNG states of {len(state.rng)} processes, this "
                  f"run has {world}: continuing with fresh RNG (dropout differs from an unbroken run)")

    device_placement = not (cfg.load_in_4bit and torch.cuda.is_available())
    run.ddp_model = accelerator.prepare_model(model, device_placement=device_placement)
    run.optimizer = accelerator.prepare_optimizer(optimizer)
    return run


# ------------------------------------------------------------------------------ the loop


def train(cfg: TrainConfig, on_step: Optional[Callable[[dict], None]] = None,
          given: Optional[Collection[str]] = None) -> Path:
    """Train and return the final checkpoint directory.

    ``on_step(metrics)`` is called on the main process after every optimizer step; ``given``:
    the settings the user chose (see :func:`resume_source`). Raises TrainingInterrupted (after
    saving) on SIGINT/SIGTERM.
    """
    return run_steps(prepare(cfg, given), on_step)


def save_step(run: Run, step: int) -> Path:
    """Checkpoint ``step`` (all processes take part; the main one writes)."""
    from accelerate.utils import gather_object

    rng_states = gather_object([rng_state()])
    target = step_dir(run.output_dir, step)
    cfg = run.cfg
    if run.accelerator.is_main_process:
        scalars = {"step": step, "examples_seen": run.examples_seen, "seed": cfg.seed,
                   "data_sha256": run.data_sha, "num_examples": len(run.data),
                   "world_size": run.accelerator.num_processes, "global_batch": run.global_batch,
                   "schedule": {"step": step, "alpha": run.schedule.alpha_at(step), **asdict(run.schedule)},
                   "lr": cfg.learning_rate, "parameters": run.parameter_names,
                   "config": asdict(replace(cfg, data=str(cfg.data_path.resolve())))}
        peft_model = run.model.lm
        save_checkpoint(target, run.model.head, base_model=canonical_reference(cfg.base_model),
                        architecture=run.model.architecture, step=step,
                        adapter_writer=lambda d: peft_model.save_pretrained(str(d)),
                        extra_writer=lambda d: write_trainer_state(d / STATE_DIR, run.optimizer,
                                                                   rng_states, scalars),
                        overwrite=run.resumed)
        _prune(run.output_dir, cfg.save_total_limit, target)
    run.accelerator.wait_for_everyone()
    return target


def run_steps(run: Run, on_step: Optional[Callable[[dict], None]] = None) -> Path:
    """The loop. A fresh run that fails before its first checkpoint leaves nothing behind: its
    metrics file and the output directory it made go too."""
    main = run.accelerator.is_main_process
    metrics_file = run.output_dir / METRICS_FILE
    made = [p for p in (run.output_dir, *run.output_dir.parents) if not p.exists()]
    try:
        return _loop(run, metrics_file, on_step)
    except BaseException as err:
        if main and not run.resumed and not step_dirs(run.output_dir):
            metrics_file.unlink(missing_ok=True)
            for directory in made:
                with contextlib.suppress(OSError):
                    directory.rmdir()  # only if empty: never what someone else put there
        if isinstance(err, OSError) and not isinstance(err, ZptrError):
            raise write_failure(err, [metrics_file]) from None
        raise


def _loop(run: Run, metrics_file: Path, on_step: Optional[Callable[[dict], None]]) -> Path:
    from tqdm.auto import tqdm

    cfg, accelerator, model = run.cfg, run.accelerator, run.model
    main = accelerator.is_main_process
    if main:
        run.output_dir.mkdir(parents=True, exist_ok=True)
        if run.resumed:
            _truncate_metrics(metrics_file, run.start_step)
    model.train()
    stop: dict = {}
    bar = tqdm(total=cfg.max_steps, initial=run.start_step, desc="zptr train", unit="step",
               disable=not (cfg.progress and main), dynamic_ncols=True)
    last_saved = None
    metrics_out = open(metrics_file, "a", encoding="utf-8") if main else contextlib.nullcontext()
    with _stop_on_signals(stop), metrics_out:
        for step in range(run.start_step + 1, cfg.max_steps + 1):
            started = time.perf_counter()
            alpha = run.schedule.alpha_at(step)
            model.set_alpha(alpha)
            indices = global_batch_indices(run.examples_seen, run.global_batch, len(run.data), cfg.seed)
            global_tokens = sum(run.data[i].label_count for i in indices)
            stats, ortho = _accumulate_gradients(run, indices, global_tokens)
            run.optimizer.step()
            run.optimizer.zero_grad(set_to_none=True)
            run.examples_seen += run.global_batch
            if accelerator.num_processes > 1:
                stats = accelerator.reduce(stats, "sum")
            record = _metrics(step, stats, global_tokens, ortho, alpha, model, cfg.learning_rate,
                              time.perf_counter() - started)
            if main:
                metrics_out.write(json.dumps(record) + "\n")
                metrics_out.flush()
                bar.set_postfix_str(_postfix(record), refresh=False)
                bar.update(1)
                if on_step:
                    on_step(record)
            if not math.isfinite(record["loss"]):
                raise TrainError(f"loss became {record['loss']} at step {step}; lower --learning-rate")
            if _stop_requested(stop, accelerator):
                path = save_step(run, step)
                bar.close()
                raise TrainingInterrupted(stop.get("signum", signal.SIGTERM), path, step)
            if step % cfg.save_steps == 0 or step == cfg.max_steps:
                last_saved = save_step(run, step)
    bar.close()
    return last_saved


def _micro_batches(indices: list[int], world: int, rank: int, batch_size: int) -> list[list[int]]:
    """This process's micro-batches of one global batch: micro m of rank r is slice m*world + r."""
    count = len(indices) // (world * batch_size)
    return [indices[(m * world + rank) * batch_size:(m * world + rank + 1) * batch_size]
            for m in range(count)]


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


def _accumulate_gradients(run: Run, indices: list[int], global_tokens: int) -> tuple[torch.Tensor, float]:
    """Forward/backward of this process's micro-batches of one global batch.

    Returns ([task CE sum, tokens, route counts...] of this process, orthogonality loss). The
    task loss is normalised by the global token count, so gradients summed over micro-batches
    and averaged by DDP over processes are the gradient of the global batch's mean loss.
    """
    accelerator, model = run.accelerator, run.model
    world, device = accelerator.num_processes, accelerator.device
    micro_batches = _micro_batches(indices, world, accelerator.process_index, run.cfg.batch_size)
    stats = torch.zeros(2 + len(CLUSTERS), device=device)
    for m, micro in enumerate(micro_batches):
        batch = [run.data[i] for i in micro]
        tensors = {k: v.to(device) for k, v in collate(batch, run.pad_id).items()}
        origin = _origin_batch(model, batch, run.pad_id, device)
        last = m == len(micro_batches) - 1  # gradients are all-reduced once, after the last
        with contextlib.nullcontext() if last else accelerator.no_sync(run.ddp_model):
            out = run.ddp_model(input_ids=tensors["input_ids"], attention_mask=tensors["attention_mask"],
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


@contextlib.contextmanager
def _stop_on_signals(flag: dict):
    """Turn SIGINT/SIGTERM into a flag for the loop; restore the old handlers afterwards."""
    def handler(signum, frame):
        flag["signum"] = signum

    previous = {}
    try:
        for signum in (signal.SIGINT, signal.SIGTERM):
            previous[signum] = signal.signal(signum, handler)
    except ValueError:  # not the main thread: signals stay with the caller
        previous = {}
    try:
        yield
    finally:
        for signum, old in previous.items():
            signal.signal(signum, old)


def _stop_requested(stop: dict, accelerator) -> bool:
    """Whether any process got a signal (all processes must agree to save together)."""
    flag = torch.tensor([1.0 if stop else 0.0], device=accelerator.device)
    if accelerator.num_processes > 1:
        flag = accelerator.reduce(flag, "sum")
    return bool(flag.item() > 0)


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop records after ``step`` (a run that went on past its last checkpoint), atomically."""
    if not path.exists():
        return
    lines = path.read_text(encoding="utf-8").splitlines(True)
    kept = []
    for line in lines:
        try:
            if line.strip() and json.loads(line)["step"] <= step:
                kept.append(line)
        except (ValueError, KeyError, TypeError):
            continue  # a torn or foreign line: not a record of this run
    if len(kept) != len(lines):
        with atomic_file(path) as tmp:
            tmp.write_text("".join(kept), encoding="utf-8")


def _metrics(step: int, stats: torch.Tensor, global_tokens: int, ortho: float, alpha: float,
             model: ZptrModel, lr: float, seconds: float) -> dict:
    ce_sum, tokens, routes = float(stats[0]), float(stats[1]), stats[2:].tolist()
    task = ce_sum / max(global_tokens, 1)
    omega = model.head.omega
    return {"step": step, "loss": task + model.config.orthogonality_weight * ortho,
            "task_loss": task, "orthogonality": ortho, "alpha": alpha, "sigmoid_alpha": sigmoid(alpha),
            "phase": phase_status(alpha, model.config.schedule.target),
            "omega_gate": sigmoid(float(omega.gate.detach())) if omega is not None else None,
            "routes": {name: count / max(tokens, 1) for name, count in zip(CLUSTERS, routes)},
            "lr": lr, "tokens": int(tokens), "tokens_per_s": tokens / max(seconds, 1e-9),
            "seconds": seconds}


def _postfix(record: dict) -> str:
    shares = " ".join(f"{name[:3]} {share * 100:.0f}%" for name, share in record["routes"].items())
    return (f"loss={record['loss']:.3f} α={record['alpha']:.3f} σ(α)={record['sigmoid_alpha']:.3f} "
            f"{record['phase']} routes[{shares}] {record['tokens_per_s']:.0f} tok/s")
