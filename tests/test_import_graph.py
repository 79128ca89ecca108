"""The package's import graph: no cycles between its modules, and no feature imports the engine.

Read with ``ast`` (every import, ``TYPE_CHECKING`` and function-local ones included; relative and
absolute; ``from . import x`` resolved to the module ``x`` when it is one).
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = "coreai_palettize_plugins"
ROOT = Path(__file__).resolve().parents[1] / PACKAGE

# Modules that orchestrate the engine or sit above it (adapters of frameworks, commands); every
# other module is a feature or a helper and must not import the engine.
ENGINE_USERS = ("integrations", "cli", "recipes", "inspection", "lightning", "hf", "budget_cli",
                "catalog", "__main__")


def module_names(root: Path = ROOT) -> dict[str, Path]:
    """Dotted module name -> file, for every module of the package."""
    names = {}
    for path in root.rglob("*.py"):
        parts = list(path.relative_to(root.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        names[".".join(parts)] = path
    return names


def imports_of(name: str, path: Path, modules: set[str]) -> set[str]:
    """The package modules ``name`` imports (a package's ``__init__`` counts as its own module)."""
    is_package = path.name == "__init__.py"
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".") if is_package else name.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)]
                stem = ".".join(base + ([node.module] if node.module else []))
            else:
                stem = node.module or ""
            # ``from pkg import x``: the submodule ``pkg.x`` when there is one, else ``pkg``.
            targets = [f"{stem}.{a.name}" if f"{stem}.{a.name}" in modules else stem
                       for a in node.names]
        else:
            continue
        for target in targets:
            while target and target not in modules:  # ``import a.b.c`` of a package path
                target = target.rpartition(".")[0]
            if target and target.startswith(PACKAGE) and target != name:
                found.add(target)
    return found


def import_graph(root: Path = ROOT) -> dict[str, set[str]]:
    files = module_names(root)
    return {name: imports_of(name, path, set(files)) for name, path in files.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan), sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

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

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return sorted(found)


def _is_ancestor(package: str, module: str) -> bool:
    return module.startswith(package + ".")


def test_no_import_cycles() -> None:
    graph = import_graph()
    # A package's __init__ importing its own submodules (re-exports) is not a cycle of concern
    # only when the submodule does not import the __init__ back: keep every edge.
    found = cycles(graph)
    assert not found, "import cycles between modules:\n" + "\n".join(
        " <-> ".join(c) for c in found)


def test_cycle_detector_sees_a_cycle(tmp_path: Path) -> None:
    """The detector itself: a relative, a TYPE_CHECKING and a ``from . import x`` cycle."""
    pkg = tmp_path / PACKAGE
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from .b import f\n")
    (pkg / "b.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n"
                              "    from .sub import c\n")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "sub" / "c.py").write_text(f"def g():\n    from {PACKAGE} import a\n")
    (pkg / "d.py").write_text("from . import e\n")
    (pkg / "e.py").write_text("from .d import x\n")
    found = cycles(import_graph(pkg))
    assert found == [[f"{PACKAGE}.a", f"{PACKAGE}.b", f"{PACKAGE}.sub.c"],
                     [f"{PACKAGE}.d", f"{PACKAGE}.e"]]


def test_no_feature_module_imports_the_engine() -> None:
    graph = import_graph()
    engine = {f"{PACKAGE}.engine", f"{PACKAGE}.engine.lifecycle"} & set(graph)
    assert engine, "the engine module was not found"
    offenders = sorted(
        f"{m} -> {', '.join(sorted(graph[m] & engine))}" for m in graph
        if graph[m] & engine and m not in engine
        and m != PACKAGE and not any(part in ENGINE_USERS for part in m.split(".")[1:]))
    assert not offenders, "feature modules import the engine:\n" + "\n".join(offenders)


_FIRST_IMPORT = """
import importlib, sys
import coreai_opt.palettization, lightning.pytorch, torch, transformers  # noqa: E401 (cached)
from transformers import Trainer  # noqa: F401
failed = []
for name in sys.argv[1:]:
    for key in [k for k in sys.modules if k.split(".")[0] == "coreai_palettize_plugins"]:
        del sys.modules[key]
    try:
        importlib.import_module(name)
    except Exception as e:
        failed.append(f"{name}: {type(e).__name__}: {e}")
print("\\n".join(failed))
sys.exit(1 if failed else 0)
"""


@pytest.mark.slow
def test_every_module_imports_first() -> None:
    """Each module imported first in a fresh package (no cycle through a package __init__)."""
    names = sorted(module_names())
    result = subprocess.run([sys.executable, "-c", _FIRST_IMPORT, *names], capture_output=True,
                            text=True, timeout=600, cwd=ROOT.parent)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
