"""Converter wall time, peak memory and q4_k_m fidelity on the bundled SmolLM2-135M.

    .venv/bin/python benchmarks/bench_convert.py [--outtypes f32 f16 q8_0 q4_k_m] [--no-quality]

1. A SmolLM2 checkpoint is built (LoRA r=16 with non-zero B, so8 soul at alpha = 1.618, Omega).
2. Speed and memory: each conversion runs in a fresh subprocess (its peak RSS is its own; the RSS
   after imports is reported next to it). In the same run, interleaved with the conversions, the
   floor: reading the base weights' bytes and writing as many bytes as the f32 GGUF holds, with
   plain buffered file I/O. Best of ``--repeat`` runs on both sides.
   Targets (docs/design.md, "Targets"): conversion <= 2x the floor; peak RSS <= 3 x largest tensor in f32 + 500 MB.
3. Fidelity (unless ``--no-quality``): q4_k_m mean KL and top-1 against the PyTorch ZPTR head on
   the mixed text, folded, next to the same merged model converted without the soul (the soul
   applied afterwards in float64 to llama.cpp's h_t, the unfolded alternative) and the plain base.
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# The test models and references (model_fixtures) live with the tests: they do not ship.
sys.path.insert(0, str(ROOT / "tests"))
CHUNK = 16 << 20


def rss_now() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def child(args: argparse.Namespace) -> None:
    """One conversion in this process; prints one JSON line. Library imports (torch,
    transformers' config classes) are timed apart: a fixed cost, not proportional to the model."""
    start = time.perf_counter()
    from transformers import AutoConfig

    from zptr.convert import convert_model

    AutoConfig.for_model("llama")  # loads the config module chain the conversion would import
    imports = time.perf_counter() - start
    baseline = rss_now()
    start = time.perf_counter()
    convert_model(args.source, args.outfile, args.outtype, overwrite=True, progress=False)
    wall = time.perf_counter() - start
    print(json.dumps({"wall_s": wall, "imports_s": imports, "baseline_rss": baseline,
                      "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))


def floor(sources: list[Path], target: Path, out_bytes: int) -> float:
    """Read every source byte, write ``out_bytes`` bytes: the I/O any converter must do."""
    start = time.perf_counter()
    written = 0
    with open(target, "wb") as out:
        for source in sources:
            with open(source, "rb") as handle:
                while block := handle.read(CHUNK):
                    if written < out_bytes:
                        out.write(block[: out_bytes - written])
                        written += min(len(block), out_bytes - written)
        while written < out_bytes:
            block = b"\0" * min(CHUNK, out_bytes - written)
            out.write(block)
            written += len(block)
    wall = time.perf_counter() - start
    target.unlink()
    return wall


def largest_tensor_f32(directory: Path) -> tuple[str, int]:
    from safetensors import safe_open

    best = ("", 0)
    for file in directory.glob("*.safetensors"):
        with safe_open(str(file), framework="pt") as handle:
            for name in handle.keys():
                size = 4 * math.prod(handle.get_slice(name).get_shape())
                best = max(best, (name, size), key=lambda item: item[1])
    return best


def build_checkpoint(base: Path, out: Path) -> Path:
    from model_fixtures import make_checkpoint

    return make_checkpoint(base, out)


def run_child(source: Path, outfile: Path, outtype: str) -> dict:
    cmd = [sys.executable, __file__, "--child", "--source", str(source), "--outfile", str(outfile),
           "--outtype", outtype]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def quality(work: Path, base: Path, ckpt: Path) -> dict[str, dict]:
    from model_fixtures import MIXED_TEXT, reference_model, torch_logits
    from zptr.convert import convert_model
    from zptr.convert.hf_export import export_hf
    from zptr.convert.merge import LoraAdapter, MergedModel, SafetensorsWeights
    from transformers import AutoConfig

    from zptr.models import load_tokenizer
    from zptr.runtime.llama import teacher_logits
    from zptr.runtime.metrics import compare
    from zptr.runtime.reference import unfolded_soul_logits

    ids = load_tokenizer(base)(MIXED_TEXT, add_special_tokens=False).input_ids
    reference = torch_logits(reference_model(ckpt, base), ids)
    folded = convert_model(ckpt, work / "folded-q4_k_m.gguf", "q4_k_m", overwrite=True, progress=False)
    merged = work / "merged-unfolded"
    shutil.rmtree(merged, ignore_errors=True)
    merged.mkdir()
    export_hf(MergedModel(SafetensorsWeights(base), AutoConfig.from_pretrained(str(base)), LoraAdapter(ckpt)),
              base, merged, progress=False)
    unfolded = convert_model(merged, work / "unfolded-q4_k_m.gguf", "q4_k_m", overwrite=True, progress=False)
    plain = convert_model(base, work / "base-q4_k_m.gguf", "q4_k_m", overwrite=True, progress=False)
    return {
        "folded (ZPTR head)": compare(reference, teacher_logits(folded.model_path, ids)[1]),
        "unfolded, soul applied to h_t": compare(reference, unfolded_soul_logits(unfolded.model_path, ids, ckpt)),
        "plain base vs base": compare(torch_logits(reference_model(None, base), ids),
                                      teacher_logits(plain.model_path, ids)[1]),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--outtypes", nargs="+", default=["f32", "f16", "q8_0", "q4_k_m"])
    parser.add_argument("--repeat", type=int, default=2, help="runs per out type (best wall time is reported)")
    parser.add_argument("--no-quality", action="store_true", help="skip the q4_k_m fidelity figures")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--source", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--outfile", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--outtype", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return 0

    from zptr.models import smollm2_hf_dir

    base = smollm2_hf_dir()
    with tempfile.TemporaryDirectory(prefix="bench-convert-") as tmp:
        work = Path(tmp)
        ckpt = build_checkpoint(base, work / "ckpt")
        sources = sorted(base.glob("*.safetensors")) + [ckpt / "adapter_model.safetensors", ckpt / "soul.safetensors"]
        for source in sources:  # warm the page cache so floor and conversion read alike
            floor([source], work / "warm", 0)
        name, largest = largest_tensor_f32(base)
        target_rss = 3 * largest + 500e6
        rows = []
        f32_bytes = None
        for outtype in args.outtypes:
            # Best of --repeat for both sides, interleaved: a busy machine slows either at random.
            runs, floors = [], []
            for _ in range(args.repeat):
                runs.append(run_child(ckpt, work / f"smol-{outtype}.gguf", outtype))
                out_bytes = (work / f"smol-{outtype}.gguf").stat().st_size
                f32_bytes = out_bytes if outtype == "f32" else f32_bytes
                floors.append(floor(sources, work / "floor.bin", f32_bytes or out_bytes))
            best = min(runs, key=lambda r: r["wall_s"])
            best["peak_rss"] = max(r["peak_rss"] for r in runs)
            rows.append((outtype, best, out_bytes, min(floors)))
        print(f"\nSmolLM2-135M checkpoint -> GGUF (largest tensor {name}: {largest / 1e6:.0f} MB in f32; "
              f"RSS target 3x + 500 MB = {target_rss / 1e6:.0f} MB)")
        print(f"{'outtype':8} {'convert s':>9} {'floor s':>8} {'ratio':>6} {'imports s':>9} {'out MB':>8} "
              f"{'peak RSS MB':>12} {'after imports MB':>17} {'RSS ok':>7}")
        for outtype, result, out_bytes, floor_s in rows:
            print(f"{outtype:8} {result['wall_s']:9.2f} {floor_s:8.2f} {result['wall_s'] / floor_s:6.2f} "
                  f"{result['imports_s']:9.2f} {out_bytes / 1e6:8.1f} {result['peak_rss'] / 1e6:12.0f} "
                  f"{result['baseline_rss'] / 1e6:17.0f} {str(result['peak_rss'] <= target_rss):>7}")
        print("convert s: convert_model() from checkpoint to final files (sidecar, its sha256 included), "
              f"after library imports (imports s, a fixed cost); best of {args.repeat}, peak RSS the highest")
        print("floor s: read the base + adapter + soul bytes and write as many bytes as the f32 GGUF (for out types "
              "other than f32: as the f32 GGUF when it ran first), same run, best of the runs")
        if not args.no_quality:
            print("\nq4_k_m fidelity on the mixed text (teacher-forced, llama.cpp KV cache f32):")
            for label, figures in quality(work, base, ckpt).items():
                print(f"  {label:32} mean KL {figures['mean_kl']:.4f}  top-1 {100 * figures['top1']:.1f} %  "
                      f"({figures['n']} tokens)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
