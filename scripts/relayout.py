#!/usr/bin/env python
"""Lay the package out by concern: ``git mv`` each flat module per ``MAPPING``, rewrite imports.

    python scripts/relayout.py            # move, rewrite, write the package and alias modules
    python scripts/relayout.py --check    # only list what it would do; exit 1 if anything

Idempotent: a second run changes nothing. It

1. fails loudly, listing them, when the package holds a flat module that is not in ``MAPPING``
   (a module another branch added): add it to ``MAPPING`` (or ``KEEP``) and rerun;
2. ``git mv``s every flat module of ``MAPPING`` to its new path (a flat file that is one of the
   aliases written by step 5 is replaced, and a real flat module whose target exists already is
   an error: merge its changes into the target by hand, delete it, rerun);
3. writes each subpackage's ``__init__.py``; a subpackage that took an old module's name
   (``engine``, ``export``, ``settings``, ``cli``) re-exports that module's public names, so the
   old path keeps working;
4. rewrites every import of a moved module (``ast``: relative and absolute, ``TYPE_CHECKING`` and
   function-local ones, ``from . import x`` of modules) in the package (relative imports),
   tests/, benchmarks/, examples/, scripts/ and hydra_plugins/ (absolute), and dotted or slashed
   paths in strings, comments and docs (``coreai_palettize_plugins.budget`` ->
   ``coreai_palettize_plugins.accuracy.budget``); the documented public paths (``PUBLIC``)
   stay as they are outside the package, and so do the paths of the packages that took an old
   module's name in text (``coreai_palettize_plugins.engine`` still holds the same names);
5. writes the thin alias modules of ``ALIASES`` (the old path is the same module object).

It sorts the rewritten imports with ``ruff check --fix --select I`` when ruff is installed.
Then run ``ruff check .`` and the tests.
"""

from __future__ import annotations

import argparse
import ast
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "coreai_palettize_plugins"
PKG_DIR = ROOT / PACKAGE

# old flat module -> new module (dotted, relative to the package)
MAPPING: dict[str, str] = {
    # core/: what every layer builds on (no engine, no feature)
    "_utils": "core._utils",
    "_inputs": "core._inputs",
    "_modelcopy": "core._modelcopy",
    "checks": "core.checks",
    "dist_context": "core.dist_context",
    "linear_like": "core.linear_like",
    "strategies": "core.strategies",
    "integrity": "core.integrity",
    # settings/: the typed `palettize` schema and its coreai-opt translation
    "settings": "settings.schema",
    "coreai_config": "settings.coreai_config",
    # accuracy/: phases that decide what is clustered how
    "calibration": "accuracy.calibration",
    "_calibration_step": "accuracy.calibration_phase",
    "budget": "accuracy.budget",
    "budget_errors": "accuracy.budget_errors",
    "knapsack": "accuracy.knapsack",
    "adapters": "accuracy.adapters",
    "fitting": "accuracy.fitting",
    # engine/: the lifecycle that orchestrates the phases
    "engine": "engine.lifecycle",
    "attach": "engine.attach",
    "checkpoint": "engine.checkpoint",
    "distributed": "engine.distributed",
    "fsdp": "engine.fsdp",
    "compact": "engine.compact",
    # export/: artifacts and the report
    "export": "export.writer",
    "_export_files": "export._files",
    "_isolated": "export._isolated",
    "export_step": "export.phase",
    "artifact": "export.artifact",
    "artifact_checks": "export.artifact_checks",
    "report": "export.report",
    "dense_reasons": "export.dense_reasons",
    "plots": "export.plots",
    # integrations/: the framework adapters
    "lightning": "integrations.lightning",
    "hf": "integrations.hf",
    "_batches": "integrations._batches",
    "_synthetic": "integrations._synthetic",
    # cli/: the coreai-palettize commands
    "cli": "cli.main",
    "budget_cli": "cli.budget",
    "inspection": "cli.inspection",
    "inspection_targets": "cli.inspection_targets",
    "catalog": "cli.catalog",
    "_quiet": "cli._quiet",
}
KEEP = {"__init__", "__main__"}
"""Flat modules that stay where they are."""
ALIASES = {"lightning", "hf", "calibration"}
"""Old paths kept as thin alias modules (documented in the README)."""
PUBLIC = {"lightning", "hf"}
"""Old paths that are the documented ones: not rewritten outside the package."""
DOCS = {
    "core": "What every layer builds on: validation, the distributed context, training "
            "strategies, linear-like layers, inputs and model copies.",
    "settings": "The typed ``palettize`` schema (``PalettizeSettings``) and its coreai-opt "
                "translation.",
    "accuracy": "Phases that decide how weights are clustered: calibration, the bits budget, "
                "LoRA adapters.",
    "engine": "``Palettization``: the lifecycle that orchestrates the phases (attach, k-means "
              "across ranks, compact base, checkpoints).",
    "export": "The export: ``.aimodel``, the packed artifact, the compression report and its "
              "plots.",
    "integrations": "The framework adapters: Lightning and Hugging Face callbacks.",
    "cli": "The ``coreai-palettize`` command: finetune, show, inspect, report, recipes, budget.",
}
ALIAS_MARK = "# relayout: alias module"
REWRITE_DIRS = ["tests", "benchmarks", "examples", "scripts", "hydra_plugins"]
DOC_FILES = ["README.md", "docs", "benchmarks", "DESIGN.md"]
SELF = Path(__file__).resolve()


