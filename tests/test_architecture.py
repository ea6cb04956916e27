"""The package's shape: one installed namespace, and imports that run one way.

Layers, bottom to top: core (zptr/*.py, zptr/training) <- formats (zptr/formats) <- convert
(zptr.convert, folder convert/) and runtime (zptr.runtime, folder runtime/) <- app (zptr/app).
A layer imports only the layers below it and itself; only the app (and ``python -m zptr``)
imports both convert and runtime; no module imports itself through others.
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


def _type_checking_only(node: ast.AST) -> bool:
    return isinstance(node, ast.If) and isinstance(node.test, (ast.Name, ast.Attribute)) and \
        ast.unparse(node.test) in ("TYPE_CHECKING", "typing.TYPE_CHECKING")


def _import_nodes(tree: ast.AST, run_time_only: bool):
    """Every import statement at any depth; with ``run_time_only``, none under ``if TYPE_CHECKING:``
    (those never execute, so they make no cycle)."""
    for node in ast.iter_child_nodes(tree):
        if run_time_only and _type_checking_only(node):
            yield from (n for orelse in node.orelse for n in _import_nodes(ast.Module([orelse], []), True))
            continue
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        yield from _import_nodes(node, run_time_only)


def imported(module: str, path: Path, known: frozenset[str] = frozenset(),
             run_time_only: bool = False) -> set[str]:
    """The zptr modules ``module`` imports (absolute or relative), at any depth of the file.
    ``from package import name`` names the submodule ``package.name`` when ``known`` has it."""
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    names = set()
    for node in _import_nodes(ast.parse(path.read_text(encoding="utf-8")), run_time_only):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
            continue
        if node.level:
            base = package.split(".")
            base = base[: len(base) - node.level + 1]
            target = ".".join(base + ([node.module] if node.module else []))
        else:
            target = node.module or ""
        for alias in node.names:
            names.add(f"{target}.{alias.name}" if f"{target}.{alias.name}" in known else target)
    return {n for n in names if n == "zptr" or n.startswith("zptr.")}


def import_cycle(graph: dict[str, set[str]]) -> list[str]:
    """One cycle of ``graph`` (module -> the modules it imports) as a path that ends where it
    starts, or [] when there is none: a depth-first search that meets a module still on its path."""
    done: set[str] = set()
    path: list[str] = []

    def visit(module: str) -> list[str]:
        if module in path:
            return path[path.index(module):] + [module]
        if module in done:
            return []
        path.append(module)
        for target in sorted(graph.get(module, ())):
            if found := visit(target):
                return found
        path.pop()
        done.add(module)
        return []

    for module in sorted(graph):
        if found := visit(module):
            return found
    return []


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


def test_no_import_cycle():
    """No module imports itself through others, lazily inside a function included: a cycle makes
    what works depend on which module is imported first."""
    found = modules()
    known = frozenset(found)
    graph = {module: imported(module, path, known, run_time_only=True) - {module}
             for module, path in found.items()}
    cycle = import_cycle(graph)
    assert not cycle, " -> ".join(cycle)


def test_the_cycle_check_finds_cycles():
    assert import_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert import_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) == []


def test_the_cycle_check_reads_lazy_and_submodule_imports(tmp_path):
    source = tmp_path / "engine.py"
    source.write_text("from typing import TYPE_CHECKING\nfrom . import batch\nif TYPE_CHECKING:\n"
                      "    from .llama import Sampler\ndef f():\n    from zptr.models import x\n")
    known = frozenset({"zptr.runtime.batch", "zptr.runtime.llama", "zptr.models"})
    assert imported("zptr.runtime.engine", source, known, run_time_only=True) == {"zptr.runtime.batch",
                                                                                  "zptr.models"}
    assert "zptr.runtime.llama" in imported("zptr.runtime.engine", source, known)


def test_the_package_imports_no_test_module():
    """The test models and references live in tests/ and never ship: no zptr module imports them."""
    test_modules = {path.stem for path in (REPO / "tests").glob("*.py")}
    for module, path in modules().items():
        for node in _import_nodes(ast.parse(path.read_text(encoding="utf-8")), run_time_only=False):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
            assert not {n.split(".")[0] for n in names} & test_modules, module


def test_the_runtime_inspect_and_the_server_load_no_torch(smollm2_omega):
    """The NumPy runtime, ``zptr inspect`` of a GGUF with its sidecar, and the server never load
    torch (seconds of start-up and hundreds of MB for nothing)."""
    code = ("import sys\nimport zptr.runtime.engine, zptr.app.server\nfrom zptr.app.cli import main\n"
            "assert main(['inspect', sys.argv[1], '--json']) == 0\n"
            "print('torch' in sys.modules, 'zptr.checkpoint' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code, str(smollm2_omega)], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert '"paired": true' in done.stdout
    assert done.stdout.split()[-2:] == ["False", "False"]


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
