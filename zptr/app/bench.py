"""``zptr bench``: tokens/s and fidelity of the PyTorch path against the llama.cpp path.

In the spirit of llama-bench: prefill (``-p N`` prompt tokens in one batch) and decode (``-n N``
tokens one at a time with the KV cache, greedy) with ``-r`` repetitions after one warm-up, median
and standard deviation of tokens/s. Every path (backend + weight type) runs in its own
subprocess, so its peak RSS is its own; within a path the Omega modes' repetitions interleave. Quality columns compare each path's logits on a fixed
text with the PyTorch float32 ZPTR head in the same Omega mode (mean KL(reference || path),
top-1 agreement). The roofline column divides the machine's measured memory bandwidth by the
weight bytes a decoded token reads: decode is memory-bound, so that is the ceiling.

Outputs: a markdown table on stdout, and ``bench.json``, ``bench.csv``, ``bench.md`` and
``bench.png`` in ``--output-dir``.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import csv
import json
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import types
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence

import numpy as np

from zptr.dataset import mixed_text_path
from zptr.errors import ZptrError
from zptr.fileio import atomic_file
from zptr.runtime.metrics import quality

OMEGA_MODES = ("off", "fast", "exact")
DEFAULT_TEXT = mixed_text_path()


class BenchError(ZptrError):
    """A benchmark cannot run as asked (unknown path, missing model, failed worker)."""


@dataclass(frozen=True)
class PathSpec:
    backend: str  # "torch" or "llama"
    kind: str  # torch dtype name, or GGUF outtype
    omega_modes: tuple  # the Omega modes this backend implements
    needs_cuda: bool = False


# The PyTorch head computes the full-vocabulary product: its Omega-on mode is "exact".
PATHS: dict[str, PathSpec] = {
    "torch-f32": PathSpec("torch", "float32", ("off", "exact")),
    "torch-bf16": PathSpec("torch", "bfloat16", ("off", "exact")),
    "torch-nf4": PathSpec("torch", "nf4", ("off", "exact"), needs_cuda=True),
    "llama-f16": PathSpec("llama", "f16", OMEGA_MODES),
    "llama-q8_0": PathSpec("llama", "q8_0", OMEGA_MODES),
    "llama-q4_k_m": PathSpec("llama", "q4_k_m", OMEGA_MODES),
}
REFERENCE_PATH = "torch-f32"


@dataclass
class Row:
    path: str
    omega: str
    prefill_tps: float
    prefill_std: float
    decode_tps: float
    decode_std: float
    peak_rss_mb: float
    bytes_per_token: int
    roofline_tps: float = math.nan
    roofline_share: float = math.nan
    mean_kl: float = math.nan
    top1: float = math.nan
    greedy_match: float = math.nan  # fast only: share of greedy tokens equal to exact's
    certified_share: float = math.nan  # fast only: tokens the bound certified (no fallback)


@dataclass
class BenchConfig:
    checkpoint: Path
    output_dir: Path
    paths: Sequence[str]
    omega: Sequence[str]
    n_prompt: int = 128
    n_gen: int = 64
    repetitions: int = 3
    threads: int = 0  # 0: all cores
    text_file: Optional[Path] = None
    ggufs: dict = field(default_factory=dict)  # outtype -> (model path, sidecar path or None)
    progress: bool = True


# ------------------------------------------------------------------------------ measurements


def measure_bandwidth(threads: int, size_mb: int = 256, repeats: int = 5) -> float:
    """Memory bandwidth in GB/s: best of ``repeats`` threaded copies of a ``size_mb`` buffer.

    A copy reads and writes every byte, so bytes moved = 2 x size. numpy releases the GIL while
    copying, so ``threads`` slices run in parallel like a multi-threaded decode does.
    """
    src = np.ones(size_mb * (1 << 20) // 8, dtype=np.float64)
    dst = np.empty_like(src)
    slices = [slice(i * len(src) // threads, (i + 1) * len(src) // threads) for i in range(threads)]
    best = math.inf
    with concurrent.futures.ThreadPoolExecutor(threads) as pool:
        for _ in range(repeats + 1):  # the first copy faults the pages in
            start = time.perf_counter()
            list(pool.map(lambda s: np.copyto(dst[s], src[s]), slices))
            best = min(best, time.perf_counter() - start)
    return 2 * src.nbytes / best / 1e9


def gguf_decode_bytes(path: Path) -> int:
    """Weight bytes one decoded token reads from a GGUF: all tensors but the input embedding
    table (one row of it is read), unless the model has no ``output.weight`` (tied)."""
    from gguf import GGUFReader

    sizes = {t.name: int(t.n_bytes) for t in GGUFReader(str(path)).tensors}
    if "output.weight" in sizes:
        sizes.pop("token_embd.weight", None)
    return sum(sizes.values())


def torch_decode_bytes(model) -> int:
    """Weight bytes one decoded token reads from the PyTorch language model: every parameter
    once (shared storage counted once), without the input embedding table unless it is also the
    lm_head. The ZPTR head is left out, as the Omega sidecar is on the GGUF side: both columns
    are the language model's own bytes."""
    lm = model.lm
    embed = lm.get_input_embeddings().weight
    head = lm.get_output_embeddings().weight
    skip = {embed.data_ptr()} if embed.data_ptr() != head.data_ptr() else set()
    seen = {t.data_ptr(): t.numel() * t.element_size() for t in lm.parameters()}
    return sum(size for ptr, size in seen.items() if ptr not in skip)