class RelayoutError(SystemExit):
    def __init__(self, message: str) -> None:
        super().__init__(f"relayout: {message}")


# ------------------------------------------------------------------------------ moving


def flat_modules() -> list[str]:
    return sorted(p.stem for p in PKG_DIR.glob("*.py"))


def is_alias(path: Path) -> bool:
    return path.is_file() and ALIAS_MARK in path.read_text()


def new_path(new: str) -> Path:
    return PKG_DIR.joinpath(*new.split(".")).with_suffix(".py")


def check_unmapped() -> None:
    unknown = [m for m in flat_modules() if m not in MAPPING and m not in KEEP
               and not (m in ALIASES and is_alias(PKG_DIR / f"{m}.py"))]
    if unknown:
        raise RelayoutError(
            "flat module(s) not in MAPPING: " + ", ".join(f"{PACKAGE}/{m}.py" for m in unknown)
            + f"\n  add each to MAPPING (or KEEP) in {SELF.relative_to(ROOT)} and rerun")


def plan_moves() -> list[tuple[str, Path, Path]]:
    moves = []
    for old, new in MAPPING.items():
        src, dst = PKG_DIR / f"{old}.py", new_path(new)
        if not src.exists() or is_alias(src):
            if not dst.exists():
                raise RelayoutError(f"neither {src.relative_to(ROOT)} nor "
                                    f"{dst.relative_to(ROOT)} exists (remove {old!r} from MAPPING?)")
            continue
        if dst.exists():
            raise RelayoutError(
                f"both {src.relative_to(ROOT)} and {dst.relative_to(ROOT)} are real modules "
                "(a merge re-added the flat one): move its changes into the new path by hand, "
                f"delete {src.relative_to(ROOT)}, rerun")
        moves.append((old, src, dst))
    return moves


def git(*args: str) -> None:
    subprocess.run(["git", *args], cwd=ROOT, check=True)


def do_moves(moves: list[tuple[str, Path, Path]]) -> None:
    for _, src, dst in moves:
        dst.parent.mkdir(parents=True, exist_ok=True)
        git("mv", str(src.relative_to(ROOT)), str(dst.relative_to(ROOT)))


# ------------------------------------------------------------------------------ modules


def all_modules() -> set[str]:
    """Every module and package of the new layout (dotted, absolute)."""
    names = set()
    for path in PKG_DIR.rglob("*.py"):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        names.add(".".join(parts))
    names |= {f"{PACKAGE}.{new}" for new in MAPPING.values()}
    names |= {f"{PACKAGE}.{new.rpartition('.')[0]}" for new in MAPPING.values() if "." in new}
    return names


def mapped(module: str) -> str:
    """The new absolute name of an absolute module name (unchanged when it did not move)."""
    prefix = PACKAGE + "."
    if module.startswith(prefix):
        head, _, rest = module[len(prefix):].partition(".")
        if head in MAPPING and not rest:
            return prefix + MAPPING[head]
    return module


def module_name(path: Path) -> str | None:
    """The dotted module name of a file of the package (None outside it)."""
    try:
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
    except ValueError:
        return None
    if parts[0] != PACKAGE:
        return None
    return ".".join(parts)  # ``pkg.sub.__init__`` for a package's __init__


def package_of(name: str) -> list[str]:
    """The package that relative imports of module ``name`` are resolved against."""
    parts = name.split(".")
    return parts[:-1]  # for ``a.b.__init__`` that is ``a.b``; for ``a.b.c`` it is ``a.b``


# ------------------------------------------------------------------------------ imports


def resolve(node: ast.ImportFrom, written_as: str | None) -> str:
    if not node.level:
        return node.module or ""
    if written_as is None:
        raise RelayoutError(f"relative import outside the package: {ast.unparse(node)}")
    base = package_of(written_as)
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def relative(target: str, here: str) -> tuple[int, str]:
    """``(level, module)`` of a relative import of ``target`` from module ``here``."""
    package, parts = package_of(here), target.split(".")
    common = 0
    while common < min(len(package), len(parts)) and package[common] == parts[common]:
        common += 1
    return len(package) - common + 1, ".".join(parts[common:])


