"""The packaged recipes as files to start from (torchtune's ``tune ls`` / ``tune cp``): list them
with one line each, copy one to edit.

    coreai-palettize recipes                          # name and one line per packaged recipe
    coreai-palettize recipes cp tiny-llama-offline my-recipe.yaml
    coreai-palettize finetune my-recipe.yaml
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

from ..recipes import RECIPES_DIR, packaged_recipes

__all__ = ["CatalogError", "copy_recipe", "describe_recipe", "list_recipes", "recipe_path"]

MAX_DESCRIPTION = 100
_DESCRIPTION_LINE = re.compile(r"^#\s*description:\s*(.+)$", re.IGNORECASE)


class CatalogError(ValueError):
    """A recipe name or destination ``recipes cp`` cannot use. The message is one line."""


def recipe_path(name: str) -> Path:
    """The packaged YAML file of recipe ``name`` (``.yaml`` optional)."""
    stem = name.removesuffix(".yaml")
    names = packaged_recipes()
    if stem not in names:
        raise CatalogError(f"recipes: no packaged recipe {name!r}; valid: {', '.join(names)}")
    return Path(RECIPES_DIR) / f"{stem}.yaml"


def describe_recipe(path: str | os.PathLike) -> str:
    """One line about a recipe, from its leading comment: a ``# description: ...`` line if there
    is one, else the comment's first sentence without parentheses and its ``<name>:`` prefix."""
    lines: list[str] = []
    for raw in Path(path).read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if not line.startswith("#"):
            break
        match = _DESCRIPTION_LINE.match(line)
        if match:
            return _shorten(match.group(1))
        text = line.lstrip("#").strip()
        if not text:
            if lines:
                break
            continue
        lines.append(text)
    text = " ".join(lines)
    sentence = re.split(r"(?<=[.!?])\s", text, maxsplit=1)[0]
    sentence = re.sub(r"\s*\([^()]*\)", "", sentence)
    sentence = re.sub(rf"^{re.escape(Path(path).stem)}\s*:\s*", "", sentence)
    return _shorten(sentence[:1].upper() + sentence[1:])


def _shorten(text: str) -> str:
    text = " ".join(text.split())
    if len(text) <= MAX_DESCRIPTION:
        return text
    return text[:MAX_DESCRIPTION - 3].rsplit(" ", 1)[0] + "..."


def list_recipes() -> list[tuple[str, str]]:
    """``(name, one-line description)`` of every packaged recipe."""
    return [(name, describe_recipe(recipe_path(name))) for name in packaged_recipes()]


def copy_recipe(name: str, destination: str | os.PathLike, *, force: bool = False,
                make_parents: bool = False) -> Path:
    """Copy packaged recipe ``name`` to ``destination`` (a file, or an existing directory that
    receives ``<name>.yaml``; a destination without a suffix gets ``.yaml``). Returns the path.

    Refuses to overwrite an existing file unless ``force``, and to create missing parent
    directories unless ``make_parents``.
    """
    source = recipe_path(name)
    target = Path(destination).expanduser()
    if target.is_dir() or os.fspath(destination).endswith(("/", os.sep)):
        target = target / source.name
    elif not target.suffix:
        target = target.with_suffix(".yaml")
    if target.exists() and not force:
        raise CatalogError(f"recipes cp: {target} already exists; pass --force to overwrite it")
    if not target.parent.is_dir():
        if not make_parents:
            raise CatalogError(f"recipes cp: directory {target.parent} does not exist; pass "
                               "--make-parents to create it")
        target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(source, target)
    return target
