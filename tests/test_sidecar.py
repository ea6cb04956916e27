"""The Omega sidecar GGUF: round trip, atomic write, pairing and every defect refused clearly."""

from pathlib import Path

import numpy as np
import pytest
import torch

from zptr.formats.sidecar import (SIDECAR_ARCH, SidecarError, check_pairing, expected_shapes, read_sidecar,
                                  sidecar_path_for, write_sidecar)
from zptr.checkpoint import head_tensors
from zptr.config import ZptrConfig
from zptr.head import ZptrHead

HIDDEN = 16


def _omega(hidden=HIDDEN, routing="threshold"):
    torch.manual_seed(0)
    config = ZptrConfig(hidden_size=hidden)
    config.omega.routing = routing
    config.omega.boundary_threshold = 0.7
    head = ZptrHead(config)
    with torch.no_grad():
        head.omega.gate.fill_(1.25)
    tensors = {k: v for k, v in head_tensors(head).items() if k.startswith("omega.")}
    return tensors, config


@pytest.fixture()
def model_file(tmp_path) -> Path:
    path = tmp_path / "m.gguf"
    path.write_bytes(b"pretend model bytes")
    return path


def test_the_sidecar_table_names_every_router_tensor_of_a_checkpoint():
    """The tensor-name table (zptr.tensor_names) and the router module agree: a checkpoint's
    omega.* tensors are exactly the ones a sidecar must hold, shapes included."""
    tensors, _ = _omega()
    assert {name: tuple(value.shape) for name, value in tensors.items()} == expected_shapes(HIDDEN)


def test_round_trip(tmp_path, model_file):
    tensors, config = _omega(routing="resonance")
    out = write_sidecar(sidecar_path_for(model_file), tensors, config.omega, config.hidden_size, model_file)
    assert out == tmp_path / "m.omega.gguf" and out.is_file()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
    side = read_sidecar(out)
    assert side.hidden_size == HIDDEN
    assert side.config.routing == "resonance"
    assert side.config.boundary_threshold == pytest.approx(0.7)
    assert side.config.origin_scale == pytest.approx(2.5)
    assert side.gate == pytest.approx(1.25)
    assert side.model_file == "m.gguf"
    assert set(side.tensors) == set(tensors)
    for name, value in tensors.items():
        assert side.tensors[name].dtype == np.float32
        np.testing.assert_array_equal(side.tensors[name], value.numpy())
    check_pairing(side, model_file, HIDDEN)  # pairs: no error


def test_sidecar_path_for():
    assert sidecar_path_for(Path("/a/x.q4_k_m.gguf")) == Path("/a/x.q4_k_m.omega.gguf")


def test_pairing_refuses_other_model_and_hidden_size(tmp_path, model_file):
    tensors, config = _omega()
    side = read_sidecar(write_sidecar(tmp_path / "s.omega.gguf", tensors, config.omega, config.hidden_size, model_file))
    other = tmp_path / "other.gguf"
    other.write_bytes(b"another model")
    with pytest.raises(SidecarError, match="sha256 mismatch"):
        check_pairing(side, other, HIDDEN)
    with pytest.raises(SidecarError, match="hidden size 16.*has 32"):
        check_pairing(side, model_file, 32)


@pytest.mark.parametrize("damage, message", [
    (lambda data: data[: len(data) // 2], "truncated|corrupt"),
    (lambda data: b"NOTAGGUF" + data[8:], "not a GGUF file"),
    (lambda data: b"", "not a GGUF file"),
])
def test_corrupt_files_refused(tmp_path, model_file, damage, message):
    tensors, config = _omega()
    path = write_sidecar(tmp_path / "s.omega.gguf", tensors, config.omega, config.hidden_size, model_file)
    path.write_bytes(damage(path.read_bytes()))
    with pytest.raises(SidecarError, match=message):
        read_sidecar(path)


def test_wrong_architecture_refused(tmp_path):
    import gguf

    path = tmp_path / "llama.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_tensor("x", np.zeros(4, np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(SidecarError, match=f"'llama', not an Omega sidecar .*{SIDECAR_ARCH}"):
        read_sidecar(path)
    with pytest.raises(SidecarError, match="not found"):
        read_sidecar(tmp_path / "missing.omega.gguf")


def test_nan_refused_and_nothing_written(tmp_path, model_file):
    tensors, config = _omega()
    tensors["omega.phase.weight"][0, 0] = float("nan")
    target = tmp_path / "s.omega.gguf"
    with pytest.raises(SidecarError, match="omega.phase.weight contains NaN"):
        write_sidecar(target, tensors, config.omega, config.hidden_size, model_file)
    assert list(tmp_path.iterdir()) == [model_file]


def test_failed_write_leaves_no_file(tmp_path, model_file):
    tensors, config = _omega()
    missing_model = tmp_path / "absent.gguf"  # hashing fails mid-write
    with pytest.raises(FileNotFoundError):
        write_sidecar(tmp_path / "s.omega.gguf", tensors, config.omega, config.hidden_size, missing_model)
    assert list(tmp_path.iterdir()) == [model_file]


def test_missing_tensor_refused(tmp_path, model_file):
    tensors, config = _omega()
    del tensors["omega.experts_weight"]
    path = write_sidecar(tmp_path / "s.omega.gguf", tensors, config.omega, config.hidden_size, model_file)
    with pytest.raises(SidecarError, match="omega.experts_weight missing"):
        read_sidecar(path)