def render(target: str, names: list[ast.alias], here: str | None, indent: str) -> str:
    if here is not None and target.startswith(PACKAGE):
        level, module = relative(target, here)
        source = "." * level + module
    else:
        source = target
    items = [a.name + (f" as {a.asname}" if a.asname else "") for a in names]
    line = f"{indent}from {source} import {', '.join(items)}"
    if len(line) <= 100:
        return line
    body = "".join(f"{indent}    {item},\n" for item in items)
    return f"{indent}from {source} import (\n{body}{indent})"


def rewrite_imports(path: Path, written_as: str | None, modules: set[str]) -> str:
    """The source of ``path`` with its imports of moved modules rewritten."""
    text = path.read_text()
    tree = ast.parse(text, str(path))
    here = module_name(path)
    lines = text.splitlines(keepends=True)
    edits = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.ImportFrom):
            continue
        source = resolve(node, written_as)
        if not (source == PACKAGE or source.startswith(PACKAGE + ".")):
            continue
        groups: dict[str, list[ast.alias]] = {}
        for alias in node.names:
            sub = f"{source}.{alias.name}"
            if alias.name != "*" and (sub in modules or sub in _old_modules()):
                new = mapped(sub)
                if here is None and _public(sub):
                    new = sub
                parent, _, leaf = new.rpartition(".")
                asname = alias.asname or (alias.name if leaf != alias.name else None)
                groups.setdefault(parent, []).append(ast.alias(leaf, asname))
            else:
                target = mapped(source)
                if here is None and _public(source):
                    target = source
                groups.setdefault(target, []).append(alias)
        unchanged = (list(groups) == [source] and written_as == here
                     and all(a.name == b.name for a, b in zip(groups[source], node.names)))
        if unchanged:
            continue
        first, last = lines[node.lineno - 1], lines[node.end_lineno - 1]
        indent = first[: node.col_offset]
        tail = last.encode()[node.end_col_offset:].decode()
        if indent.strip() or (tail.strip() and not tail.strip().startswith("#")):
            raise RelayoutError(f"{path.relative_to(ROOT)}:{node.lineno}: an import that shares "
                                "its line with other code; split it and rerun")
        comment = tail.rstrip("\n") if tail.strip().startswith("#") else ""
        rendered = "\n".join(render(t, names, here, indent) for t, names in groups.items())
        edits.append((node.lineno - 1, node.end_lineno, rendered + comment + "\n"))
    for start, end, new in sorted(edits, reverse=True):
        lines[start:end] = [new]
    return "".join(lines)


def _old_modules() -> set[str]:
    return {f"{PACKAGE}.{old}" for old in MAPPING}


def _public(module: str) -> bool:
    return module in {f"{PACKAGE}.{p}" for p in PUBLIC}


# ------------------------------------------------------------------------------ text


def path_pattern(names: set[str]) -> re.Pattern[str]:
    alternatives = "|".join(sorted(map(re.escape, names), key=len, reverse=True))
    return re.compile(rf"(?<![\w.]){PACKAGE}([./])({alternatives})(?![\w])(\.py)?")


def rewrite_text(text: str, names: set[str], modules: set[str]) -> str:
    """Dotted (``pkg.budget``) and slashed (``pkg/budget.py``) paths of moved modules."""
    def replace(match: re.Match[str]) -> str:
        sep, old, suffix = match.group(1), match.group(2), match.group(3)
        after = match.string[match.end():]
        follow = re.match(r"\.(\w+)", after) if sep == "." and not suffix else None
        if follow and f"{PACKAGE}.{old}.{follow.group(1)}" in modules:
            return match.group(0)  # already the new package (``pkg.engine.lifecycle``)
        if sep == "/" and not suffix:
            return match.group(0)  # a folder path
        new = MAPPING[old]
        return PACKAGE + sep + (new.replace(".", "/") if sep == "/" else new) + (suffix or "")

    return path_pattern(names).sub(replace, text)


def rewrite_homes(text: str) -> str:
    """The root ``__init__``'s lazy ``_HOMES`` table: ``"Name": "module"`` values."""
    return re.sub(r'("\w+": ")(\w+)(",)',
                  lambda m: m.group(1) + MAPPING.get(m.group(2), m.group(2)) + m.group(3), text)


# ------------------------------------------------------------------------------ writing


def public_names(path: Path) -> list[str]:
    tree = ast.parse(path.read_text())
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(
                isinstance(t, ast.Name) and t.id == "__all__" for t in node.targets):
            return list(ast.literal_eval(node.value))
    names = []
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.append(node.name)
        elif isinstance(node, ast.Assign):
            names += [t.id for t in node.targets if isinstance(t, ast.Name)]
    return [n for n in names if not n.startswith("_")]


