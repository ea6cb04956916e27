"""Checkpoint format: bit-exact round trip, verification, refusal of bad input, seed import."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from zptr.checkpoint import (CONFIG_FILE, SOUL_FILE, CheckpointError, build_head, head_tensors,
                             load_checkpoint, save_checkpoint)
from zptr.app.cli import main as cli_main
from zptr.config import ZptrConfig
from zptr.head import ZptrHead
from zptr.model import ZptrModel
from model_fixtures import tiny_model


def _trained_looking_head(kind: str = "so8", hidden: int = 64, alpha: float = 1.618) -> ZptrHead:
    torch.manual_seed(0)
    head = ZptrHead(ZptrConfig(hidden_size=hidden, rotation=kind))
    with torch.no_grad():
        if kind == "so8":
            head.soul.rotation.generator.normal_(std=0.7)
        head.omega.gate.fill_(-1.25)
        head.omega.boundary.weight.normal_()
    head.soul.set_alpha(alpha)
    return head


def _save(path: Path, head: ZptrHead, **kwargs) -> Path:
    return save_checkpoint(path, head, base_model="tiny-llama", architecture="llama", step=42, **kwargs)


@pytest.mark.parametrize("kind", ["so8", "dense"])
def test_round_trip_is_bit_exact(tmp_path, kind):
    head = _trained_looking_head(kind)
    _save(tmp_path / "step_000042", head)
    ckpt = load_checkpoint(tmp_path / "step_000042")
    assert ckpt.step == 42 and ckpt.base_model == "tiny-llama" and ckpt.config == head.config
    restored = build_head(ckpt)
    for name, tensor in head_tensors(head).items():
        assert torch.equal(head_tensors(restored)[name], tensor), name
    h = torch.randn(1, 4, 64)
    from zptr.head import OmegaState
    out_a = head.omega_residual(h, OmegaState.fresh(1, 64))[0]
    out_b = restored.omega_residual(h, OmegaState.fresh(1, 64))[0]
    assert torch.equal(head.soul(out_a), restored.soul(out_b))
    assert ckpt.phase == "golden"


def test_write_is_atomic_and_refuses_to_overwrite(tmp_path):
    head = _trained_looking_head()
    target = _save(tmp_path / "ckpt", head)
    before = (target / SOUL_FILE).read_bytes()
    with pytest.raises(FileExistsError, match="exists"):
        _save(target, _trained_looking_head(alpha=0.0))
    assert (target / SOUL_FILE).read_bytes() == before

    def crash(directory: Path) -> None:
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        _save(tmp_path / "crashed", head, extra_writer=crash)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]  # no partial or temp dir


def test_tampered_file_is_refused_by_name(tmp_path):
    path = _save(tmp_path / "ckpt", _trained_looking_head())
    tensors = load_file(str(path / SOUL_FILE))
    tensors["omega.gate"] = torch.tensor(3.0)
    save_file(tensors, str(path / SOUL_FILE))
    with pytest.raises(CheckpointError, match=r"soul\.safetensors: sha256 mismatch"):
        load_checkpoint(path)


@pytest.mark.parametrize("problem,pattern", [
    ("nan", "NaN or Inf"),
    ("not_orthogonal", "not orthogonal"),
    ("reflection", "not in SO\\(8\\)"),
    ("wrong_shape", "expected \\(8, 8, 8\\)"),
])
def test_bad_soul_tensors_are_refused(tmp_path, problem, pattern):
    path = _save(tmp_path / "ckpt", _trained_looking_head())
    tensors = load_file(str(path / SOUL_FILE))
    rotation = tensors["soul.rotation"]
    if problem == "nan":
        tensors["omega.phase.weight"][0, 0] = float("nan")
    elif problem == "not_orthogonal":
        tensors["soul.rotation"] = rotation * 1.01
    elif problem == "reflection":
        rotation[3, 0] = -rotation[3, 0]  # one block gets det -1, still orthogonal
    else:
        tensors["soul.rotation"] = rotation[:4]
    save_file(tensors, str(path / SOUL_FILE))
    with pytest.raises(CheckpointError, match=pattern):
        load_checkpoint(path, verify=False)


def test_missing_and_corrupt_files(tmp_path):
    path = _save(tmp_path / "ckpt", _trained_looking_head())
    (path / CONFIG_FILE).write_text("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        load_checkpoint(path)
    path = _save(tmp_path / "ckpt2", _trained_looking_head())
    os.remove(path / SOUL_FILE)
    with pytest.raises(CheckpointError, match="soul.safetensors: missing"):
        load_checkpoint(path)
    with pytest.raises(CheckpointError, match="no such checkpoint directory"):
        load_checkpoint(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="neither zptr_config.json nor"):
        load_checkpoint(tmp_path / "empty")


def test_hidden_size_of_checkpoint_must_match_the_base_model(tmp_path):
    ckpt = load_checkpoint(_save(tmp_path / "ckpt", _trained_looking_head(hidden=64)))
    lm = tiny_model("llama", hidden_size=32, intermediate_size=64)
    with pytest.raises(ValueError, match="hidden size"):
        ZptrModel(lm, ckpt.config)


# ------------------------------------------------------------------------------ seed format


def _seed_soul(hidden: int = 64) -> dict:
    """Exactly what the seed's training script saves: alpha tensor + parametrised Linear state."""
    torch.manual_seed(7)
    rotation = nn.utils.parametrizations.orthogonal(nn.Linear(hidden, hidden, bias=False))
    return {"alpha": torch.tensor(0.5), "so8_rotation": rotation.state_dict(), "step": 300}, rotation


