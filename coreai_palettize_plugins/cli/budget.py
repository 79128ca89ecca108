"""``coreai-palettize budget <recipe> --bits 3.5 [-o allocation.yaml]``: the per-layer allocation
of a recipe's model for a bits-per-weight target, without training."""

from __future__ import annotations

import argparse
from pathlib import Path

__all__ = ["add_budget_command", "run_budget"]


def add_budget_command(commands: argparse._SubParsersAction) -> None:
    text = "choose per-layer bits for a whole-model bits-per-weight target (k-means, no training)"
    budget = commands.add_parser("budget", help=text, description=text)
    budget.add_argument("recipe", help="a recipe YAML file or a packaged recipe name")
    budget.add_argument("overrides", nargs="*", metavar="key=value",
                        help="recipe overrides, e.g. palettize.preset=w4")
    budget.add_argument("--bits", type=float, required=True, help="whole-model bits per weight")
    budget.add_argument("--choices", type=lambda s: [int(x) for x in s.split(",")],
                        help="n_bits to choose among, e.g. 2,3,4,6,8 (default: the recipe's "
                        "budget choices, else 2,3,4,6,8)")
    budget.add_argument("--cache", help="JSON file of per-layer errors (reused across targets)")
    budget.add_argument("-o", "--output", help="write the palettize.modules block (YAML) here")


def run_budget(args: argparse.Namespace) -> str:
    """Build the recipe's model (its seed), attach the palettized structure, allocate, and
    return the table; writes ``--output`` when given."""
    import torch
    from transformers import set_seed

    from ..engine.lifecycle import Palettization
    from ..recipes import build_model, load_recipe, load_tokenizer
    from ..recipes.checks import thaw
    from ..recipes.hub import local_only

    recipe = load_recipe(args.recipe, list(args.overrides))
    palettize = thaw(recipe.palettize)
    budget = dict(palettize.get("budget") or {})
    budget["bits_per_weight"] = args.bits
    if args.choices is not None:
        budget["choices"] = args.choices
    if args.cache is not None:
        budget["cache"] = args.cache
    palettize["budget"] = budget
    engine = Palettization(palettize, export_formats=[])  # validates: one-line errors
    local = local_only(recipe)
    tokenizer = load_tokenizer(recipe.model.tokenizer or recipe.model.name_or_path,
                               local_files_only=local.tokenizer)
    set_seed(recipe.training_args.seed)
    model = build_model(recipe.model, tokenizer, local_files_only=local.model)
    engine.attach(model, {"input_ids": torch.zeros(1, 8, dtype=torch.long)})
    allocation = engine.allocate_budget()
    text = allocation.to_text()
    if args.output:
        Path(args.output).write_text(allocation.to_yaml())
        text += f"\nwrote {args.output}"
    return text

