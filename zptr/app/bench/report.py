"""``zptr bench``'s results: one row per path and Omega mode, the headline ratios, and the table,
CSV, JSON and chart they are written as.

Every speed figure is a median with its spread (sd / median); a row whose spread exceeds 10 %,
or a run started with the load average above the core count, is flagged ``noisy`` and its
ratios are not headlines. Two ceilings frame each path: decode is memory-bound (bandwidth ÷
weight bytes a token reads), prefill compute-bound (float32 matrix peak ÷ 2 × weights).
"""

from __future__ import annotations

import csv
import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np

from zptr.fileio import Outputs
from zptr.runtime.metrics import quality

from .measure import NOISY_SPREAD, median_spread, noisy_timing
from .paths import PATHS, REFERENCE_PATH, WorkerJob, WorkerResult


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
    parameters: int
    prefill_spread: float = math.nan
    decode_spread: float = math.nan
    noisy: bool = False
    roofline_tps: float = math.nan  # decode ceiling: memory bandwidth / bytes per token
    roofline_share: float = math.nan
    compute_roof_tps: float = math.nan  # prefill ceiling: compute peak / (2 x weights)
    compute_share: float = math.nan
    mean_kl: float = math.nan
    top1: float = math.nan
    greedy_match: float = math.nan  # fast only: share of greedy tokens equal to exact's
    certified_share: float = math.nan  # fast only: tokens the bound certified (no fallback)


def build_rows(job: WorkerJob, result: WorkerResult, reference: dict[str, Path], busy: bool) -> list[Row]:
    rows = []
    for mode, timing in result.modes.items():
        prefill, prefill_sd, prefill_spread = median_spread(timing["prefill"])
        decode, decode_sd, decode_spread = median_spread(timing["decode"])
        row = Row(path=job.name, omega=mode, prefill_tps=prefill, prefill_std=prefill_sd,
                  decode_tps=decode, decode_std=decode_sd, peak_rss_mb=result.peak_rss_mb,
                  bytes_per_token=result.bytes_per_token, parameters=result.parameters,
                  prefill_spread=prefill_spread, decode_spread=decode_spread,
                  noisy=busy or noisy_timing(timing),
                  certified_share=timing.get("certified_share", math.nan))
        # Quality against the float32 head in the same mode. teacher_forced is exact in both
        # Omega-on modes, so fast is checked by its greedy tokens equalling exact's instead.
        if mode == "fast":
            if "exact" in result.modes:
                row.greedy_match = float(np.mean(np.equal(timing["tokens"], result.modes["exact"]["tokens"])))
        else:
            row.mean_kl, row.top1 = quality(np.load(reference[mode]), np.load(job.logits_file(mode)))
        rows.append(row)
    return rows


def add_ceilings(rows: Sequence[Row], bandwidth_gbs: float, compute_gflops: float) -> None:
    for row in rows:
        row.roofline_tps = bandwidth_gbs * 1e9 / row.bytes_per_token
        row.roofline_share = row.decode_tps / row.roofline_tps
        row.compute_roof_tps = compute_gflops * 1e9 / (2 * row.parameters)
        row.compute_share = row.prefill_tps / row.compute_roof_tps


def _find(rows: Sequence[Row], path: str, omega: str) -> Optional[Row]:
    return next((r for r in rows if r.path == path and r.omega == omega), None)


def summary(rows: Sequence[Row]) -> dict[str, dict[str, Any]]:
    """The headline ratios: llama.cpp q4_k_m over PyTorch float32 decode; per llama.cpp path,
    Omega fast and exact over off (decode and prefill). Each says whether a noisy row is in it."""
    out: dict[str, dict[str, Any]] = {}

    def ratio(name: str, top: Optional[Row], bottom: Optional[Row], attr: str) -> None:
        if top and bottom:
            out[name] = {"ratio": getattr(top, attr) / getattr(bottom, attr), "noisy": top.noisy or bottom.noisy}

    ratio("q4_k_m_over_torch_f32_decode", _find(rows, "llama-q4_k_m", "off"), _find(rows, REFERENCE_PATH, "off"),
          "decode_tps")
    for name in (n for n in PATHS if PATHS[n].backend == "llama"):
        off = _find(rows, name, "off")
        for mode in ("fast", "exact"):
            ratio(f"{name}_omega_{mode}_over_off_decode", _find(rows, name, mode), off, "decode_tps")
            ratio(f"{name}_omega_{mode}_over_off_prefill", _find(rows, name, mode), off, "prefill_tps")
    return out