def docstring(text: str) -> str:
    paragraphs = [textwrap.fill(p, 96) for p in text.split("\n\n")]
    return '"""' + "\n\n".join(paragraphs) + ('\n"""\n' if len(paragraphs) > 1 or
                                                "\n" in paragraphs[0] else '"""\n')


def isort_key(name: str) -> tuple[int, str]:
    """isort's order (ruff's too): CONSTANTS, Classes, functions."""
    return (0 if name.isupper() else 1 if name[0].isupper() else 2, name)


def package_inits() -> dict[Path, str]:
    out = {}
    for package in sorted({new.partition(".")[0] for new in MAPPING.values() if "." in new}):
        doc = DOCS.get(package, "")
        old_module = MAPPING.get(package)  # a package that took an old module's name
        if old_module is None:
            out[PKG_DIR / package / "__init__.py"] = docstring(doc)
            continue
        leaf = old_module.partition(".")[2]
        names = sorted(public_names(new_path(old_module)), key=isort_key)
        text = docstring(f"{doc}\n\n``{PACKAGE}.{package}`` was a module: its names are "
                         f"re-exported from ``{leaf}``.") + "\n"
        text += render(f"{PACKAGE}.{old_module}", [ast.alias(n) for n in names],
                       f"{PACKAGE}.{package}.__init__", "") + "\n\n"
        text += "__all__ = [\n" + "".join(f'    "{n}",\n' for n in names) + "]\n"
        out[PKG_DIR / package / "__init__.py"] = text
    return out


def alias_modules() -> dict[Path, str]:
    out = {}
    for old in sorted(ALIASES):
        parent, _, leaf = MAPPING[old].rpartition(".")
        out[PKG_DIR / f"{old}.py"] = (
            docstring(f"``{PACKAGE}.{old}``: the old path of ``{PACKAGE}.{MAPPING[old]}`` (the "
                      "same module object).")
            + f"\n{ALIAS_MARK}\nimport sys\n\nfrom .{parent} import {leaf} as _module\n\n"
            "sys.modules[__name__] = _module\n")
    return out


def files_to_rewrite() -> list[Path]:
    files = [p for p in PKG_DIR.rglob("*.py") if not is_alias(p)]
    for folder in REWRITE_DIRS:
        files += [p for p in (ROOT / folder).rglob("*.py") if p.resolve() != SELF]
    return sorted(files)


def doc_files() -> list[Path]:
    out = []
    for name in DOC_FILES:
        path = ROOT / name
        out += sorted(path.rglob("*.md")) if path.is_dir() else [path] if path.is_file() else []
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only report; exit 1 if changes")
    args = parser.parse_args()
    check_unmapped()
    moves = plan_moves()
    changes = [f"git mv {s.relative_to(ROOT)} {d.relative_to(ROOT)}" for _, s, d in moves]
    if not args.check:
        do_moves(moves)
    written_as = {dst: f"{PACKAGE}.{old}" for old, _, dst in moves}
    modules = all_modules()
    collisions = {p for p in MAPPING if "." in MAPPING[p] and p in
                  {new.partition(".")[0] for new in MAPPING.values()}}
    outputs: dict[Path, str] = {}
    for path in files_to_rewrite():
        if args.check and path not in written_as and not path.exists():
            continue
        here = module_name(path)
        before = path.read_text()
        as_written = written_as.get(path, here)
        text = rewrite_imports(path, as_written, modules) if path.exists() else before
        names = set(MAPPING) - collisions - (PUBLIC if here is None else set())
        text = rewrite_text(text, names, modules)
        if path == PKG_DIR / "__init__.py":
            text = rewrite_homes(text)
        if text != before:
            outputs[path] = text
    for path in doc_files():
        before = path.read_text()
        text = rewrite_text(before, set(MAPPING) - PUBLIC - collisions, modules)
        if text != before:
            outputs[path] = text
    if not args.check:
        for path, text in outputs.items():
            path.write_text(text)
        for path, text in {**package_inits(), **alias_modules()}.items():
            if not path.exists() or path.read_text() != text:
                outputs[path] = text
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text(text)
    changes += [f"rewrite {p.relative_to(ROOT)}" for p in outputs]
    ruff = shutil.which("ruff")
    py_files = [str(p) for p in outputs if p.suffix == ".py"]
    if not args.check and ruff and py_files:  # import order of the rewritten imports
        subprocess.run([ruff, "check", "--fix", "--select", "I", "-q", *py_files], cwd=ROOT,
                       check=False)
    print("\n".join(changes) or "relayout: nothing to do")
    return 1 if args.check and changes else 0


if __name__ == "__main__":
    sys.exit(main())
