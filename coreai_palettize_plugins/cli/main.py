"""``coreai-palettize``: fine-tune from recipes, inspect a config on a model, read an export's report.

    coreai-palettize finetune recipes/tiny-llama-offline.yaml [key=value ...]
    coreai-palettize show tiny-llama-offline train.max_steps=10      # resolved, validated recipe
    coreai-palettize inspect tiny-llama-offline preset=w3 [--json]    # dry run on the meta device
    coreai-palettize report outputs/.../palettized                    # table + report.png
    coreai-palettize recipes [cp NAME DEST]                           # list / copy packaged recipes
    coreai-palettize budget tiny-llama-offline --bits 3.5 [-o alloc.yaml]  # per-layer bits

A bad recipe prints ``error: <one line>`` to stderr and exits with status 1.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

__all__ = ["main"]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="coreai-palettize",
        description="Palettized (k-means weight-compressed) fine-tuning from YAML recipes.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, help_text in (
        ("finetune", "fine-tune a model with palettization in the loop and export it"),
        ("show", "print the resolved, validated recipe (nothing is loaded or written)"),
    ):
        command = commands.add_parser(name, help=help_text, description=help_text)
        command.add_argument("recipe", help="a recipe YAML file, or the name of a packaged "
                             "recipe (e.g. tiny-llama-offline)")
        command.add_argument("overrides", nargs="*", metavar="key=value",
                             help="OmegaConf dotlist overrides, e.g. train.max_steps=10 "
                             "palettize.preset=w6")
    _add_tool_commands(commands)
    from .budget import add_budget_command

    add_budget_command(commands)
    return parser


def _add_tool_commands(commands: argparse._SubParsersAction) -> None:
    """``inspect``, ``report`` and ``recipes`` (logic in inspection.py, plots.py, catalog.py)."""
    text = "dry run: which weights a palettize config palettizes and the projected size " \
        "(model built on the meta device; no weights, no k-means)"
    inspect = commands.add_parser("inspect", help=text, description=text)
    inspect.add_argument("target", help="a recipe (packaged name or YAML file), a local Hugging "
                         "Face model directory (config.json), or module:factory")
    inspect.add_argument("overrides", nargs="*", metavar="key=value",
                         help="palettize settings, e.g. preset=w3 overrides.linear=w8 "
                         "modules.lm_head=w8 (default base: the recipe's section, else preset=w4)")
    inspect.add_argument("--json", action="store_true", help="print JSON instead of a table")
    inspect.add_argument("--dtype", choices=("float32", "float16", "bfloat16"),
                         help="build the model in this dtype (default: the recipe's or config's)")
    inspect.add_argument("--input-shape", metavar="N,C,...", type=_shape,
                         help="shape of a float example input, for models that declare none")
    text = "print an export directory's report.json as a table and write report.png"
    report = commands.add_parser("report", help=text, description=text)
    report.add_argument("export_dir", help="an export directory (holding report.json)")
    report.add_argument("--no-plot", action="store_true", help="print the table only")
    text = "list the packaged recipes, or copy one to edit (coreai-palettize recipes cp NAME DEST)"
    recipes = commands.add_parser("recipes", help=text, description=text)
    actions = recipes.add_subparsers(dest="action", metavar="ACTION")
    actions.add_parser("ls", help="list the packaged recipes (the default)")
    copy = actions.add_parser("cp", help="copy a packaged recipe to DEST, to edit and run")
    copy.add_argument("name", help="a packaged recipe name")
    copy.add_argument("dest", help="a file path, or a directory receiving <name>.yaml")
    copy.add_argument("--force", action="store_true", help="overwrite an existing file")
    copy.add_argument("--make-parents", action="store_true",
                      help="create missing parent directories")


def _shape(text: str) -> tuple[int, ...]:
    try:
        shape = tuple(int(part) for part in text.split(","))
    except ValueError:
        shape = ()
    if not shape or any(n <= 0 for n in shape):
        raise argparse.ArgumentTypeError(f"expected positive integers such as 1,3,224,224, "
                                         f"got {text!r}")
    return shape


def _run_tool(args: argparse.Namespace) -> int:
    from ..export.plots import (
        REPORT_PNG,
        MatplotlibMissing,
        ReportError,
        format_report,
        plot_report,
    )
    from ..export.plots import read_report as read
    from ..recipes import RecipeError
    from ..settings.schema import PalettizeConfigError
    from .catalog import CatalogError, copy_recipe, list_recipes
    from .inspection import InspectError, inspect_target

    try:
        if args.command == "budget":
            from .budget import run_budget

            print(run_budget(args))
        elif args.command == "inspect":
            result = inspect_target(args.target, args.overrides, dtype=args.dtype,
                                    input_shape=args.input_shape)
            print(result.to_json() if args.json else result.to_text(), end="" if args.json else "\n")
        elif args.command == "report":
            report = read(args.export_dir)
            print(format_report(report))
            if not args.no_plot:
                try:
                    where = Path(args.export_dir)
                    png = plot_report(report, (where if where.is_dir() else where.parent)
                                      / REPORT_PNG)
                    print(f"\nwrote {png}")
                except MatplotlibMissing as e:
                    print(f"note: {e}", file=sys.stderr)
        elif args.action == "cp":
            target = copy_recipe(args.name, args.dest, force=args.force,
                                 make_parents=args.make_parents)
            print(f"copied {args.name} to {target}; run it with: coreai-palettize finetune {target}")
        else:
            rows = list_recipes()
            width = max(len(name) for name, _ in rows)
            print("\n".join(f"{name:<{width}}  {line}" for name, line in rows))
    except (RecipeError, PalettizeConfigError, InspectError, ReportError, CatalogError,
            OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``coreai-palettize`` console script. Returns the exit status."""
    from . import _quiet

    _quiet.install()  # before coreai-opt (torchao) is imported below
    args = _parser().parse_args(argv)
    if args.command in ("inspect", "report", "recipes", "budget"):
        return _run_tool(args)
    from ..recipes import RecipeError, finetune, format_summary, load_recipe
    from ..settings.schema import PalettizeConfigError

    try:
        if args.command == "show":
            print(load_recipe(args.recipe, args.overrides).to_yaml(), end="")
        else:
            print(format_summary(finetune(args.recipe, args.overrides)))
    except (RecipeError, PalettizeConfigError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0