COLUMNS = (  # (header, Row field, format)
    ("path", "path", "{}"), ("omega", "omega", "{}"),
    ("prefill t/s", "prefill_tps", "{:.1f}"), ("± sd", "prefill_std", "{:.1f}"),
    ("decode t/s", "decode_tps", "{:.1f}"), ("± sd ", "decode_std", "{:.1f}"),
    ("peak RSS MB", "peak_rss_mb", "{:.0f}"), ("MB/token", "bytes_per_token", "{:.1f}"),
    ("decode roof t/s", "roofline_tps", "{:.0f}"), ("of roof", "roofline_share", "{:.1%}"),
    ("prefill roof t/s", "compute_roof_tps", "{:.0f}"), ("of roof ", "compute_share", "{:.1%}"),
    ("mean KL", "mean_kl", "{:.2e}"), ("top-1", "top1", "{:.1%}"),
    ("= exact", "greedy_match", "{:.0%}"), ("certified", "certified_share", "{:.0%}"),
)


def _cell(row: Row, attr: str, fmt: str) -> str:
    value = getattr(row, attr)
    if attr == "bytes_per_token":
        value = value / 1e6
    if isinstance(value, float) and math.isnan(value):
        return "-"
    text = fmt.format(value)
    return f"{text} ⚠" if attr == "path" and row.noisy else text


def markdown_table(document: dict[str, Any], rows: Sequence[Row]) -> str:
    lines = ["| " + " | ".join(h for h, _, _ in COLUMNS) + " |",
             "|" + "|".join("---" for _ in COLUMNS) + "|"]
    lines += ["| " + " | ".join(_cell(r, a, f) for _, a, f in COLUMNS) + " |" for r in rows]
    s, m = document["settings"], document["machine"]
    lines += ["", f"pp={s['n_prompt']} tg={s['n_gen']} r={s['repetitions']} threads={s['threads']}; "
              f"quality: {s['quality_tokens']} tokens vs the torch-f32 ZPTR head in the same Omega mode; "
              "fast: greedy tokens equal to exact's, share certified by the bound; "
              f"memory bandwidth {document['bandwidth_gbs']:.1f} GB/s, float32 matrix peak "
              f"{document['compute_gflops']:.0f} GFLOP/s; {m['cpu']}, {m['nproc']} cores, "
              f"{m['memory_gb']} GB, load {m['load_average_1m']}"]
    rerun = {name: runs for name, runs in document.get("runs", {}).items() if runs > 1}
    if rerun:
        lines.append("run again while noisy (runs, the last reported): "
                     + ", ".join(f"{name} {runs}" for name, runs in rerun.items()))
    if any(r.noisy for r in rows):
        lines.append(f"⚠ noisy: spread (sd / median) above {NOISY_SPREAD:.0%}, or the machine was busy "
                     "(load above its core count) — not a result to file")
    lines += [f"{k}: {v['ratio']:.2f}x{' ⚠' if v['noisy'] else ''}" for k, v in document["summary"].items()]
    return "\n".join(lines)


def plot(document: dict[str, Any], rows: Sequence[Row], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [f"{r.path} · omega {r.omega}{' (noisy)' if r.noisy else ''}" for r in rows]
    colors = ["tab:orange" if r.path.startswith("torch") else "tab:blue" for r in rows]
    fig, axes = plt.subplots(1, 2, figsize=(12, 0.45 * len(rows) + 1.8), sharey=True)
    for ax, attr, roof, title in ((axes[0], "prefill", "compute_roof_tps", "prefill tokens/s"),
                                  (axes[1], "decode", "roofline_tps", "decode tokens/s")):
        values = [getattr(r, f"{attr}_tps") for r in rows]
        errors = [getattr(r, f"{attr}_std") for r in rows]
        ax.barh(range(len(rows)), values, xerr=errors, color=colors)
        for i, v in enumerate(values):
            ax.text(v, i, f" {v:.0f}", va="center", fontsize=8)
        ax.scatter([getattr(r, roof) for r in rows], range(len(rows)), marker="|", s=200,
                   color="black", label="ceiling")
        ax.legend(loc="lower right", fontsize=8)
        ax.set_xscale("log")
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


def write_outputs(document: dict[str, Any], rows: Sequence[Row], output_dir: Path) -> None:
    """bench.md / .json / .csv / .png in ``output_dir``, together; the table also on stdout."""
    table = markdown_table(document, rows)
    print(table)
    with Outputs(overwrite=True) as out:
        out.file(output_dir / "bench.json").write_text(json.dumps(document, indent=2) + "\n")
        out.file(output_dir / "bench.md").write_text(table + "\n")
        with open(out.file(output_dir / "bench.csv"), "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(asdict(rows[0])))
            writer.writeheader()
            writer.writerows(asdict(r) for r in rows)
        plot(document, rows, out.file(output_dir / "bench.png"))
