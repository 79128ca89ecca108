"""``coreai-palettize``: run and inspect fine-tuning recipes.

    coreai-palettize finetune recipes/tiny-llama-offline.yaml [key=value ...]
    coreai-palettize show tiny-llama-offline train.max_steps=10      # resolved, validated recipe

A bad recipe prints ``error: <one line>`` to stderr and exits with status 1.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

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
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``coreai-palettize`` console script. Returns the exit status."""
    from . import _quiet

    _quiet.install()  # before coreai-opt (torchao) is imported below
    args = _parser().parse_args(argv)
    from .recipes import RecipeError, finetune, format_summary, load_recipe
    from .settings import PalettizeConfigError

    try:
        if args.command == "show":
            print(load_recipe(args.recipe, args.overrides).to_yaml(), end="")
        else:
            print(format_summary(finetune(args.recipe, args.overrides)))
    except (RecipeError, PalettizeConfigError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0
