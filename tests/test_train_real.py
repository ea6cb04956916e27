"""20 steps of ``zptr train`` on the real SmolLM2-135M with the sample corpus."""

from __future__ import annotations

import json

import pytest

from zptr.app import cli
from zptr.checkpoint import load_checkpoint
from zptr.config import GOLDEN_RATIO
from zptr.dataset import sample_corpus_path


@pytest.mark.slow
def test_smollm2_loss_falls_and_alpha_reaches_golden(tmp_path, capsys):
    # A dozen corpus lines (English, Japanese, chat, origins) seen a few times over 20 steps:
    # the training loss must fall even though the soul's gate opens from 0.007 to 0.83 meanwhile.
    data = tmp_path / "corpus.jsonl"
    data.write_text("".join(sample_corpus_path().read_text(encoding="utf-8").splitlines(True)[:12]),
                    encoding="utf-8")
    out = tmp_path / "run"
    code = cli.main(["train", "--base-model", "bundled", "--data", str(data), "--output-dir", str(out),
                     "--max-steps", "20", "--warmup-steps", "5", "--annealing-steps", "10",
                     "--batch-size", "2", "--max-length", "64", "--learning-rate", "5e-4",
                     "--save-steps", "100", "--no-progress"])
    assert code == 0
    losses = [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == 20
    first, last = sum(losses[:4]) / 4, sum(losses[-4:]) / 4
    with capsys.disabled():  # the figures of the run, for the log
        print(f"\nSmolLM2 20 steps: loss {losses[0]:.3f} -> {losses[-1]:.3f} "
              f"(mean of first four {first:.3f}, last four {last:.3f})")
    assert last < first - 0.3
    final = out / "step_000020"
    assert load_checkpoint(final).alpha == pytest.approx(GOLDEN_RATIO, abs=1e-6)
    capsys.readouterr()
    assert cli.main(["inspect", str(final)]) == 0
    assert "phase: golden" in capsys.readouterr().out
