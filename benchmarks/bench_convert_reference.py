"""The whole ``zptr convert`` to q4_k_m against llama.cpp's own tools on the same ~3B model.

    .venv/bin/python benchmarks/bench_convert_reference.py [--model synthetic-3b] [--repeat 2]

* the model: a llama of Llama 3.2 3B's shape (3.2B parameters, bfloat16, Llama 3.x RoPE, tied
  embeddings) with random weights and a SentencePiece tokenizer (llama.cpp's converter recognises
  byte-level BPE tokenizers by a hash of known releases only), generated once into the cache;
* ZPTR: a checkpoint on it (LoRA r=16 on q/k/v/o with non-zero B, so8 soul at the golden alpha,
  Omega router) converted by ``zptr convert --outtype q4_k_m``: LoRA merged, soul folded and
  rows quantized by ggml in one pass (llama.cpp's type rules), sidecar written;
* the reference: llama.cpp's ``convert_hf_to_gguf.py --outtype f16`` of the plain base (no merge,
  no fold), then llama.cpp's quantizer (``llama_model_quantize``, the function llama-quantize
  runs) to q4_k_m, with the same threads. The script comes from the llama-cpp-python sdist of the
  installed version (``pip download``, cached; nothing of it is committed).

Runs alternate (reference, ZPTR, reference, ...) so a busy machine slows both alike; wall time
and the peak RSS of every process of a run (sampled every 0.1 s) are reported, median and
spread. The load average before each run is printed: figures from a busy machine are flagged.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import psutil

from zptr.app.bench.measure import settle_load
from zptr.models import SYNTHETIC_MODELS, cache_dir, resolve_model_path

QUANTIZE = ("import llama_cpp, sys; p = llama_cpp.llama_model_quantize_default_params(); "
            "p.ftype = llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_K_M; p.nthread = 0; "
            "sys.exit(llama_cpp.llama_model_quantize(sys.argv[1].encode(), sys.argv[2].encode(), p))")


def llama_cpp_source() -> Path:
    """llama.cpp's tree from the sdist of the installed llama-cpp-python, cached."""
    from importlib.metadata import version

    release = version("llama-cpp-python")
    root = cache_dir() / f"llama-cpp-python-{release}-src"
    tree = root / f"llama_cpp_python-{release}" / "vendor" / "llama.cpp"
    if not (tree / "convert_hf_to_gguf.py").is_file():
        root.mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-binary", ":all:", "--no-deps",
                        "-d", str(root), f"llama-cpp-python=={release}"], check=True)
        with tarfile.open(next(root.glob("*.tar.gz"))) as archive:
            archive.extractall(root, filter="data")
    return tree


def measured(cmd: list[str], env: dict | None = None) -> dict:
    """Wall time and peak RSS (the largest any process of the run reached, and their sum)."""
    load = settle_load(90)  # the previous run still raises the load average
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
    root = psutil.Process(proc.pid)
    peak_one = peak_all = 0
    while proc.poll() is None:
        try:
            rss = [p.memory_info().rss for p in [root, *root.children(recursive=True)]]
        except psutil.Error:
            rss = []
        peak_one, peak_all = max([peak_one, *rss]), max(peak_all, sum(rss))
        time.sleep(0.1)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd[:4])} failed:\n{proc.stderr.read()[-2000:]}")
    return {"wall_s": wall, "peak_process_mb": peak_one / 1e6, "peak_total_mb": peak_all / 1e6, "load": load}


