"""``zptr bench`` machinery at tiny size: outputs produced, numbers finite and consistent, quality
columns against the float32 ZPTR head meaningful, bad input refused cleanly. No speed asserts."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from zptr.app.bench.measure import measure_bandwidth, measure_compute, noisy_timing, peak_rss_mb
from zptr.runtime.metrics import quality
from zptr.app import cli

from convert_fixtures import make_checkpoint, save_tiny_with_tokenizer, sentencepiece_tokenizer

EXPECTED_ROWS = {("torch-f32", "off"), ("torch-f32", "exact"),
                 ("llama-f16", "off"), ("llama-f16", "fast"), ("llama-f16", "exact")}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """A tiny llama with a LoRA adapter, a golden soul and a strong Omega gate (sigmoid 0.5)."""
    root = tmp_path_factory.mktemp("bench-model")
    sentencepiece_tokenizer(root / "tokenizer")
    base = save_tiny_with_tokenizer("llama", root / "base", root / "tokenizer")
    return make_checkpoint(base, root / "checkpoint")


@pytest.fixture(scope="module")
def bench_run(checkpoint, tmp_path_factory):
    out = tmp_path_factory.mktemp("bench-out") / "out"
    rc = cli.main(["bench", "--model", str(checkpoint), "--paths", "torch-f32,llama-f16",
                   "-p", "12", "-n", "6", "-r", "2", "--settle", "0", "--output-dir", str(out)])
    return rc, out, json.loads((out / "bench.json").read_text())


def test_outputs_written(bench_run):
    rc, out, document = bench_run
    assert rc == 0
    for name in ("bench.json", "bench.csv", "bench.md"):
        assert (out / name).stat().st_size > 0
    assert (out / "bench.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(out.glob(".*.tmp"))
    with open(out / "bench.csv", newline="") as handle:
        csv_rows = list(csv.DictReader(handle))
    assert {(r["path"], r["omega"]) for r in csv_rows} == EXPECTED_ROWS
    table = (out / "bench.md").read_text()
    assert table.startswith("| path | omega | prefill t/s")
    assert table.count("\n| llama-f16") == 3  # one row per Omega mode (flagged when noisy)
    assert document["settings"]["n_prompt"] == 12 and document["settings"]["n_gen"] == 6
    assert document["machine"]["nproc"] >= 1


def test_numbers_finite_and_consistent(bench_run):
    _, _, document = bench_run
    rows = {(r["path"], r["omega"]): r for r in document["rows"]}
    assert set(rows) == EXPECTED_ROWS
    bandwidth = document["bandwidth_gbs"]
    assert math.isfinite(bandwidth) and bandwidth > 0
    for row in rows.values():
        for key in ("prefill_tps", "decode_tps", "peak_rss_mb", "roofline_tps", "roofline_share"):
            assert math.isfinite(row[key]) and row[key] > 0, (row["path"], row["omega"], key)
        assert row["roofline_tps"] == pytest.approx(bandwidth * 1e9 / row["bytes_per_token"])
        assert row["roofline_share"] == pytest.approx(row["decode_tps"] / row["roofline_tps"])
    # f16 weights read about half the bytes of float32 ones.
    ratio = rows[("torch-f32", "off")]["bytes_per_token"] / rows[("llama-f16", "off")]["bytes_per_token"]
    assert 1.5 < ratio < 2.5
    summary = document["summary"]
    assert summary["llama-f16_omega_fast_over_off_decode"]["ratio"] == pytest.approx(
        rows[("llama-f16", "fast")]["decode_tps"] / rows[("llama-f16", "off")]["decode_tps"])


def test_quality_columns(bench_run):
    _, _, document = bench_run
    rows = {(r["path"], r["omega"]): r for r in document["rows"]}
    for mode in ("off", "exact"):  # the reference against itself
        assert rows[("torch-f32", mode)]["mean_kl"] == pytest.approx(0.0, abs=1e-12)
        assert rows[("torch-f32", mode)]["top1"] == 1.0
        llama = rows[("llama-f16", mode)]
        assert llama["top1"] >= 0.9, mode
        assert 0.0 <= llama["mean_kl"] < 1e-3, mode
    fast = rows[("llama-f16", "fast")]
    assert fast["greedy_match"] == 1.0  # fast must reproduce exact's greedy tokens
    assert 0.0 <= fast["certified_share"] <= 1.0
    assert math.isnan(fast["mean_kl"])


def test_quality_function_against_hand_computation():
    reference = np.log(np.array([[0.5, 0.25, 0.25], [0.1, 0.6, 0.3]]))
    other = np.log(np.array([[0.25, 0.5, 0.25], [0.1, 0.6, 0.3]])) + 3.0  # a shift changes nothing
    kl, top1 = quality(reference, other)
    expected = (0.5 * math.log(2) + 0.25 * math.log(0.5)) / 2
    assert kl == pytest.approx(expected, rel=1e-9)
    assert top1 == 0.5


def test_bandwidth_and_peak_rss_measured():
    assert 0 < measure_bandwidth(threads=2, size_mb=16, repeats=1) < 10_000
    assert 0 < measure_compute(threads=2, size=256, repeats=1) < 1e6
    assert peak_rss_mb() > 10


@pytest.mark.parametrize("argv, message", [
    (["-p", "0"], "-p must be at least 1"),
    (["--model", "/nonexistent/model"], "/nonexistent/model"),
])
def test_bad_input_refused(argv, message, tmp_path, capsys):
    rc = cli.main(["bench", *argv, "--output-dir", str(tmp_path / "out")])
    assert rc == 1
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out" / "bench.json").exists()


def test_unknown_path_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["bench", "--paths", "llama-q3_xs"])
    assert exit_info.value.code == 2
    assert "choose from" in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_nf4_needs_cuda(tmp_path, capsys):
    assert cli.main(["bench", "--paths", "torch-nf4", "--output-dir", str(tmp_path)]) == 1
    assert "needs CUDA" in capsys.readouterr().err


def test_missing_text_file_writes_nothing(checkpoint, tmp_path, capsys):
    rc = cli.main(["bench", "--model", str(checkpoint), "--paths", "torch-f32",
                   "--text-file", str(tmp_path / "missing.txt"), "--output-dir", str(tmp_path / "out")])
    assert rc == 1
    assert "missing.txt" in capsys.readouterr().err
    assert not (tmp_path / "out" / "bench.json").exists()


def test_noise_flag_on_an_artificially_noisy_series(tmp_path):
    """A row whose repetitions spread more than 10 % is flagged, as is every row of a run that
    started on a busy machine; ratios built on a flagged row say so."""
    from zptr.app.bench.paths import WorkerJob, WorkerResult
    from zptr.app.bench.report import build_rows, markdown_table, summary

    logits = np.random.default_rng(0).standard_normal((4, 8))
    for mode in ("off", "exact"):
        np.save(tmp_path / f"torch-f32.{mode}.npy", logits)
        np.save(tmp_path / f"llama-q4_k_m.{mode}.npy", logits)
    reference = {mode: tmp_path / f"torch-f32.{mode}.npy" for mode in ("off", "exact")}
    job = WorkerJob(name="llama-q4_k_m", modes=["off", "fast"], checkpoint="c", prompt=[1], text=[1],
                    n_gen=4, repetitions=5, threads=2, timing=True, workdir=str(tmp_path))
    quiet = {"prefill": [500.0, 505, 498, 502, 501], "decode": [100.0, 101, 99, 100, 102], "tokens": [1, 2]}
    noisy = {"prefill": [500.0, 505, 498, 502, 501], "decode": [100.0, 60, 140, 90, 130], "tokens": [1, 2]}
    result = WorkerResult(modes={"off": quiet, "fast": noisy}, peak_rss_mb=1.0, bytes_per_token=10,
                          parameters=10)
    rows = build_rows(job, result, reference, busy=False)
    assert [r.noisy for r in rows] == [False, True]
    assert rows[1].decode_spread > 0.10 >= rows[0].decode_spread
    ratios = summary(rows)
    assert ratios["llama-q4_k_m_omega_fast_over_off_decode"]["noisy"] is True
    assert all(r.noisy for r in build_rows(job, result, reference, busy=True))
    document = {"settings": dict(n_prompt=1, n_gen=4, repetitions=5, threads=2, quality_tokens=4),
                "machine": dict(cpu="x", nproc=2, memory_gb=1, load_average_1m=0.5),
                "bandwidth_gbs": 1.0, "compute_gflops": 1.0, "summary": ratios}
    table = markdown_table(document, rows)
    assert "| llama-q4_k_m ⚠ | fast" in table and "not a result to file" in table


def test_a_noisy_path_runs_again_alone_and_its_last_run_is_kept(monkeypatch, tmp_path):
    """run_path_until_quiet re-runs a path while a figure is noisy, at most ``retries`` more times,
    and reports the run it stopped at whole; a quiet first run is not repeated."""
    from zptr.app.bench import run
    from zptr.app.bench.paths import WorkerJob, WorkerResult
    from zptr.app.bench.report import markdown_table

    def result(decode):
        timing = {"prefill": [500.0, 501, 499], "decode": decode, "tokens": [1]}
        return WorkerResult(modes={"off": timing, "fast": dict(timing)}, peak_rss_mb=1.0,
                            bytes_per_token=10, parameters=10)

    noisy, quiet = result([100.0, 60, 140]), result([100.0, 101, 99])
    job = WorkerJob(name="llama-q4_k_m", modes=["off", "fast"], checkpoint="c", prompt=[1], text=[1],
                    n_gen=4, repetitions=3, threads=2, timing=True, workdir=str(tmp_path))
    for sequence, retries, expected_runs, kept in (([noisy, noisy, quiet, noisy], 2, 3, quiet),
                                                   ([noisy, noisy, noisy, quiet], 2, 3, noisy),
                                                   ([quiet, noisy], 2, 1, quiet),
                                                   ([noisy, quiet], 0, 1, noisy)):
        calls = iter(sequence)
        monkeypatch.setattr(run, "run_worker", lambda _job, calls=calls: next(calls))
        got, runs = run.run_path_until_quiet(job, retries)
        assert (got, runs) == (kept, expected_runs)
    assert noisy_timing(noisy.modes["off"]) and not noisy_timing(quiet.modes["off"])
    document = {"settings": dict(n_prompt=1, n_gen=4, repetitions=3, threads=2, quality_tokens=4),
                "machine": dict(cpu="x", nproc=2, memory_gb=1, load_average_1m=0.5),
                "bandwidth_gbs": 1.0, "compute_gflops": 1.0, "summary": {},
                "runs": {"torch-f32": 1, "llama-q4_k_m": 3}}
    assert "run again while noisy (runs, the last reported): llama-q4_k_m 3" in markdown_table(document, [])


def test_settle_waits_for_the_load_to_fall_below_the_core_count(monkeypatch):
    """The load average trails by a minute: a run started right after the bench's own conversions
    waits for it to fall, up to a limit, and reports the load it starts at."""
    from zptr.app.bench import measure

    clock = {"now": 0.0}
    loads = iter([3.0, 2.5, 2.1, 1.4, 1.4])
    monkeypatch.setattr(measure.os, "cpu_count", lambda: 2)
    monkeypatch.setattr(measure.os, "getloadavg", lambda: (next(loads), 0.0, 0.0))
    monkeypatch.setattr(measure.time, "monotonic", lambda: clock["now"])
    monkeypatch.setattr(measure.time, "sleep", lambda s: clock.__setitem__("now", clock["now"] + s))
    assert measure.settle_load(60) == 1.4 and clock["now"] == 6.0

    loads = iter([2.5] * 100)
    clock["now"] = 0.0
    assert measure.settle_load(5) == 2.5 and clock["now"] == 6.0  # gave up after the limit

