"""Recipe loading: a YAML file, a packaged recipe name or a mapping, plus dotlist overrides and
``${...}`` interpolation -> a validated ``Recipe``."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from .checks import RecipeError, one_line, thaw
from .schema import RECIPE_FILE, SECTIONS, Recipe, validate_recipe

RECIPES_DIR = Path(__file__).resolve().parent / "packaged"


def packaged_recipes() -> list[str]:
    """Names of the recipes shipped with the package (``coreai-palettize finetune <name>``)."""
    return sorted(p.stem for p in RECIPES_DIR.glob("*.yaml"))


def load_recipe(source: str | os.PathLike | Mapping[str, Any],
                overrides: Sequence[str] = ()) -> Recipe:
    """Read, override, resolve and validate a recipe (a path, a packaged name or a mapping).

    ``overrides`` are OmegaConf dotlist items (``train.max_steps=10``; a Hydra-style leading
    ``+`` is accepted). Raises ``RecipeError`` (or ``PalettizeConfigError`` for the palettize
    section) with a one-line message; reads no model or data and writes nothing.
    """
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    config, name, path = _read_source(source)
    if overrides:
        dotlist = []
        for item in overrides:
            if "=" not in item or item.lstrip("+").startswith("="):
                raise RecipeError(f"override {item!r}: expected key=value "
                                  "(e.g. train.max_steps=10)")
            dotlist.append(item.removeprefix("+"))  # Hydra's "add a key" prefix: always allowed
        try:
            config = OmegaConf.merge(config, OmegaConf.from_dotlist(dotlist))
        except OmegaConfBaseException as e:
            raise RecipeError(f"overrides: {one_line(e)}") from None
    try:
        plain = OmegaConf.to_container(config, resolve=True)
    except OmegaConfBaseException as e:
        where = getattr(e, "full_key", None)
        raise RecipeError(f"recipe{'.' + where if where else ''}: {one_line(e)}") from None
    return validate_recipe(plain, name=name, source=path)


def _read_source(source: str | os.PathLike | Mapping[str, Any]) -> tuple[Any, str, Path | None]:
    from omegaconf import DictConfig, OmegaConf

    if isinstance(source, DictConfig):
        return source, "recipe", None
    if isinstance(source, Mapping):
        return OmegaConf.create(thaw(source)), "recipe", None
    path = Path(source)
    if not path.is_file():
        packaged = RECIPES_DIR / f"{path.name.removesuffix('.yaml')}.yaml"
        if os.sep in os.fspath(source) or not packaged.is_file():
            raise RecipeError(f"recipe: no such file or packaged recipe: {os.fspath(source)!r}; "
                              f"packaged: {', '.join(packaged_recipes())}")
        path = packaged
    try:
        config = OmegaConf.load(path)
    except yaml.YAMLError as e:
        raise RecipeError(f"recipe: {path} is not valid YAML ({one_line(e)})") from None
    if not isinstance(config, DictConfig):
        raise RecipeError(f"recipe: {path} must be a mapping with the sections "
                          f"{', '.join(SECTIONS)}")
    name = path.stem if path.name != RECIPE_FILE else path.parent.name
    return config, name, path