def peak_rss_mb() -> float:
    """Peak resident set size of this process in MB. VmHWM belongs to this program alone;
    ru_maxrss would also count the parent's pages at fork time (Linux keeps it across exec)."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def median_std(values: Sequence[float]) -> tuple[float, float]:
    return statistics.median(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


# ------------------------------------------------------------------------------ the two paths
#
# Both backends expose the same interface (runtime.engine.ZptrLlama, runtime.reference.
# TorchReference): ``generate(tokens, max_tokens, temperature=0)`` timed into prefill and decode,
# and ``teacher_forced(tokens)`` giving the ZPTR logits of every position. A backend's ``open``
# is a context holding one such runner per Omega mode, all at once, so the repetitions of the
# modes interleave and a busy machine slows them alike.


def load_torch_path(checkpoint: Path, kind: str, threads: int):
    """The ZPTR model of a checkpoint in PyTorch: LoRA merged (kept unmerged on 4-bit), head on."""
    import torch

    from zptr.model import load_zptr_model

    torch.set_num_threads(threads)
    nf4 = kind == "nf4"
    return load_zptr_model(checkpoint, dtype=torch.bfloat16 if kind == "bfloat16" else torch.float32,
                           load_in_4bit=nf4, device_map="cuda" if nf4 else None)


@contextlib.contextmanager
def torch_omega(model, mode: str) -> Iterator[None]:
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

        with torch.inference_mode(), torch_omega(self.reference.model, self.mode):
            return getattr(self.reference, method)(*args, **kwargs)

    def generate(self, *args: Any, **kwargs: Any):
        return self._call("generate", *args, **kwargs)

    def teacher_forced(self, tokens: Sequence[int]):
        return self._call("teacher_forced", tokens)


@contextlib.contextmanager
def open_torch(spec: dict, scoring: bool) -> Iterator[tuple[dict, dict]]:
    from zptr.runtime.reference import TorchReference
    from zptr.models import load_tokenizer

    model, ckpt = load_torch_path(Path(spec["checkpoint"]), spec["kind"], spec["threads"])
    reference = TorchReference(model, load_tokenizer(ckpt.base_model))
    yield ({mode: TorchMode(reference, mode) for mode in spec["modes"]},
           {"bytes_per_token": torch_decode_bytes(model)})


@contextlib.contextmanager
def open_llama_path(spec: dict, scoring: bool) -> Iterator[tuple[dict, dict]]:
    from zptr.runtime.engine import ZptrLlama
    from llama_cpp import LLAMA_POOLING_TYPE_NONE

    # llama-cpp-python keeps a (n_ctx, n_vocab) float32 score array: size the context per pass
    # so the timed pass's RSS does not carry the long quality text's.
    longest = len(spec["text"]) if scoring else max(len(spec["prompt"]), spec["n_gen"] + 1)
    n_batch = max(512, longest)
    with contextlib.ExitStack() as stack:
        runners = {}
        for mode in spec["modes"]:
            # teacher_forced reads h_t of every token, which needs embeddings on in every mode;
            # the timed off mode stays plain llama.cpp (embeddings make every prompt token an
            # output).
            extra = dict(embedding=True, pooling_type=LLAMA_POOLING_TYPE_NONE) if scoring and mode == "off" else {}
            runners[mode] = ZptrLlama(spec["gguf"], omega=mode, sidecar=spec["sidecar"],
                                      n_ctx=longest + 16, n_batch=n_batch, n_ubatch=n_batch,
                                      n_threads=spec["threads"], n_threads_batch=spec["threads"],
                                      **extra)
            stack.callback(runners[mode].close)
        yield runners, {"bytes_per_token": gguf_decode_bytes(Path(spec["gguf"]))}


BACKENDS: dict[str, Callable[[dict, bool], Any]] = {"torch": open_torch, "llama": open_llama_path}


def fresh_generate(runner) -> Callable[..., Any]:
    """``runner.generate`` from an empty context every call. llama-cpp-python reuses the KV cache
    of a matching prompt prefix, which would turn a repeated prefill into a one-token decode."""
    llm = getattr(runner, "llm", None)

    def generate(*args: Any, **kwargs: Any):
        if llm is not None:
            llm.reset()
        return runner.generate(*args, **kwargs)

    return generate


def run_path(spec: dict) -> dict:
    """Time one path in every asked Omega mode, then save its teacher-forced logits (a second
    pass, so the peak RSS reported is the one of generation alone)."""
    prompt, start, n_gen = spec["prompt"], spec["prompt"][:1], spec["n_gen"]
    greedy = dict(temperature=0.0, stop_at_eos=False)
    modes: dict[str, dict] = {m: {"prefill": [], "decode": []} for m in spec["modes"]}
    with BACKENDS[spec["backend"]](spec, False) as (runners, info):
        if spec["timing"]:
            generates = {mode: fresh_generate(runner) for mode, runner in runners.items()}
            for generate in generates.values():
                generate(prompt, max_tokens=2, **greedy)  # warm-up
            for _ in range(spec["repetitions"]):
                for mode, generate in generates.items():
                    entry = modes[mode]
                    entry["prefill"].append(len(prompt) / generate(prompt, 1, **greedy).prefill_s)
                    run = generate(start, n_gen + 1, **greedy)
                    entry["decode"].append(run.decode_tps)
                    entry["tokens"] = run.tokens
            if "fast" in runners:
                modes["fast"]["certified_share"] = runners["fast"].stats.certified_share
        peak = peak_rss_mb()
    with BACKENDS[spec["backend"]](spec, True) as (runners, _):
        for mode, runner in runners.items():
            np.save(Path(spec["workdir"]) / f"{spec['name']}.{mode}.npy",
                    runner.teacher_forced(spec["text"])[0])
    return {"modes": modes, "peak_rss_mb": peak, **info}


def worker_main(spec_file: Path) -> int:
    spec = json.loads(Path(spec_file).read_text())
    result = run_path(spec)
    Path(spec["result"]).write_text(json.dumps(result))
    return 0


def run_worker(spec: dict) -> dict:
    """Run one path in a fresh interpreter: its peak RSS is then its own."""
    workdir = Path(spec["workdir"])
    spec_file = workdir / f"{spec['name']}.spec.json"
    spec["result"] = str(workdir / f"{spec['name']}.result.json")
    spec_file.write_text(json.dumps(spec))
    proc = subprocess.run([sys.executable, "-m", "zptr.app.bench", "--worker", str(spec_file)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        tail = "\n".join(proc.stderr.strip().splitlines()[-15:])
        raise BenchError(f"bench worker for {spec['name']} failed (exit {proc.returncode}):\n{tail}")
    return json.loads(Path(spec["result"]).read_text())


# ------------------------------------------------------------------------------ orchestration


def machine_description() -> dict[str, Any]:
    import psutil

    model_name = platform.processor()
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        for line in subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines():
            if line.startswith("Model name:"):
                model_name = line.split(":", 1)[1].strip()
    return {"cpu": model_name, "nproc": os.cpu_count(),
            "memory_gb": round(psutil.virtual_memory().total / 1e9, 1),
            "load_average_1m": round(os.getloadavg()[0], 2), "platform": platform.platform(),
            "python": platform.python_version()}


def bench_tokens(checkpoint: Path, n_prompt: int, text_file: Optional[Path]) -> tuple[list, list]:
    """(prompt ids of length n_prompt, ids of the fixed quality text), BOS first, same ids for
    every path so tokenizers cannot differ between them."""
    from zptr.checkpoint import load_checkpoint
    from zptr.models import load_tokenizer

    tokenizer = load_tokenizer(load_checkpoint(checkpoint).base_model)
    if text_file is not None and not Path(text_file).is_file():
        raise BenchError(f"{text_file}: quality text file not found")
    path = Path(text_file) if text_file else DEFAULT_TEXT
    text = path.read_text(encoding="utf-8")
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    prompt = (ids * (n_prompt // max(1, len(ids)) + 1))[: max(0, n_prompt - len(bos))]
    return bos + prompt, bos + ids


def build_rows(name: str, result: dict, workdir: Path) -> list[Row]:
    rows = []
    modes = result["modes"]
    for mode, timing in modes.items():
        prefill, prefill_std = median_std(timing["prefill"])
        decode, decode_std = median_std(timing["decode"])
        row = Row(path=name, omega=mode, prefill_tps=prefill, prefill_std=prefill_std,
                  decode_tps=decode, decode_std=decode_std, peak_rss_mb=result["peak_rss_mb"],
                  bytes_per_token=result["bytes_per_token"],
                  certified_share=timing.get("certified_share", math.nan))
        # Quality against the float32 head in the same mode. teacher_forced is exact in both
        # Omega-on modes, so fast is checked by its greedy tokens equalling exact's instead.
        if mode == "fast":
            if "exact" in modes:
                row.greedy_match = float(np.mean(np.equal(timing["tokens"], modes["exact"]["tokens"])))
        else:
            ref = np.load(workdir / f"{REFERENCE_PATH}.{mode}.npy")
            row.mean_kl, row.top1 = quality(ref, np.load(workdir / f"{name}.{mode}.npy"))
        rows.append(row)
    return rows


def run_bench(config: BenchConfig) -> dict[str, Any]:
    """Run every requested path and write the outputs; returns the JSON document."""
    from tqdm import tqdm

    threads = config.threads or os.cpu_count() or 1
    names = list(config.paths)
    missing = [n for n in names if PATHS[n].backend == "llama" and PATHS[n].kind not in config.ggufs]
    if missing:
        raise BenchError(f"no GGUF given for {', '.join(missing)}")
    prompt, text = bench_tokens(config.checkpoint, config.n_prompt, config.text_file)
    config.output_dir.mkdir(parents=True, exist_ok=True)
    document: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "machine": machine_description(),
        "settings": {"n_prompt": len(prompt), "n_gen": config.n_gen, "repetitions": config.repetitions,
                     "threads": threads, "quality_tokens": len(text),
                     "checkpoint": str(config.checkpoint),
                     "ggufs": {k: str(v[0]) for k, v in config.ggufs.items()}},
    }
    document["bandwidth_gbs"] = measure_bandwidth(threads)
    rows: list[Row] = []
    # The reference runs first (and untimed when torch-f32 itself was not asked for).
    order = [REFERENCE_PATH] + [n for n in names if n != REFERENCE_PATH]
    with tempfile.TemporaryDirectory(prefix="zptr-bench-") as workdir:
        results: dict[str, dict] = {}
        for name in tqdm(order, desc="bench", unit="path", disable=not config.progress):
            spec = PATHS[name]
            modes = [m for m in config.omega if m in spec.omega_modes]
            if name == REFERENCE_PATH:  # the references every other path is compared with
                modes = ["off"] + (["exact"] if set(config.omega) - {"off"} else [])
            gguf, sidecar = config.ggufs.get(spec.kind, (None, None))
            results[name] = run_worker({
                "name": name, "backend": spec.backend, "kind": spec.kind, "modes": modes,
                "checkpoint": str(config.checkpoint), "gguf": str(gguf) if gguf else None,
                "sidecar": str(sidecar) if sidecar else None, "threads": threads,
                "prompt": prompt, "text": text, "n_gen": config.n_gen,
                "repetitions": config.repetitions, "timing": name in names, "workdir": workdir})
        for name in names:
            rows += build_rows(name, results[name], Path(workdir))
    # Bandwidth again at the end, the best of both: on a shared machine one reading can be low.
    document["bandwidth_gbs"] = max(document["bandwidth_gbs"], measure_bandwidth(threads))
    for row in rows:
        row.roofline_tps = document["bandwidth_gbs"] * 1e9 / row.bytes_per_token
        row.roofline_share = row.decode_tps / row.roofline_tps
    document["rows"] = [asdict(r) for r in rows]
    document["summary"] = summary(rows)
    write_outputs(document, rows, config.output_dir)
    return document


def _find(rows: Sequence[Row], path: str, omega: str) -> Optional[Row]:
    return next((r for r in rows if r.path == path and r.omega == omega), None)


def summary(rows: Sequence[Row]) -> dict[str, float]:
    """The headline ratios: llama.cpp q4_k_m over PyTorch float32 decode, Omega-fast overhead."""
    out: dict[str, float] = {}
    torch_f32, q4 = _find(rows, "torch-f32", "off"), _find(rows, "llama-q4_k_m", "off")
    if torch_f32 and q4:
        out["q4_k_m_over_torch_f32_decode"] = q4.decode_tps / torch_f32.decode_tps
    for name in (n for n in PATHS if PATHS[n].backend == "llama"):
        off, fast = _find(rows, name, "off"), _find(rows, name, "fast")
        if off and fast:
            out[f"{name}_omega_fast_over_off_decode"] = fast.decode_tps / off.decode_tps
    return out


# ------------------------------------------------------------------------------ outputs

COLUMNS = (  # (header, Row field, format)
    ("path", "path", "{}"), ("omega", "omega", "{}"),
    ("prefill t/s", "prefill_tps", "{:.1f}"), ("± sd", "prefill_std", "{:.1f}"),
    ("decode t/s", "decode_tps", "{:.1f}"), ("± sd ", "decode_std", "{:.1f}"),
    ("peak RSS MB", "peak_rss_mb", "{:.0f}"), ("MB/token", "bytes_per_token", "{:.1f}"),
    ("roofline t/s", "roofline_tps", "{:.0f}"), ("roofline %", "roofline_share", "{:.1%}"),
    ("mean KL", "mean_kl", "{:.2e}"), ("top-1", "top1", "{:.1%}"),
    ("= exact", "greedy_match", "{:.0%}"), ("certified", "certified_share", "{:.0%}"),
)


def _cell(row: Row, attr: str, fmt: str) -> str:
    value = getattr(row, attr)
    if attr == "bytes_per_token":
        value = value / 1e6
    if isinstance(value, float) and math.isnan(value):
        return "-"
    return fmt.format(value)


def markdown_table(document: dict[str, Any], rows: Sequence[Row]) -> str:
    lines = ["| " + " | ".join(h for h, _, _ in COLUMNS) + " |",
             "|" + "|".join("---" for _ in COLUMNS) + "|"]
    lines += ["| " + " | ".join(_cell(r, a, f) for _, a, f in COLUMNS) + " |" for r in rows]
    s = document["settings"]
    m = document["machine"]
    lines += ["", f"pp={s['n_prompt']} tg={s['n_gen']} r={s['repetitions']} threads={s['threads']}; "
              f"quality: {s['quality_tokens']} tokens vs the torch-f32 ZPTR head in the same Omega mode; "
              f"fast: greedy tokens equal to exact's, share certified by the bound; memory bandwidth {document['bandwidth_gbs']:.1f} GB/s; "
              f"{m['cpu']}, {m['nproc']} cores, {m['memory_gb']} GB, load {m['load_average_1m']}"]
    lines += [f"{k}: {v:.2f}x" for k, v in document["summary"].items()]
    return "\n".join(lines)


def plot(document: dict[str, Any], rows: Sequence[Row], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [f"{r.path} · omega {r.omega}" for r in rows]
    colors = ["tab:orange" if r.path.startswith("torch") else "tab:blue" for r in rows]
    fig, axes = plt.subplots(1, 2, figsize=(12, 0.45 * len(rows) + 1.8), sharey=True)
    for ax, attr, title in ((axes[0], "prefill", "prefill tokens/s"),
                            (axes[1], "decode", "decode tokens/s")):
        values = [getattr(r, f"{attr}_tps") for r in rows]
        errors = [getattr(r, f"{attr}_std") for r in rows]
        ax.barh(range(len(rows)), values, xerr=errors, color=colors)
        for i, v in enumerate(values):
            ax.text(v, i, f" {v:.0f}", va="center", fontsize=8)
        if attr == "decode":
            roof = [r.roofline_tps for r in rows]
            ax.scatter(roof, range(len(rows)), marker="|", s=200, color="black", label="roofline")
            ax.legend(loc="lower right", fontsize=8)
        ax.set_title(title)
        ax.grid(axis="x", alpha=0.3)
    axes[0].set_yticks(range(len(rows)), labels, fontsize=8)
    axes[0].invert_yaxis()
    s, m = document["settings"], document["machine"]
    fig.suptitle("ZPTR: PyTorch path (orange) vs llama.cpp path (blue)\n"
                 f"pp={s['n_prompt']} tg={s['n_gen']} r={s['repetitions']} t={s['threads']} · "
                 f"{m['cpu']}, {m['nproc']} cores, load {m['load_average_1m']} · "
                 f"bandwidth {document['bandwidth_gbs']:.1f} GB/s", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110, format="png")
    plt.close(fig)


def _atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    with atomic_file(path) as tmp:
        write(tmp)


def write_outputs(document: dict[str, Any], rows: Sequence[Row], output_dir: Path) -> None:
    table = markdown_table(document, rows)
    print(table)

    def write_csv(tmp: Path) -> None:
        with open(tmp, "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(asdict(rows[0])))
            writer.writeheader()
            writer.writerows(asdict(r) for r in rows)

    _atomic_write(output_dir / "bench.json",
                  lambda tmp: tmp.write_text(json.dumps(document, indent=2) + "\n"))
    _atomic_write(output_dir / "bench.csv", write_csv)
    _atomic_write(output_dir / "bench.md", lambda tmp: tmp.write_text(table + "\n"))
    _atomic_write(output_dir / "bench.png", lambda tmp: plot(document, rows, tmp))


# ------------------------------------------------------------------------------ inputs


def ensure_checkpoint(model: str, output_dir: Path) -> Path:
    """A checkpoint directory for ``model``: itself when it is one; for a HF directory or the
    bundled model, an untrained ZPTR head at the golden alpha (deterministic, seed 0), so the
    soul fold and Omega are exercised exactly as a trained checkpoint would."""
    import torch

    from zptr.checkpoint import CONFIG_FILE, save_checkpoint
    from zptr.config import ZptrConfig
    from zptr.head import ZptrHead
    from zptr.model import architecture_of
    from zptr.models import resolve_model_path

    if (Path(model) / CONFIG_FILE).exists():
        return Path(model)
    directory, _ = resolve_model_path(model)
    from transformers import AutoConfig

    hf_config = AutoConfig.from_pretrained(str(directory))
    target = output_dir / "checkpoint-untrained-golden"
    if target.exists():
        return target
    torch.manual_seed(0)
    config = ZptrConfig(hidden_size=hf_config.hidden_size)
    head = ZptrHead(config)
    head.soul.set_alpha(config.schedule.target)
    arch = architecture_of(types.SimpleNamespace(config=hf_config))
    return save_checkpoint(target, head, base_model=str(model), architecture=arch, step=0)


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


def _csv_list(allowed: Sequence[str]) -> Callable[[str], list]:
    def parse(value: str) -> list:
        items = [v.strip() for v in value.split(",") if v.strip()]
        bad = [v for v in items if v not in allowed]
        if bad or not items:
            raise argparse.ArgumentTypeError(f"{value!r}: choose from {', '.join(allowed)}")
        return items
    return parse


def default_paths() -> list[str]:
    import torch

    return [n for n, p in PATHS.items() if not p.needs_cuda or torch.cuda.is_available()]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-m", "--model", default="bundled",
                        help="checkpoint directory, HF model directory or 'bundled' (default)")
    parser.add_argument("-p", "--n-prompt", type=int, default=128, help="prompt tokens (prefill)")
    parser.add_argument("-n", "--n-gen", type=int, default=64, help="generated tokens (decode)")
    parser.add_argument("-r", "--repetitions", type=int, default=3, help="repetitions per test")
    parser.add_argument("-t", "--threads", type=int, default=0, help="threads (0: all cores)")
    parser.add_argument("--paths", type=_csv_list(tuple(PATHS)), default=None,
                        help=f"comma list of {', '.join(PATHS)} (default: all; nf4 needs CUDA)")
    parser.add_argument("--omega", type=_csv_list(OMEGA_MODES), default=list(OMEGA_MODES),
                        help="comma list of Omega modes: off, fast, exact (default: all)")
    parser.add_argument("--text-file", type=Path, default=None,
                        help=f"fixed text for the quality columns (default: {DEFAULT_TEXT.name})")
    parser.add_argument("-o", "--output-dir", type=Path, default=Path("zptr-bench"),
                        help="where bench.json/.csv/.md/.png and converted GGUFs go")
    parser.add_argument("--worker", type=Path, default=None, help=argparse.SUPPRESS)


def main(args: argparse.Namespace) -> int:
    if args.worker is not None:
        return worker_main(args.worker)
    for flag, value in (("-p", args.n_prompt), ("-n", args.n_gen), ("-r", args.repetitions)):
        if value < 1:
            raise BenchError(f"{flag} must be at least 1, got {value}")
    paths = args.paths or default_paths()
    cuda_less = [n for n in paths if PATHS[n].needs_cuda and n not in default_paths()]
    if cuda_less:
        raise BenchError(f"{', '.join(cuda_less)} needs CUDA, which this machine lacks")
    output_dir = args.output_dir
    checkpoint = ensure_checkpoint(args.model, output_dir)
    kinds = [PATHS[n].kind for n in paths if PATHS[n].backend == "llama"]
    ggufs = ensure_ggufs(checkpoint, kinds, output_dir / "models", progress=True)
    run_bench(BenchConfig(checkpoint=checkpoint, output_dir=output_dir, paths=paths,
                          omega=args.omega, n_prompt=args.n_prompt, n_gen=args.n_gen,
                          repetitions=args.repetitions, threads=args.threads,
                          text_file=args.text_file, ggufs=ggufs))
    print(f"\nwrote {', '.join(str(output_dir / f) for f in ('bench.md', 'bench.json', 'bench.csv', 'bench.png'))}")
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="zptr bench")
    add_arguments(parser)
    sys.exit(main(parser.parse_args()))
