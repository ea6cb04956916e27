"""The package's shape: one installed namespace, and imports that run one way.

Layers, bottom to top: core (zptr/*.py, zptr/training) <- formats (zptr/formats) <- convert
(zptr.convert, folder convert/) and runtime (zptr.runtime, folder runtime/) <- app (zptr/app).
A layer imports only the layers below it and itself; only the app (and ``python -m zptr``)
imports both convert and runtime.
"""

from __future__ import annotations

import ast
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
FOLDERS = {"zptr": REPO / "zptr", "zptr.convert": REPO / "convert", "zptr.runtime": REPO / "runtime"}
ALLOWED = {"core": {"core"}, "formats": {"core", "formats"}, "convert": {"core", "formats", "convert"},
           "runtime": {"core", "formats", "runtime"}, "app": {"core", "formats", "convert", "runtime", "app"}}


def layer(module: str) -> str:
    parts = module.split(".")
    if parts[0] != "zptr":
        raise ValueError(module)
    second = parts[1] if len(parts) > 1 else ""
    # `python -m zptr` is the command line: app, like zptr.app.cli it hands over to.
    return {"formats": "formats", "convert": "convert", "runtime": "runtime", "app": "app",
            "__main__": "app"}.get(second, "core")


def modules() -> dict[str, Path]:
    found = {}
    for package, folder in FOLDERS.items():
        for path in folder.rglob("*.py"):
            relative = path.relative_to(folder).with_suffix("")
            parts = [p for p in relative.parts if p != "__init__"]
            found[".".join([package, *parts])] = path
    return found


def imported(module: str, path: Path) -> set[str]:
    """The zptr modules ``module`` imports (absolute or relative), at any depth of the file."""
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            names.add(target)
    return {n for n in names if n == "zptr" or n.startswith("zptr.")}


def test_imports_run_one_way():
    found = modules()
    assert {"zptr.checkpoint", "zptr.convert.pipeline", "zptr.runtime.engine", "zptr.app.cli"} <= set(found)
    violations = []
    for module, path in found.items():
        for target in imported(module, path):
            if layer(target) not in ALLOWED[layer(module)]:
                violations.append(f"{module} ({layer(module)}) imports {target} ({layer(target)})")
    assert not violations, "\n".join(violations)


def test_only_the_app_imports_both_convert_and_runtime():
    for module, path in modules().items():
        layers = {layer(t) for t in imported(module, path)}
        if {"convert", "runtime"} <= layers:
            assert layer(module) == "app", module


def test_the_wheel_installs_only_the_zptr_package(tmp_path):
    done = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                           "-q", "-w", str(tmp_path), str(REPO)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    [wheel] = tmp_path.glob("zptr-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert {name.split("/")[0] for name in names} == {"zptr", wheel.name.split("-py3")[0] + ".dist-info"}
    for expected in ("zptr/convert/pipeline.py", "zptr/runtime/engine.py", "zptr/app/cli.py",
                     "zptr/formats/gguf.py", "zptr/data/sample_corpus.jsonl", "zptr/data/mixed_text.txt",
                     "zptr/app/static/chat.html"):
        assert expected in names
    assert not [n for n in names if n.startswith(("tests/", "benchmarks/"))]


@pytest.mark.parametrize("module, expected", [("zptr.config", "core"), ("zptr.formats.keys", "formats"),
                                               ("zptr.app.bench.run", "app"), ("zptr.runtime", "runtime")])
def test_layer_names(module, expected):
    assert layer(module) == expected
