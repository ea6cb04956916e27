"""Fuzzing the command line and the files it reads.

Corrupted inputs are enumerated: every key of the JSON files ZPTR reads swapped to each wrong
type, every section of a GGUF model and sidecar truncated, random bytes in every file, NaN in
every tensor kind. The argument space of the commands is sampled with Hypothesis. For every
refused input: exit code != 0, no traceback, one line naming the file or argument, no new file in
the output directory, the inputs byte-identical afterwards.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
from pathlib import Path
from typing import Any, Iterator

import gguf
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

from zptr.app.cli import main as zptr_main
from zptr.checkpoint import CONFIG_FILE, SOUL_FILE
from zptr.convert import convert_model
from zptr.fileio import sha256_file
from zptr.formats.sidecar import sidecar_path_for
from model_fixtures import build_tokenizer, make_checkpoint, save_tiny_model

TRIED: dict[str, int] = {}  # kind of input -> distinct inputs tried (printed at the end)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("fuzz")
    tokenizer = build_tokenizer("sentencepiece", root / "tokenizer")
    base = save_tiny_model("llama", root / "base", tokenizer=tokenizer)
    ckpt = make_checkpoint(base, root / "ckpt")
    model = convert_model(ckpt, root / "model.gguf", "f32", progress=False).model_path
    with contextlib.redirect_stderr(io.StringIO()), contextlib.redirect_stdout(io.StringIO()):
        assert zptr_main(["train", "--base-model", str(base), "--output-dir", str(root / "run"),
                          "--max-steps", "1", "--max-length", "16", "--no-progress"]) == 0
    return {"root": root, "base": base, "ckpt": ckpt, "model": model, "trained": root / "run" / "step_000001"}


def files_of(*paths: Path) -> dict[str, str]:
    found = {}
    for path in paths:
        for file in ([path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())):
            found[str(file)] = sha256_file(file)
    return found


def zptr(argv: list) -> tuple[int, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = zptr_main([str(a) for a in argv])
        except SystemExit as exit_:  # argparse's usage errors
            code = exit_.code
    return code, err.getvalue()


def assert_refused(argv: list, inputs: list[Path], outdir: Path, names: tuple[str, ...], kind: str) -> None:
    before_inputs, before_out = files_of(*inputs), sorted(os.listdir(outdir))
    code, err = zptr(argv)
    lines = [line for line in err.splitlines() if line.strip()]
    assert code not in (0, 70), (argv, err)
    assert "Traceback" not in err and lines, (argv, err)
    assert len(lines) == 1 or code == 2, (argv, err)  # argparse adds its usage line
    assert any(name in lines[-1] for name in names), (argv, names, err)
    assert sorted(os.listdir(outdir)) == before_out, (argv, err)
    assert files_of(*inputs) == before_inputs, argv
    TRIED[kind] = TRIED.get(kind, 0) + 1


def json_paths(value: Any, prefix: tuple = ()) -> Iterator[tuple[tuple, Any]]:
    """Every key path of a JSON document with its value (objects recursively)."""
    if isinstance(value, dict):
        for key, item in value.items():
            yield prefix + (key,), item
            yield from json_paths(item, prefix + (key,))


def wrong_values(value: Any) -> list[Any]:
    """Values of a type that can never replace ``value`` (its own type's neighbours excluded:
    an int stands for a float, a None for an optional string)."""
    candidates = [None, "forty", 1.5, 7, True, [], {"x": 1}, float("nan")]
    kind = type(value)
    def compatible(other: Any) -> bool:
        if kind is bool:
            return isinstance(other, bool)
        if kind is float:
            return isinstance(other, (int, float)) and not isinstance(other, bool) and other == other
        if kind is int:
            return isinstance(other, int) and not isinstance(other, bool)
        if kind is str:
            return other is None or isinstance(other, str)  # optional strings accept null
        return isinstance(other, kind)
    return [c for c in candidates if not compatible(c)]


def set_path(document: Any, path: tuple, value: Any) -> Any:
    copy = json.loads(json.dumps(document))
    target = copy
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    return copy


def with_file(source: Path, dest: Path, name: str, content: bytes, rehash: bool = True) -> Path:
    """A copy of checkpoint ``source`` whose file ``name`` holds ``content`` (sha256 list updated)."""
    shutil.copytree(source, dest)
    (dest / name).write_bytes(content)
    if rehash and name != CONFIG_FILE:
        meta = json.loads((dest / CONFIG_FILE).read_text())
        meta["files"][name] = sha256_file(dest / name)
        (dest / CONFIG_FILE).write_text(json.dumps(meta))
    return dest


# ------------------------------------------------------------------------------ JSON key swaps

def test_every_checkpoint_config_key_swapped_to_each_wrong_type(world, tmp_path):
    meta = json.loads((world["ckpt"] / CONFIG_FILE).read_text())
    out = tmp_path / "out"
    out.mkdir()
    count = 0
    for path, value in json_paths(meta):
        for wrong in wrong_values(value):
            count += 1
            ckpt = with_file(world["ckpt"], tmp_path / f"c{count}", CONFIG_FILE,
                             json.dumps(set_path(meta, path, wrong)).encode())
            for argv in (["convert", ckpt, "--outfile", out / "m.gguf", "--outtype", "f32"], ["inspect", ckpt]):
                assert_refused(argv, [ckpt, world["base"]], out, (CONFIG_FILE,), "checkpoint config key swaps")
            shutil.rmtree(ckpt)
    assert count > 60


def test_every_adapter_config_key_read_swapped_to_each_wrong_type(world, tmp_path):
    config = json.loads((world["ckpt"] / "adapter_config.json").read_text())
    out = tmp_path / "out"
    out.mkdir()
    # the keys the converter reads, each with a value of its type
    read = {"r": 4, "lora_alpha": 8.0, "peft_type": "LORA", "use_rslora": False, "rank_pattern": {},
            "alpha_pattern": {}, "modules_to_save": ["lm_head"]}
    for key, example in read.items():
        for wrong in wrong_values(example):
            if key in ("rank_pattern", "alpha_pattern", "modules_to_save") and wrong is None:
                continue  # absent or null: none
            ckpt = with_file(world["ckpt"], tmp_path / "c", "adapter_config.json",
                             json.dumps({**config, key: wrong}).encode())
            assert_refused(["convert", ckpt, "--outfile", out / "m.gguf", "--outtype", "f32"],
                           [ckpt], out, ("adapter_config.json",), "adapter config key swaps")
            shutil.rmtree(ckpt)


def test_every_trainer_state_key_swapped_to_each_wrong_type(world, tmp_path):
    state_file = world["trained"] / "trainer_state" / "trainer_state.json"
    state = json.loads(state_file.read_text())
    out = tmp_path / "run"
    out.mkdir()
    for key in ("step", "examples_seen", "data_sha256", "parameters", "config"):
        for wrong in wrong_values(state[key]):
            ckpt = tmp_path / "step_000001"
            shutil.copytree(world["trained"], ckpt)
            (ckpt / "trainer_state" / "trainer_state.json").write_text(json.dumps({**state, key: wrong}))
            meta = json.loads((ckpt / CONFIG_FILE).read_text())
            state_file = ckpt / "trainer_state" / "trainer_state.json"
            meta["files"]["trainer_state/trainer_state.json"] = sha256_file(state_file)
            (ckpt / CONFIG_FILE).write_text(json.dumps(meta))
            assert_refused(["train", "--resume", ckpt, "--output-dir", out, "--max-steps", "3", "--no-progress"],
                           [ckpt], out, ("trainer_state.json",), "trainer state key swaps")
            shutil.rmtree(ckpt)


# ------------------------------------------------------------------------------ GGUF truncation

def section_offsets(path: Path) -> dict[str, int]:
    """Byte offsets inside each section of a GGUF file: magic, header counts, every key/value,
    the tensor infos, the alignment padding, the data of every tensor."""
    reader = gguf.GGUFReader(str(path))
    offsets = {"magic": 2, "version": 6, "tensor count": 12, "kv count": 20}
    for name, found in reader.fields.items():
        offsets[f"key {name}"] = found.offset + 3
    first_data = min(t.data_offset for t in reader.tensors) if reader.tensors else path.stat().st_size
    infos = [f.offset for f in reader.fields.values()]
    offsets["tensor infos"] = (max(infos) + first_data) // 2
    offsets["padding"] = first_data - 1
    for tensor in reader.tensors:
        offsets[f"data {tensor.name}"] = tensor.data_offset + max(1, tensor.n_bytes // 2)
    return offsets


def test_model_truncated_at_every_section(world, tmp_path):
    model = world["model"]
    data = model.read_bytes()
    out = tmp_path / "out"
    out.mkdir()
    cut = tmp_path / "cut.gguf"
    for offset in section_offsets(model).values():
        cut.write_bytes(data[:offset])
        for argv in (["inspect", cut], ["run", cut, "-p", "hi", "--omega", "off", "-c", "512"],
                     ["quantize", cut, out / "q.gguf", "q4_0"]):
            assert_refused(argv, [cut], out, ("cut.gguf",), "model truncations")


def test_sidecar_truncated_at_every_section(world, tmp_path):
    sidecar = sidecar_path_for(world["model"])
    data = sidecar.read_bytes()
    out = tmp_path / "out"
    out.mkdir()
    cut = tmp_path / "cut.omega.gguf"
    for offset in section_offsets(sidecar).values():
        cut.write_bytes(data[:offset])
        for argv in (["inspect", cut], ["run", world["model"], "--sidecar", cut, "--omega", "fast", "-p", "hi",
                                        "-c", "512"]):
            assert_refused(argv, [cut, world["model"]], out, ("cut.omega.gguf",), "sidecar truncations")


# ------------------------------------------------------------------------------ random bytes

@pytest.mark.parametrize("seed", range(4))
def test_random_bytes_in_every_file(seed, world, tmp_path):
    rng = np.random.default_rng(seed)
    noise = lambda: rng.integers(0, 256, int(rng.integers(0, 3000)), dtype=np.uint8).tobytes()  # noqa: E731
    out = tmp_path / "out"
    out.mkdir()
    for name in (CONFIG_FILE, SOUL_FILE, "adapter_config.json", "adapter_model.safetensors"):
        ckpt = with_file(world["ckpt"], tmp_path / "c", name, noise())
        assert_refused(["convert", ckpt, "--outfile", out / "m.gguf", "--outtype", "f32"], [ckpt], out,
                       (name,), "random bytes in checkpoint files")
        shutil.rmtree(ckpt)
    base = tmp_path / "base"
    for name in ("config.json", "model.safetensors", "tokenizer.model", "tokenizer_config.json"):
        shutil.copytree(world["base"], base)
        (base / name).write_bytes(noise())
        assert_refused(["convert", base, "--outfile", out / "m.gguf", "--outtype", "f32"], [base], out,
                       (name, "base"), "random bytes in base model files")
        shutil.rmtree(base)
    for name in ("x.gguf", "x.omega.gguf"):
        junk = tmp_path / name
        junk.write_bytes(b"GGUF" + noise() if rng.random() < 0.5 else noise())
        assert_refused(["inspect", junk], [junk], out, (name,), "random bytes as GGUF files")
        assert_refused(["quantize", junk, out / "q.gguf", "q4_0"], [junk], out, (name,), "random bytes as GGUF files")


# ------------------------------------------------------------------------------ NaN in every tensor kind

def test_nan_in_every_soul_and_router_tensor(world, tmp_path):
    tensors = load_file(str(world["ckpt"] / SOUL_FILE))
    out = tmp_path / "out"
    out.mkdir()
    for name, value in tensors.items():
        poisoned = dict(tensors)
        poisoned[name] = value.clone()
        poisoned[name].view(-1)[0] = float("nan")
        buffer = tmp_path / "soul.safetensors"
        save_file(poisoned, str(buffer))
        ckpt = with_file(world["ckpt"], tmp_path / "c", SOUL_FILE, buffer.read_bytes())
        for argv in (["convert", ckpt, "--outfile", out / "m.gguf", "--outtype", "f32"], ["inspect", ckpt]):
            assert_refused(argv, [ckpt], out, (name,), "NaN in soul and router tensors")
        shutil.rmtree(ckpt)


def test_nan_in_every_lora_tensor(world, tmp_path):
    tensors = load_file(str(world["ckpt"] / "adapter_model.safetensors"))
    out = tmp_path / "out"
    out.mkdir()
    for name in sorted(tensors)[::3]:  # every third: A and B of every kind of projection
        poisoned = dict(tensors, **{name: torch.full_like(tensors[name], float("inf"))})
        buffer = tmp_path / "adapter.safetensors"
        save_file(poisoned, str(buffer))
        ckpt = with_file(world["ckpt"], tmp_path / "c", "adapter_model.safetensors", buffer.read_bytes())
        assert_refused(["convert", ckpt, "--outfile", out / "m.gguf", "--outtype", "f32"], [ckpt], out,
                       (name,), "NaN in LoRA tensors")
        shutil.rmtree(ckpt)


def test_nan_in_every_sidecar_tensor(world, tmp_path):
    """A sidecar written by hand (our writer refuses NaN) with one NaN per tensor."""
    source = gguf.GGUFReader(str(sidecar_path_for(world["model"])))
    out = tmp_path / "out"
    out.mkdir()
    for poisoned in source.tensors:
        path = tmp_path / "p.omega.gguf"
        writer = gguf.GGUFWriter(str(path), "zptr-omega")
        for key, found in source.fields.items():
            if key.startswith("zptr."):
                kind = found.types[0]
                writer.add_key_value(key, found.contents(), kind,
                                     found.types[-1] if kind == gguf.GGUFValueType.ARRAY else None)
        for tensor in source.tensors:
            data = np.array(tensor.data, dtype=np.float32).reshape([int(n) for n in reversed(tensor.shape)])
            if tensor.name == poisoned.name:
                data.reshape(-1)[0] = np.nan
            writer.add_tensor(tensor.name, data)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        assert_refused(["run", world["model"], "--sidecar", path, "--omega", "exact", "-p", "hi", "-c", "512"],
                       [path], out, (poisoned.name,), "NaN in sidecar tensors")


# ------------------------------------------------------------------------------ the argument space

NUMBERS = st.one_of(st.integers(-10**6, 10**6).map(str), st.sampled_from(["nan", "inf", "-inf", "1e309", "", "x",
                                                                          "0", "-1", "0.5", "2"]))
TEXT = st.one_of(st.text(max_size=20), st.sampled_from(["", "\udcff\udcfe", " ", "日本", "🐙"]))


@st.composite
def run_argv(draw, model: str) -> list[str]:
    argv = ["run", draw(st.sampled_from([model, model + ".missing", "/", "/dev/null"]))]
    for flag in draw(st.lists(st.sampled_from(["-n", "--temp", "--top-k", "--top-p", "--min-p", "--repeat-penalty",
                                               "-s", "-c", "-t", "-ngl"]), unique=True, max_size=4)):
        argv += [flag, draw(NUMBERS)]
    argv += ["-p", draw(TEXT)] if draw(st.booleans()) else []
    argv += draw(st.sampled_from([[], ["--raw"], ["--omega", "exact"], ["--omega", "bogus"], ["--origin", "sea"],
                                  ["--system", "be brief"]]))
    return argv


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_run_argument_space(world, tmp_path, data):
    argv = data.draw(run_argv(str(world["model"])))
    if "-n" not in argv:
        argv += ["-n", "3"]  # a valid run stays short
    code, err = zptr(argv)
    assert code in (0, 1, 2), (argv, err)
    assert "Traceback" not in err and "internal error" not in err, (argv, err)
    if code == 1:
        assert len([line for line in err.splitlines() if line.startswith("zptr run: error:")]) == 1, (argv, err)
    TRIED["run arguments"] = TRIED.get("run arguments", 0) + 1


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(kind=st.sampled_from(["q4_0", "Q4_K_M", "q9_9", "", "f32", "iq2_xxs"]),
       target=st.sampled_from(["new.gguf", "sub/new.gguf", "model.gguf", "model.omega.gguf", "."]),
       overwrite=st.booleans())
def test_quantize_argument_space(world, tmp_path, kind, target, overwrite):
    workdir = tmp_path / "q"
    shutil.rmtree(workdir, ignore_errors=True)
    workdir.mkdir()
    model = workdir / "model.gguf"
    shutil.copy(world["model"], model)
    shutil.copy(sidecar_path_for(world["model"]), sidecar_path_for(model))
    before = files_of(model, sidecar_path_for(model))
    code, err = zptr(["quantize", model, workdir / target, kind] + (["--overwrite"] if overwrite else []))
    assert code in (0, 1, 2) and "Traceback" not in err and "internal error" not in err, err
    assert files_of(model, sidecar_path_for(model)) == before  # the input is never touched
    if code != 0:
        assert not [p for p in workdir.rglob("*") if p.name not in ("model.gguf", "model.omega.gguf")], err
    TRIED["quantize arguments"] = TRIED.get("quantize arguments", 0) + 1


def test_report_how_many_inputs_were_tried():
    print("\nfuzz inputs tried: " + ", ".join(f"{kind} {count}" for kind, count in sorted(TRIED.items()))
          + f"; total {sum(TRIED.values())}")
    assert sum(TRIED.values()) > 500
