"""Running a bench: the model and its GGUFs, the token ids every path shares, the workers in
order (the float32 reference first), the machine's ceilings before and after, the outputs."""

from __future__ import annotations

import tempfile
import time
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

from zptr.dataset import mixed_text_path
from zptr.errors import ZptrError

from .backends import run_worker
from .measure import (machine_busy, machine_description, measure_bandwidth, measure_compute, noisy_timing,
                      settle_load)
from .paths import PATHS, REFERENCE_PATH, WorkerJob, WorkerResult
from .report import Row, add_ceilings, build_rows, summary, write_outputs


@dataclass
class BenchConfig:
    checkpoint: Path
    output_dir: Path
    paths: Sequence[str]
    omega: Sequence[str]
    n_prompt: int = 128
    n_gen: int = 64
    repetitions: int = 3
    threads: int = 1
    retries: int = 0  # extra runs of a path while one of its figures is noisy
    settle_s: float = 0.0  # longest wait for the load average to fall below the core count
    text_file: Optional[Path] = None
    ggufs: dict = field(default_factory=dict)  # outtype -> (model path, sidecar path or None)
    progress: bool = True


def bench_tokens(checkpoint: Path, n_prompt: int, text_file: Optional[Path]) -> tuple[list, list]:
    """(prompt ids of length n_prompt, ids of the fixed quality text), BOS first, same ids for
    every path so tokenizers cannot differ between them."""
    from zptr.checkpoint import load_checkpoint
    from zptr.models import load_tokenizer

    if text_file is not None and not Path(text_file).is_file():
        raise ZptrError(f"{text_file}: quality text file not found")
    tokenizer = load_tokenizer(load_checkpoint(checkpoint).base_model)
    text = Path(text_file or mixed_text_path()).read_text(encoding="utf-8")
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    prompt = (ids * (n_prompt // max(1, len(ids)) + 1))[: max(0, n_prompt - len(bos))]
    return bos + prompt, bos + ids


def ensure_checkpoint(model: str, output_dir: Path) -> Path:
    """A checkpoint directory for ``model``: itself when it is one; for a HF directory, the
    bundled model or a synthetic one, an untrained ZPTR head at the golden alpha (deterministic,
    seed 0), so the soul fold and Omega are exercised exactly as a trained checkpoint would."""
    import torch
    from transformers import AutoConfig

    from zptr.checkpoint import CONFIG_FILE, save_checkpoint
    from zptr.config import ZptrConfig
    from zptr.head import ZptrHead
    from zptr.model import architecture_of
    from zptr.models import resolve_model_path

    if (Path(model) / CONFIG_FILE).exists():
        return Path(model)
    directory, _ = resolve_model_path(model)
    hf_config = AutoConfig.from_pretrained(str(directory))
    target = output_dir / f"checkpoint-untrained-golden-{directory.name}"
    if target.exists():
        return target
    torch.manual_seed(0)
    config = ZptrConfig(hidden_size=hf_config.hidden_size)
    head = ZptrHead(config)
    head.soul.set_alpha(config.schedule.target)
    arch = architecture_of(types.SimpleNamespace(config=hf_config))
    return save_checkpoint(target, head, base_model=str(directory), architecture=arch, step=0)


def ensure_ggufs(checkpoint: Path, kinds: Sequence[str], models_dir: Path, progress: bool
                 ) -> dict[str, tuple[Path, Optional[Path]]]:
    """GGUF files (and Omega sidecars) of a checkpoint in ``models_dir``, converted afresh each
    run: a file left by an earlier run may come from another checkpoint of the same name."""
    from zptr.convert import convert_model

    out = {}
    for kind in kinds:
        result = convert_model(checkpoint, models_dir / f"{checkpoint.name}-{kind}.gguf",
                               outtype=kind, overwrite=True, progress=progress)
        out[kind] = (Path(result.model_path), result.sidecar_path and Path(result.sidecar_path))
    return out


def run_path_until_quiet(job: WorkerJob, retries: int) -> tuple[WorkerResult, int]:
    """A path's run, and how many runs it took: a path is its own fresh process, so one with a
    noisy figure runs again alone, up to ``retries`` more times, and the last run is kept whole
    (its Omega modes interleaved within it, never mixed with another run's)."""
    result, runs = run_worker(job), 1
    while runs <= retries and any(map(noisy_timing, result.modes.values())):
        result, runs = run_worker(job), runs + 1
    return result, runs


def run_bench(config: BenchConfig) -> dict[str, Any]:
    """Run every requested path and write the outputs; returns the JSON document."""
    from tqdm import tqdm

    names = list(config.paths)
    missing = [n for n in names if PATHS[n].backend == "llama" and PATHS[n].kind not in config.ggufs]
    if missing:
        raise ZptrError(f"no GGUF given for {', '.join(missing)}")
    prompt, text = bench_tokens(config.checkpoint, config.n_prompt, config.text_file)
    config.output_dir.mkdir(parents=True, exist_ok=True)
    settle_load(config.settle_s)
    machine = machine_description()
    document: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "machine": machine,
        "settings": {"n_prompt": len(prompt), "n_gen": config.n_gen, "repetitions": config.repetitions,
                     "threads": config.threads, "quality_tokens": len(text),
                     "checkpoint": str(config.checkpoint),
                     "ggufs": {k: str(v[0]) for k, v in config.ggufs.items()}},
        "busy": machine_busy(machine),
        "runs": {},  # path -> how many times it ran (the last run is the one reported)
    }
    bandwidth, compute = measure_bandwidth(config.threads), measure_compute(config.threads)
    rows: list[Row] = []
    # The reference runs first (and untimed when torch-f32 itself was not asked for).
    order = [REFERENCE_PATH] + [n for n in names if n != REFERENCE_PATH]
    with tempfile.TemporaryDirectory(prefix="zptr-bench-") as workdir:
        jobs = {}
        for name in tqdm(order, desc="bench", unit="path", disable=not config.progress):
            modes = [m for m in config.omega if m in PATHS[name].omega_modes]
            if name == REFERENCE_PATH:  # the references every other path is compared with
                modes = ["off"] + (["exact"] if set(config.omega) - {"off"} else [])
            gguf, sidecar = config.ggufs.get(PATHS[name].kind, (None, None))
            job = WorkerJob(name=name, modes=modes, checkpoint=str(config.checkpoint), prompt=prompt,
                            text=text, n_gen=config.n_gen, repetitions=config.repetitions,
                            threads=config.threads, timing=name in names, workdir=workdir,
                            gguf=str(gguf) if gguf else None, sidecar=str(sidecar) if sidecar else None)
            retries = config.retries if job.timing and not document["busy"] else 0
            result, document["runs"][name] = run_path_until_quiet(job, retries)
            jobs[name] = (job, result)
        reference = {mode: jobs[REFERENCE_PATH][0].logits_file(mode) for mode in ("off", "exact")}
        for name in names:
            rows += build_rows(*jobs[name], reference, document["busy"])
    # The ceilings again at the end, the best of both: on a shared machine one reading can be low.
    document["bandwidth_gbs"] = max(bandwidth, measure_bandwidth(config.threads))
    document["compute_gflops"] = max(compute, measure_compute(config.threads))
    add_ceilings(rows, document["bandwidth_gbs"], document["compute_gflops"])
    document["rows"] = [r.__dict__ for r in rows]
    document["summary"] = summary(rows)
    write_outputs(document, rows, config.output_dir)
    return document