def build_checkpoint(base: Path, out: Path) -> Path:
    """A checkpoint on ``base`` whose every part matters, without loading the base: adapter
    tensors written from the config's shapes, an so8 soul at the golden alpha and an Omega router."""
    import torch
    from safetensors.torch import save_file
    from transformers import AutoConfig

    from zptr.checkpoint import save_checkpoint
    from zptr.config import ZptrConfig
    from zptr.head import ZptrHead

    if (out / "zptr_config.json").exists():
        return out
    config = AutoConfig.from_pretrained(str(base))
    head_dim = config.hidden_size // config.num_attention_heads
    outs = {"q_proj": config.num_attention_heads * head_dim, "k_proj": config.num_key_value_heads * head_dim,
            "v_proj": config.num_key_value_heads * head_dim, "o_proj": config.hidden_size}
    ins = {"q_proj": config.hidden_size, "k_proj": config.hidden_size, "v_proj": config.hidden_size,
           "o_proj": config.num_attention_heads * head_dim}
    torch.manual_seed(0)

    def adapter(directory: Path) -> None:
        tensors = {}
        for layer in range(config.num_hidden_layers):
            for name in outs:
                key = f"base_model.model.model.layers.{layer}.self_attn.{name}"
                tensors[f"{key}.lora_A.weight"] = torch.randn(16, ins[name]) * 0.01
                tensors[f"{key}.lora_B.weight"] = torch.randn(outs[name], 16) * 0.01
        save_file(tensors, str(directory / "adapter_model.safetensors"))
        (directory / "adapter_config.json").write_text(json.dumps(
            {"peft_type": "LORA", "r": 16, "lora_alpha": 32, "target_modules": list(outs),
             "base_model_name_or_path": str(base)}))

    head = ZptrHead(ZptrConfig(hidden_size=config.hidden_size))
    head.soul.set_alpha(1.618)
    return save_checkpoint(out, head, base_model=str(base), architecture="llama", step=1, adapter_writer=adapter)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="synthetic-3b", choices=sorted(SYNTHETIC_MODELS))
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--work-dir", type=Path, default=Path("zptr-bench") / "convert-reference")
    args = parser.parse_args()
    args.work_dir.mkdir(parents=True, exist_ok=True)

    base, _ = resolve_model_path(args.model)
    ckpt = build_checkpoint(base, args.work_dir / "checkpoint")
    tree = llama_cpp_source()
    env = dict(os.environ, PYTHONPATH=str(tree / "gguf-py"))
    ref_f16, ref_q4 = args.work_dir / "reference-f16.gguf", args.work_dir / "reference-q4_k_m.gguf"
    ours = args.work_dir / "zptr-q4_k_m.gguf"
    runs: dict[str, list[dict]] = {"reference convert (f16)": [], "reference quantize": [], "zptr convert": []}
    for _ in range(args.repeat):
        for path in (ref_f16, ref_q4):
            path.unlink(missing_ok=True)
        runs["reference convert (f16)"].append(measured(
            [sys.executable, str(tree / "convert_hf_to_gguf.py"), str(base), "--outtype", "f16",
             "--outfile", str(ref_f16)], env))
        runs["reference quantize"].append(measured([sys.executable, "-c", QUANTIZE, str(ref_f16), str(ref_q4)]))
        runs["zptr convert"].append(measured([sys.executable, "-m", "zptr", "convert", str(ckpt), "--outfile",
                                              str(ours), "--outtype", "q4_k_m", "--overwrite", "--no-progress"]))
    print(f"\n{args.model} ({base}): zptr convert vs llama.cpp convert_hf_to_gguf.py + quantize, "
          f"{args.repeat} runs each, alternating")
    print(f"{'step':28} {'wall s (median)':>16} {'spread':>7} {'peak RSS MB (one process)':>26} "
          f"{'load at start':>14}")
    walls = {}
    for name, results in runs.items():
        times = [r["wall_s"] for r in results]
        median = statistics.median(times)
        spread = statistics.stdev(times) / median if len(times) > 1 else 0.0
        walls[name] = median
        print(f"{name:28} {median:16.1f} {spread:7.1%} {max(r['peak_process_mb'] for r in results):26.0f} "
              f"{max(r['load'] for r in results):14.2f}")
    reference = walls["reference convert (f16)"] + walls["reference quantize"]
    print(f"{'reference total':28} {reference:16.1f}")
    print(f"zptr / reference wall time: {walls['zptr convert'] / reference:.2f}x "
          f"(zptr also merges LoRA, folds the soul and writes the sidecar)")
    busy = [r for results in runs.values() for r in results if r["load"] > (os.cpu_count() or 1)]
    if busy:
        print("⚠ noisy: a run started with the load average above the core count")
    return 0


if __name__ == "__main__":
    sys.exit(main())
