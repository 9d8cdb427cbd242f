"""The package's floor plan holds: no import cycles (module or stage level), no reaching into another
module's private names, and the stages depend on each other only along the data flow."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import lung_effnet

PACKAGE = Path(lung_effnet.__file__).parent


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> list[tuple[str, list[str]]]:
    """(imported module, names) for every import in ``path``, at any depth, except under ``TYPE_CHECKING``."""
    tree = ast.parse(path.read_text())
    skip: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skip.update(id(n) for child in node.body for n in ast.walk(child))
    found = []
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            found += [(a.name, []) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, f"{path}: relative import (the package uses absolute imports)"
            found.append((node.module or "", [a.name for a in node.names]))
    return found


def _graph() -> dict[str, set[str]]:
    modules = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        deps = set()
        for module, names in _imports(path):
            if not module.startswith("lung_effnet"):
                continue
            for imported in [f"{module}.{n}" for n in names] + [module]:
                if imported in modules:  # "from pkg import module" names the module
                    deps.add(imported)
                    break
        graph[name] = deps - {name}
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one node (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    return found


def _stage(module: str) -> str:
    parts = module.split(".")
    return ".".join(parts[:2])


def test_no_import_cycles_between_modules():
    assert _cycles(_graph()) == []


def test_no_import_cycles_between_stages():
    stages: dict[str, set[str]] = {}
    for module, deps in _graph().items():
        if module == "lung_effnet":  # the public API re-exports every stage
            continue
        stages.setdefault(_stage(module), set()).update(_stage(d) for d in deps if _stage(d) != _stage(module))
    assert _cycles(stages) == []


def test_lower_layers_do_not_import_stages():
    """``io`` and the shared modules sit below every stage: they import none of them."""
    shared = {"lung_effnet.io", "lung_effnet.errors", "lung_effnet.classes", "lung_effnet.version",
              "lung_effnet.config", "lung_effnet.tracking"}
    allowed = shared | {"lung_effnet"}
    for module, deps in _graph().items():
        if _stage(module) in shared:
            assert {_stage(d) for d in deps} <= allowed, (module, deps)


def test_no_private_names_imported_across_modules():
    for path in PACKAGE.rglob("*.py"):
        for module, names in _imports(path):
            if module.startswith("lung_effnet"):
                private = [n for n in names if n.startswith("_") and not n.startswith("__")]
                assert not private, f"{path.relative_to(PACKAGE.parent)} imports {private} from {module}"


def test_package_does_not_import_pipelines():
    for path in PACKAGE.rglob("*.py"):
        assert not any(m.split(".")[0] == "pipelines" for m, _ in _imports(path)), path


def test_public_api_names_resolve_and_import_stays_light():
    for name in lung_effnet.__all__:
        assert getattr(lung_effnet, name) is not None, name
    code = "import sys, lung_effnet; print('torch' in sys.modules, 'monai' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["False", "False"]  # decode workers and `lung-effnet --help` do not pay for torch/MONAI


def test_benchmark_scripts_import_what_exists():
    """Benchmarks are not run by the tests; at least every package name they import must exist."""
    import importlib
    import importlib.util

    for path in sorted((PACKAGE.parent / "benchmarks").glob("*.py")):
        for module, names in _imports(path):
            if module.split(".")[0] not in ("lung_effnet", "tests"):
                continue
            imported = importlib.import_module(module)
            for name in names:
                assert hasattr(imported, name) or importlib.util.find_spec(f"{module}.{name}"), f"{path.name}: {module}.{name}"


def test_benchmark_scripts_answer_help_without_side_effects(tmp_path):
    """``python benchmarks/X.py --help`` prints usage and writes nothing (a script that took its
    first argument as the output folder once trained a run into a folder named ``--help``)."""
    scripts = sorted(str(p) for p in (PACKAGE.parent / "benchmarks").glob("*.py"))
    code = ("import contextlib, io, runpy, sys\n"
            "for script in sys.argv[1:]:\n"
            "    sys.argv = [script, '--help']\n"
            "    try:\n"
            "        with contextlib.redirect_stdout(io.StringIO()):\n"
            "            runpy.run_path(script, run_name='__main__')\n"
            "    except SystemExit as exc:\n"
            "        assert exc.code in (0, None), (script, exc.code)\n"
            "    else:\n"
            "        raise AssertionError(script + ': --help did not exit')\n")
    subprocess.run([sys.executable, "-c", code, *scripts], cwd=tmp_path, check=True, timeout=120,
                   env={**os.environ, "PYTHONPATH": str(PACKAGE.parent)})
    assert list(tmp_path.iterdir()) == []


def test_repository_tracks_only_the_project_layout():
    """Nothing a run writes gets committed at the top level (a run once landed in ``./--help``)."""
    import shutil

    root = PACKAGE.parent
    if shutil.which("git") is None or not (root / ".git").exists():
        import pytest

        pytest.skip("not a git checkout")
    tracked = subprocess.run(["git", "ls-files"], cwd=root, capture_output=True, text=True, check=True).stdout.split("\n")
    top = {line.split("/")[0] for line in tracked if line}
    assert top <= {".ci", ".gitignore", "CHANGELOG.md", "CONTRIBUTING.md", "Makefile", "README.md", "benchmarks", "configs",
                   "lung_effnet", "notebooks", "pipelines", "pyproject.toml", "tests"}, top
