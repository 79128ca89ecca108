"""What ``coreai-palettize inspect`` can inspect: a recipe (its ``model`` section), a local Hugging
Face model directory (``config.json``) or ``module:factory``, each as a model factory (called on
the meta device by ``inspection.py``) plus its dtype and base ``palettize`` settings."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from ..core._utils import one_line

__all__ = ["DTYPES", "InspectError", "load_target", "torch_dtype_of"]

DTYPES = ("float32", "float16", "bfloat16")


class InspectError(ValueError):
    """A target or option ``inspect`` cannot use. The message is one line."""


def torch_dtype_of(value: Any, key: str) -> torch.dtype | None:
    if value is None or isinstance(value, torch.dtype):
        return value
    name = str(value).removeprefix("torch.")
    if name not in DTYPES:
        raise InspectError(f"{key}: unknown dtype {value!r}; valid: {', '.join(DTYPES)}")
    return getattr(torch, name)


def _hf_factory(config: Any, key: str) -> Callable[[], nn.Module]:
    import transformers

    names = list(getattr(config, "architectures", None) or [])
    cls = getattr(transformers, names[0], None) if names else None
    if not isinstance(cls, type):
        raise InspectError(f"{key}: config.json names no transformers model class in "
                           f"'architectures' (got {names or 'none'}); e.g. LlamaForCausalLM")
    return lambda: cls(config)


def _hf_config_dtype(config: Any) -> Any:
    value = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    return value if str(value).removeprefix("torch.") in DTYPES else None


def _load_hf_dir(path: Path) -> tuple[Callable[[], nn.Module], Any]:
    from transformers import AutoConfig

    if not (path / "config.json").is_file():
        raise InspectError(f"inspect: {path} has no config.json (a Hugging Face model "
                           "directory is expected)")
    try:
        config = AutoConfig.from_pretrained(str(path), local_files_only=True)
    except Exception as e:  # unknown model_type, bad JSON ...
        raise InspectError(f"inspect: {path}/config.json: {one_line(e)}") from None
    return _hf_factory(config, f"{path}/config.json"), _hf_config_dtype(config)


def _load_recipe(source: str) -> tuple[Callable[[], nn.Module], Any, dict[str, Any], str]:
    from ..recipes import load_recipe
    from ..recipes.checks import thaw
    from ..recipes.whisper_ct2 import resolve_ct2_source  # pypi:<wheel> or a model.bin folder

    recipe = load_recipe(source)
    model = recipe.model
    if model.config is not None:
        import transformers

        fields = {k: v for k, v in model.config.items() if k != "architecture"}
        cls = getattr(transformers, model.config["architecture"])
        if "vocab_size" not in fields and model.tokenizer:
            from ..recipes import load_tokenizer

            try:  # a model built from config takes its vocabulary size from the tokenizer
                tokenizer = load_tokenizer(model.tokenizer, local_files_only=True)
            except Exception as e:
                raise InspectError(f"recipe.model.tokenizer: cannot be loaded offline "
                                   f"({one_line(e)}); set model.config.vocab_size") from None
            fields["vocab_size"] = len(tokenizer)
        fields.setdefault("architectures", [cls.__name__])
        config = cls.config_class(**fields)
        factory = _hf_factory(config, "recipe.model.config")
    elif (ct2 := resolve_ct2_source(str(model.name_or_path))) is not None:
        factory = _ct2_whisper_factory(ct2, model.audio_window)
    else:
        reference = str(model.name_or_path)
        if Path(reference).expanduser().is_dir():
            factory, _ = _load_hf_dir(Path(reference).expanduser())
        else:
            from transformers import AutoConfig

            try:  # the Hugging Face cache is enough: only config.json is read
                config = AutoConfig.from_pretrained(reference, local_files_only=True)
            except Exception:
                raise InspectError(
                    f"recipe.model.name_or_path: {reference!r} is neither a local directory nor "
                    f"in the Hugging Face cache; fetch its config (hf download {reference} "
                    "config.json) or pass a local model directory") from None
            factory = _hf_factory(config, "recipe.model.name_or_path")
    return factory, model.dtype, thaw(recipe.palettize), f"recipe {recipe.name}"


def _ct2_whisper_factory(model_dir: Path, window_seconds: int) -> Callable[[], nn.Module]:
    """A Whisper whose config is read off the CTranslate2 variable shapes."""
    from transformers import WhisperForConditionalGeneration

    from ..recipes.whisper_ct2 import folder_tokenizer, read_ct2, special_ids, whisper_config

    variables, _, _ = read_ct2(model_dir / "model.bin")
    config = whisper_config(variables, window_seconds, special_ids(folder_tokenizer(model_dir)))
    config.architectures = ["WhisperForConditionalGeneration"]
    return lambda: WhisperForConditionalGeneration(config)


def _load_factory(target: str) -> Callable[[], nn.Module]:
    module_name, _, attr = target.partition(":")
    try:
        obj: Any = importlib.import_module(module_name)
        for part in attr.split("."):
            obj = getattr(obj, part)
    except (ImportError, AttributeError) as e:
        raise InspectError(f"inspect: cannot import {target!r} ({one_line(e)})") from None
    if not callable(obj):
        raise InspectError(f"inspect: {target!r} is not callable; module:factory must name a "
                           "function or class returning a torch.nn.Module")
    return obj


def load_target(target: str) -> tuple[Callable[[], nn.Module], Any, dict[str, Any], str]:
    """``(model factory, model dtype or None, base palettize settings, label)`` for a target:
    a recipe (packaged name or YAML path), a local Hugging Face model directory (config.json),
    or ``module:factory``."""
    from ..recipes import packaged_recipes

    path = Path(target).expanduser()
    if path.is_dir():
        factory, dtype = _load_hf_dir(path)
        return factory, dtype, {}, f"model dir {path}"
    if path.suffix in (".yaml", ".yml") or target in packaged_recipes():
        return _load_recipe(target)
    if ":" in target and not path.exists():
        return _load_factory(target), None, {}, target
    raise InspectError(
        f"inspect: {target!r} is not a recipe (a YAML file or one of: "
        f"{', '.join(packaged_recipes())}), a model directory with config.json, or "
        "module:factory")
