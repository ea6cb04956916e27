"""The two paths a worker measures, behind one interface, and the worker itself.

Both backends hold runners with the same methods (``zptr.runtime.engine.ZptrLlama``,
``zptr.runtime.reference.TorchReference``): ``generate(tokens, max_tokens, temperature=0)``
timed into prefill and decode, and ``teacher_forced(tokens)`` giving the ZPTR logits of every
position. A backend opens one runner per Omega mode, all at once, so the repetitions of the
modes interleave and a busy machine slows them alike.

A worker (``python -m zptr.app.bench.backends JOB.json``) measures one path in a fresh
interpreter, so its peak RSS is its own.
"""

from __future__ import annotations

import contextlib
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np

from zptr.errors import ZptrError

from .measure import gguf_token_cost, peak_rss_mb, torch_token_cost
from .paths import WorkerJob, WorkerResult


def load_torch_path(checkpoint: Path, kind: str, threads: int):
    """The ZPTR model of a checkpoint in PyTorch in the path's weight type."""
    import torch

    from zptr.model import load_zptr_model

    torch.set_num_threads(threads)
    nf4 = kind == "nf4"
    return load_zptr_model(checkpoint, dtype=torch.bfloat16 if kind == "bfloat16" else torch.float32,
                           load_in_4bit=nf4, device_map="cuda" if nf4 else None)


@contextlib.contextmanager
def _torch_omega(model, mode: str) -> Iterator[None]:
    """Omega off: the head without its router (soul only)."""
    saved = model.head.omega
    if mode == "off":
        model.head.omega = None
    try:
        yield
    finally:
        model.head.omega = saved


class TorchMode:
    """The PyTorch reference in one Omega mode (the model is shared between modes)."""

    def __init__(self, reference, mode: str):
        self.reference, self.mode = reference, mode

    def _call(self, method: str, *args: Any, **kwargs: Any):
        import torch

        with torch.inference_mode(), _torch_omega(self.reference.model, self.mode):
            return getattr(self.reference, method)(*args, **kwargs)

    def generate(self, *args: Any, **kwargs: Any):
        return self._call("generate", *args, **kwargs)

    def teacher_forced(self, tokens: Sequence[int]):
        return self._call("teacher_forced", tokens)


@contextlib.contextmanager
def open_torch(job: WorkerJob, scoring: bool) -> Iterator[tuple[dict, tuple[int, int]]]:
    from zptr.models import load_tokenizer
    from zptr.runtime.reference import TorchReference

    model, ckpt = load_torch_path(Path(job.checkpoint), job.spec.kind, job.threads)
    reference = TorchReference(model, load_tokenizer(ckpt.base_model))
    yield {mode: TorchMode(reference, mode) for mode in job.modes}, torch_token_cost(model)


@contextlib.contextmanager
def open_llama_path(job: WorkerJob, scoring: bool) -> Iterator[tuple[dict, tuple[int, int]]]:
    from llama_cpp import LLAMA_POOLING_TYPE_NONE

    from zptr.runtime.engine import ZptrLlama

    # llama-cpp-python keeps a (n_ctx, n_vocab) float32 score array: size the context per pass
    # so the timed pass's RSS does not carry the long quality text's.
    longest = len(job.text) if scoring else max(len(job.prompt), job.n_gen + 1)
    n_batch = max(512, longest)
    with contextlib.ExitStack() as stack:
        runners = {}
        for mode in job.modes:
            # teacher_forced reads h_t of every token, which needs embeddings on in every mode;
            # the timed off mode stays plain llama.cpp (embeddings make every prompt token an
            # output).
            extra = dict(embedding=True, pooling_type=LLAMA_POOLING_TYPE_NONE) if scoring and mode == "off" else {}
            runners[mode] = ZptrLlama(job.gguf, omega=mode, sidecar=job.sidecar, n_ctx=longest + 16,
                                      n_batch=n_batch, n_ubatch=n_batch, n_threads=job.threads,
                                      n_threads_batch=job.threads, **extra)
            stack.callback(runners[mode].close)
        yield runners, gguf_token_cost(Path(job.gguf))


BACKENDS: dict[str, Callable[[WorkerJob, bool], Any]] = {"torch": open_torch, "llama": open_llama_path}


def _fresh(runner) -> Callable[..., Any]:
    """``runner.generate`` from an empty context every call. llama-cpp-python reuses the KV cache
    of a matching prompt prefix, which would turn a repeated prefill into a one-token decode."""
    llm = getattr(runner, "llm", None)

    def generate(*args: Any, **kwargs: Any):
        if llm is not None:
            llm.reset()
        return runner.generate(*args, **kwargs)

    return generate


def run_path(job: WorkerJob) -> WorkerResult:
    """Time one path in every asked Omega mode, then save its teacher-forced logits (a second
    pass, so the peak RSS reported is the one of generation alone)."""
    prompt, start = job.prompt, job.prompt[:1]
    greedy = dict(temperature=0.0, ignore_eos=True)
    modes: dict[str, dict] = {m: {"prefill": [], "decode": []} for m in job.modes}
    with BACKENDS[job.spec.backend](job, False) as (runners, (bytes_per_token, parameters)):
        if job.timing:
            generates = {mode: _fresh(runner) for mode, runner in runners.items()}
            for generate in generates.values():
                generate(prompt, max_tokens=2, **greedy)  # warm-up
            for _ in range(job.repetitions):
                for mode, generate in generates.items():
                    entry = modes[mode]
                    entry["prefill"].append(len(prompt) / generate(prompt, 1, **greedy).prefill_s)
                    run = generate(start, job.n_gen + 1, **greedy)
                    entry["decode"].append(run.decode_tps)
                    entry["tokens"] = run.tokens
            if "fast" in runners:
                modes["fast"]["certified_share"] = runners["fast"].stats.certified_share
        peak = peak_rss_mb()
    with BACKENDS[job.spec.backend](job, True) as (runners, _):
        for mode, runner in runners.items():
            np.save(job.logits_file(mode), runner.teacher_forced(job.text)[0])
    return WorkerResult(modes=modes, peak_rss_mb=peak, bytes_per_token=bytes_per_token,
                        parameters=parameters)


def run_worker(job: WorkerJob) -> WorkerResult:
    """Run one path in a fresh interpreter: its peak RSS is then its own."""
    job_file = job.save()
    proc = subprocess.run([sys.executable, "-m", "zptr.app.bench.backends", str(job_file)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        tail = "\n".join(proc.stderr.strip().splitlines()[-15:])
        raise ZptrError(f"bench worker for {job.name} failed (exit {proc.returncode}):\n{tail}")
    return WorkerResult.load(Path(job.result))


if __name__ == "__main__":
    worker_job = WorkerJob.load(Path(sys.argv[1]))
    run_path(worker_job).save(Path(worker_job.result))