def test_seed_format_imports_as_dense_soul(tmp_path):
    blob, rotation = _seed_soul()
    torch.save(blob, tmp_path / "soul.pt")
    ckpt = load_checkpoint(tmp_path)
    assert ckpt.format == "seed" and ckpt.step == 300 and ckpt.config.rotation == "dense"
    assert not ckpt.config.omega.enabled
    assert torch.allclose(ckpt.rotation, rotation.weight.detach(), atol=1e-6)
    assert ckpt.alpha == pytest.approx(0.5)
    head = build_head(ckpt)
    assert torch.allclose(head.soul.rotation.matrix(), rotation.weight.detach(), atol=1e-6)


class _Payload:
    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_pickle_carrying_code_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    payload = _Payload()
    payload.marker = marker
    torch.save({"alpha": payload, "so8_rotation": {}, "step": 1}, tmp_path / "soul.pt")
    with pytest.raises(CheckpointError, match="weights_only"):
        load_checkpoint(tmp_path)
    assert not marker.exists()


# ------------------------------------------------------------------------------ zptr inspect


def test_inspect_reports_and_verifies(tmp_path, capsys):
    path = _save(tmp_path / "ckpt", _trained_looking_head())
    assert cli_main(["inspect", str(path), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["phase"] == "golden" and info["rotation"] == "so8" and info["step"] == 42
    assert info["sigmoid_alpha"] == pytest.approx(1 / (1 + torch.exp(torch.tensor(-1.618)).item()), abs=1e-5)
    assert info["omega"]["gate"] == pytest.approx(-1.25)
    assert info["orthogonality_error"] < 1e-6
    assert SOUL_FILE in info["files_verified"]
    (path / SOUL_FILE).write_bytes((path / SOUL_FILE).read_bytes()[:-8] + b"\0" * 8)
    assert cli_main(["inspect", str(path)]) == 1
    assert "sha256 mismatch" in capsys.readouterr().err


def test_adapter_file_names_are_pefts():
    from peft.utils.constants import CONFIG_NAME, SAFETENSORS_WEIGHTS_NAME

    from zptr.checkpoint import ADAPTER_CONFIG, ADAPTER_WEIGHTS

    assert (ADAPTER_CONFIG, ADAPTER_WEIGHTS) == (CONFIG_NAME, SAFETENSORS_WEIGHTS_NAME)
