"""Recipes: one YAML file describes a whole palettized fine-tune; ``finetune`` runs it.

    coreai-palettize finetune recipes/tiny-llama-offline.yaml train.max_steps=10 palettize.preset=w6

A recipe has five sections (``${...}`` OmegaConf interpolation works across them):

================  ==========================================================================
section           keys
================  ==========================================================================
``model``         ``name_or_path`` (HF id or local dir) *or* ``config`` (``architecture`` plus
                  the config class's fields: a model built from scratch); ``tokenizer``
                  (default: ``name_or_path``); ``dtype`` (float32, bfloat16, float16)
``data``          ``files`` (local ``.txt``/``.jsonl``) *or* ``dataset`` (+ ``dataset_config``,
                  ``split``: an HF dataset); ``text_field``, ``seq_len``, ``eval_fraction``
                  (held-out tail of the blocks), ``max_train_blocks``
``palettize``     the ``palettize`` config group (``settings.py``), minus ``export``
``train``         ``transformers.TrainingArguments`` keyword arguments; ``output_dir`` is
                  required; ``resume_from_checkpoint`` (a path or true) resumes
``export``        ``dir`` (default ``<output_dir>/palettized``), ``formats`` (coreai, torch)
================  ==========================================================================

``builtin:<file>`` names a file shipped in ``coreai_palettize_plugins/data`` (the offline corpus and
tokenizer). Every validation error is one line naming the key (``recipe.data.seq_len: must be a
positive integer, got 0``) and is raised before anything is loaded or written.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import inspect
import json
import math
import os
import socket
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch
import torch.nn as nn
import torch.nn.functional as F
import yaml
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from .settings import EXPORT_FORMATS, resolve_settings

__all__ = [
    "BUILTIN_PREFIX",
    "DATA_DIR",
    "RECIPES_DIR",
    "Recipe",
    "RecipeError",
    "RecipeSnapshotCallback",
    "TokenBlocks",
    "build_model",
    "check_hub_access",
    "finetune",
    "format_summary",
    "load_recipe",
    "load_tokenizer",
    "packaged_recipes",
    "perplexity",
    "read_texts",
    "split_blocks",
    "tokenize_blocks",
    "validate_recipe",
]

PACKAGE_DIR = Path(__file__).resolve().parent
DATA_DIR = PACKAGE_DIR / "data"
RECIPES_DIR = PACKAGE_DIR / "recipes" / "packaged"
BUILTIN_PREFIX = "builtin:"
RECIPE_FILE = "recipe.yaml"
RESULTS_FILE = "finetune_results.json"
HUB_PROBE_TIMEOUT_S = 3.0
SECTIONS = ("model", "data", "palettize", "train", "export")
MODEL_DEFAULTS: dict[str, Any] = {"name_or_path": None, "config": None, "tokenizer": None,
                                  "dtype": "float32"}
DATA_DEFAULTS: dict[str, Any] = {"files": None, "dataset": None, "dataset_config": None,
                                 "split": "train", "text_field": "text", "seq_len": 512,
                                 "eval_fraction": 0.1, "max_train_blocks": None}
EXPORT_DEFAULTS: dict[str, Any] = {"dir": None, "formats": list(EXPORT_FORMATS)}
DTYPES = ("float32", "bfloat16", "float16")
TEXT_SUFFIXES = (".txt", ".jsonl")
_TRUE = ("1", "on", "yes", "true")


class RecipeError(ValueError):
    """A bad recipe, or one that cannot run here. The message is one line naming the key."""


# --------------------------------------------------------------------------------------------
# The validated recipe
# --------------------------------------------------------------------------------------------


@dataclass
class Recipe:
    """A validated recipe: plain sections with defaults filled in, interpolations resolved."""

    name: str
    model: dict[str, Any]
    data: dict[str, Any]
    palettize: dict[str, Any]
    train: dict[str, Any]
    export: dict[str, Any]
    source: Path | None = None
    training_args: TrainingArguments | None = field(default=None, repr=False, compare=False)

    @property
    def output_dir(self) -> Path:
        return Path(self.train["output_dir"])

    @property
    def export_dir(self) -> Path:
        return Path(self.export["dir"])

    @property
    def resume_from_checkpoint(self) -> str | bool | None:
        return self.train.get("resume_from_checkpoint") or None

    def to_dict(self) -> dict[str, Any]:
        return {section: getattr(self, section) for section in SECTIONS}

    def to_yaml(self) -> str:
        """The resolved recipe as YAML: ``finetune`` of this text reproduces the run."""
        from . import __version__

        header = (f"# Resolved recipe '{self.name}' (coreai-palettize-plugins {__version__}).\n"
                  f"# Reproduce: coreai-palettize finetune {RECIPE_FILE}\n")
        return header + yaml.safe_dump(self.to_dict(), sort_keys=False, default_flow_style=False)


def packaged_recipes() -> list[str]:
    """Names of the recipes shipped with the package (``coreai-palettize finetune <name>``)."""
    return sorted(p.stem for p in RECIPES_DIR.glob("*.yaml"))


def load_recipe(source: str | os.PathLike | Mapping[str, Any],
                overrides: Sequence[str] = ()) -> Recipe:
    """Read, override, resolve and validate a recipe (a path, a packaged name or a mapping).

    ``overrides`` are OmegaConf dotlist items (``train.max_steps=10``; a Hydra-style leading
    ``+`` is accepted). Raises ``RecipeError``
    (or ``PalettizeConfigError`` for the palettize section) with a one-line message; reads no
    model or data and writes nothing.
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
            raise RecipeError(f"overrides: {_one_line(e)}") from None
    try:
        plain = OmegaConf.to_container(config, resolve=True)
    except OmegaConfBaseException as e:
        where = getattr(e, "full_key", None)
        raise RecipeError(f"recipe{'.' + where if where else ''}: {_one_line(e)}") from None
    return validate_recipe(plain, name=name, source=path)


def _read_source(source: str | os.PathLike | Mapping[str, Any]):
    from omegaconf import DictConfig, OmegaConf

    if isinstance(source, DictConfig):
        return source, "recipe", None
    if isinstance(source, Mapping):
        return OmegaConf.create(dict(source)), "recipe", None
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
        raise RecipeError(f"recipe: {path} is not valid YAML ({_one_line(e)})") from None
    if not isinstance(config, DictConfig):
        raise RecipeError(f"recipe: {path} must be a mapping with the sections "
                          f"{', '.join(SECTIONS)}")
    name = path.stem if path.name != RECIPE_FILE else path.parent.name
    return config, name, path


# --------------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------------


def _one_line(error: BaseException) -> str:
    """The innermost cause's message, first line (HF wraps config errors in tracebacks)."""
    while error.__cause__ is not None:
        error = error.__cause__
    lines = [line.strip() for line in str(error).strip().splitlines() if line.strip()]
    return lines[0] if lines else type(error).__name__


def _unknown_key(path: str, name: str, valid: Sequence[str], what: str | None = None) -> RecipeError:
    """``<path>.<name>: unknown key; valid: ...`` (close matches where the list is long)."""
    valid = sorted(valid)
    if len(valid) <= 12 or what is None:
        hint = ", ".join(valid)
    else:
        close = difflib.get_close_matches(name, valid, n=3, cutoff=0.6)
        hint = ", ".join(close) if close else what
    return RecipeError(f"{path}.{name}: unknown key; valid: {hint}")


def _section(plain: Mapping[str, Any], name: str, defaults: Mapping[str, Any] | None,
             ) -> dict[str, Any]:
    value = plain.get(name)
    if value is None:
        value = {}
    if not isinstance(value, Mapping):
        raise RecipeError(f"recipe.{name}: must be a mapping, got {value!r}")
    if defaults is None:
        return dict(value)
    for key in value:
        if key not in defaults:
            raise _unknown_key(f"recipe.{name}", str(key), list(defaults))
    return {**defaults, **value}


def _positive_int(value: Any, key: str, *, optional: bool = False) -> int | None:
    if value is None and optional:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise RecipeError(f"{key}: must be a positive integer{' or null' if optional else ''}, "
                          f"got {value!r}")
    return value


def _string(value: Any, key: str) -> str:
    if not isinstance(value, str) or not value:
        raise RecipeError(f"{key}: must be a non-empty string, got {value!r}")
    return value


def resolve_builtin(reference: str) -> Path:
    """``builtin:<file>`` -> the packaged data file; anything else -> a local path."""
    if reference.startswith(BUILTIN_PREFIX):
        return DATA_DIR / reference[len(BUILTIN_PREFIX):]
    return Path(reference).expanduser()


def _builtin_file(reference: str, key: str, suffixes: tuple[str, ...]) -> Path:
    path = resolve_builtin(reference)
    if reference.startswith(BUILTIN_PREFIX) and not path.is_file():
        shipped = sorted(p.name for p in DATA_DIR.iterdir() if p.suffix in suffixes)
        raise RecipeError(f"{key}: no packaged file {reference!r}; valid: "
                          + ", ".join(BUILTIN_PREFIX + s for s in shipped))
    return path


def validate_recipe(plain: Mapping[str, Any], *, name: str = "recipe",
                    source: Path | None = None) -> Recipe:
    """Check every section of a resolved recipe mapping; fill in defaults."""
    if not isinstance(plain, Mapping):
        raise RecipeError(f"recipe: must be a mapping with the sections {', '.join(SECTIONS)}")
    for key in plain:
        if key not in SECTIONS:
            raise _unknown_key("recipe", str(key), SECTIONS)
    model = _validate_model(_section(plain, "model", MODEL_DEFAULTS))
    data = _validate_data(_section(plain, "data", DATA_DEFAULTS))
    palettize = _validate_palettize(_section(plain, "palettize", None))
    train, training_args = _validate_train(_section(plain, "train", None))
    export = _validate_export(_section(plain, "export", EXPORT_DEFAULTS), train["output_dir"])
    return Recipe(name=name, model=model, data=data, palettize=palettize, train=train,
                  export=export, source=source, training_args=training_args)


def _validate_model(model: dict[str, Any]) -> dict[str, Any]:
    name_or_path, config = model["name_or_path"], model["config"]
    if name_or_path is None and config is None:
        raise RecipeError("recipe.model: missing; set model.name_or_path (an HF id or a local "
                          "directory) or model.config (a model built from scratch)")
    if name_or_path is not None and config is not None:
        raise RecipeError("recipe.model: set one of model.name_or_path and model.config, not both")
    if name_or_path is not None:
        _string(name_or_path, "recipe.model.name_or_path")
    else:
        _model_class_and_config(config)
        if model["tokenizer"] is None:
            raise RecipeError("recipe.model.tokenizer: missing; a model built from model.config "
                              "needs a tokenizer (builtin:<file>, a tokenizer.json or an HF id)")
    if model["tokenizer"] is not None:
        tokenizer = _string(model["tokenizer"], "recipe.model.tokenizer")
        if tokenizer.startswith(BUILTIN_PREFIX):
            _builtin_file(tokenizer, "recipe.model.tokenizer", (".json",))
    if model["dtype"] not in DTYPES:
        raise RecipeError(f"recipe.model.dtype: unknown dtype {model['dtype']!r}; "
                          f"valid: {', '.join(DTYPES)}")
    return model


def _model_class_and_config(config: Any) -> tuple[type[nn.Module], Any]:
    """``model.config`` -> (transformers model class, its config class). Validates the keys."""
    import transformers

    key = "recipe.model.config"
    if not isinstance(config, Mapping):
        raise RecipeError(f"{key}: must be a mapping (architecture: <class>, then config fields), "
                          f"got {config!r}")
    architecture = config.get("architecture")
    causal_lms = [n for n in dir(transformers) if n.endswith("ForCausalLM")]
    if architecture is None:
        raise RecipeError(f"{key}.architecture: missing; e.g. LlamaForCausalLM")
    cls = getattr(transformers, str(architecture), None)
    if str(architecture) not in causal_lms or not hasattr(cls, "config_class"):
        close = difflib.get_close_matches(str(architecture), causal_lms, n=3, cutoff=0.6)
        raise RecipeError(f"{key}.architecture: {architecture!r} is not a transformers causal LM "
                          f"class; valid: {', '.join(close) if close else 'a <Name>ForCausalLM'}")
    config_cls = cls.config_class
    fields = {k: v for k, v in config.items() if k != "architecture"}
    params = inspect.signature(config_cls.__init__).parameters
    valid = ({n for n, p in params.items() if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)}
             | {n for n in vars(config_cls()) if not n.startswith("_")}) - {"self"}
    for name in fields:
        if name not in valid:
            raise _unknown_key(key, str(name), sorted(valid),
                               what=f"a {config_cls.__name__} field")
    try:
        config_cls(**fields)
    except Exception as e:  # the config class's own validation (types, head divisibility ...)
        culprit = _culprit(lambda kw: config_cls(**kw), fields)
        raise RecipeError(f"{key}{'.' + culprit if culprit else ''}: {_one_line(e)}") from None
    return cls, config_cls


def _validate_data(data: dict[str, Any]) -> dict[str, Any]:
    files, dataset = data["files"], data["dataset"]
    if files is None and dataset is None:
        raise RecipeError("recipe.data: missing; set data.files or data.dataset")
    if files is not None and dataset is not None:
        raise RecipeError("recipe.data: set one of data.files and data.dataset, not both")
    if files is not None:
        files = [files] if isinstance(files, str) else files
        if not isinstance(files, list) or not files:
            raise RecipeError(f"recipe.data.files: must be a list of .txt/.jsonl paths, got {files!r}")
        for item in files:
            reference = _string(item, "recipe.data.files")
            path = _builtin_file(reference, "recipe.data.files", TEXT_SUFFIXES)
            if path.suffix not in TEXT_SUFFIXES:
                raise RecipeError(f"recipe.data.files: {reference!r} is not a "
                                  f"{'/'.join(TEXT_SUFFIXES)} file")
            if not path.is_file():
                raise RecipeError(f"recipe.data.files: no such file: {reference!r}")
        data["files"] = files
    else:
        _string(dataset, "recipe.data.dataset")
        if data["dataset_config"] is not None:
            _string(data["dataset_config"], "recipe.data.dataset_config")
        _string(data["split"], "recipe.data.split")
    _string(data["text_field"], "recipe.data.text_field")
    _positive_int(data["seq_len"], "recipe.data.seq_len")
    fraction = data["eval_fraction"]
    if (not isinstance(fraction, (int, float)) or isinstance(fraction, bool)
            or not 0 <= fraction < 1):
        raise RecipeError(f"recipe.data.eval_fraction: must be a number in [0, 1), got {fraction!r}")
    _positive_int(data["max_train_blocks"], "recipe.data.max_train_blocks", optional=True)
    return data


def _validate_palettize(palettize: dict[str, Any]) -> dict[str, Any]:
    if "export" in palettize:
        raise RecipeError("recipe.palettize.export: set the export in the recipe's own export "
                          "section (export.dir, export.formats)")
    resolve_settings(palettize, key="recipe.palettize")
    return palettize


def _training_fields() -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(TrainingArguments) if f.init}


def _validate_train(train: dict[str, Any]) -> tuple[dict[str, Any], TrainingArguments]:
    fields = _training_fields()
    for name, value in train.items():
        if name not in fields:
            raise _unknown_key("recipe.train", str(name), list(fields),
                               what="a transformers.TrainingArguments field")
        train[name] = _typed(value, fields[name].type, f"recipe.train.{name}")
    if not train.get("output_dir"):
        raise RecipeError("recipe.train.output_dir: missing; set the directory for checkpoints "
                          "(and the default export dir)")
    resume = train.get("resume_from_checkpoint")
    if resume not in (None, False, True):
        if not isinstance(resume, str) or not Path(resume).is_dir():
            raise RecipeError(f"recipe.train.resume_from_checkpoint: no such checkpoint "
                              f"directory: {resume!r}")
    elif resume is True and _last_checkpoint(train["output_dir"]) is None:
        raise RecipeError(f"recipe.train.resume_from_checkpoint: true, but "
                          f"{train['output_dir']} holds no checkpoint-<step> directory")
    kwargs = {k: v for k, v in train.items() if k != "resume_from_checkpoint"}
    try:
        args = TrainingArguments(**kwargs)
    except Exception as e:  # TrainingArguments.__post_init__ checks values and combinations
        culprit = _culprit(lambda kw: TrainingArguments(**kw), kwargs,
                           base={"output_dir": kwargs["output_dir"]})
        raise RecipeError(f"recipe.train{'.' + culprit if culprit else ''}: {_one_line(e)}"
                          ) from None
    return train, args


def _culprit(build: Callable[[dict[str, Any]], Any], kwargs: Mapping[str, Any],
             base: Mapping[str, Any] | None = None) -> str | None:
    """The first key whose value alone makes ``build`` fail (None: only the combination fails)."""
    for name, value in kwargs.items():
        try:
            build({**(base or {}), name: value})
        except Exception:
            return name
    return None


def _typed(value: Any, annotation: Any, key: str) -> Any:
    """Check a value against a simple ``TrainingArguments`` annotation (int, float, bool, str)."""
    if value is None:
        return value
    if annotation is bool and not isinstance(value, bool):
        raise RecipeError(f"{key}: must be true or false, got {value!r}")
    if annotation is int and (not isinstance(value, int) or isinstance(value, bool)):
        raise RecipeError(f"{key}: must be an integer, got {value!r}")
    if annotation is float:
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            raise RecipeError(f"{key}: must be a number, got {value!r}")
        return value
    if annotation is str and not isinstance(value, str):
        raise RecipeError(f"{key}: must be a string, got {value!r}")
    return value


def _last_checkpoint(output_dir: str | os.PathLike) -> str | None:
    from transformers.trainer_utils import get_last_checkpoint

    return get_last_checkpoint(str(output_dir)) if Path(output_dir).is_dir() else None


def _validate_export(export: dict[str, Any], output_dir: str) -> dict[str, Any]:
    formats = export["formats"]
    formats = [] if formats is None else [formats] if isinstance(formats, str) else formats
    if not isinstance(formats, list):
        raise RecipeError(f"recipe.export.formats: must be a list, got {formats!r}")
    for fmt in formats:
        if fmt not in EXPORT_FORMATS:
            raise RecipeError(f"recipe.export.formats: unknown format {fmt!r}; "
                              f"valid: {', '.join(EXPORT_FORMATS)}")
    export["formats"] = formats
    if export["dir"] is None:
        export["dir"] = str(Path(output_dir) / "palettized")
    _string(export["dir"], "recipe.export.dir")
    return export


# --------------------------------------------------------------------------------------------
# Hugging Face Hub access: fail fast and in one line when a hub reference cannot load
# --------------------------------------------------------------------------------------------


def _offline_env(repo_type: str) -> str | None:
    """``NAME=value`` of the first variable that switches the hub off for ``repo_type``."""
    names = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE" if repo_type == "dataset"
             else "TRANSFORMERS_OFFLINE")
    for name in names:
        if os.environ.get(name, "").strip().lower() in _TRUE:
            return f"{name}={os.environ[name]}"
    return None


def _hub_endpoint() -> tuple[str, int]:
    """The host and port a hub request connects to first (an HTTPS proxy if one is set)."""
    proxy = next((os.environ[n] for n in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")
                  if os.environ.get(n)), None)
    url = urlparse(proxy if proxy and "://" in proxy else f"http://{proxy}" if proxy
                   else os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    return url.hostname or "huggingface.co", url.port or (443 if url.scheme == "https" else 80)


_probe_cache: dict[tuple[str, int], bool] = {}


def hub_reachable(timeout: float = HUB_PROBE_TIMEOUT_S) -> bool:
    """A TCP connect to the hub (or proxy), bounded by ``timeout`` including DNS."""
    endpoint = _hub_endpoint()
    if endpoint not in _probe_cache:
        result: list[bool] = []

        def connect() -> None:
            try:
                socket.create_connection(endpoint, timeout=timeout).close()
                result.append(True)
            except OSError:
                result.append(False)

        probe = threading.Thread(target=connect, daemon=True)
        probe.start()
        probe.join(timeout + 0.5)
        _probe_cache[endpoint] = bool(result and result[0])
    return _probe_cache[endpoint]


def _is_local(reference: str) -> bool:
    return reference.startswith(BUILTIN_PREFIX) or resolve_builtin(reference).exists()


def _model_cached(repo_id: str) -> bool:
    from huggingface_hub import try_to_load_from_cache

    for filename in ("config.json", "tokenizer_config.json", "tokenizer.json"):
        with contextlib.suppress(ValueError):  # not a valid repo id: not cached
            if isinstance(try_to_load_from_cache(repo_id, filename), str):
                return True
    return False


def _dataset_cached(repo_id: str) -> bool:
    from huggingface_hub import constants

    hub = Path(constants.HF_HUB_CACHE) / f"datasets--{repo_id.replace('/', '--')}"
    datasets_cache = Path(os.environ.get("HF_DATASETS_CACHE")
                          or Path(constants.HF_HOME) / "datasets")
    return hub.is_dir() or (datasets_cache / repo_id.replace("/", "___")).is_dir()


def check_hub_access(reference: str, key: str, *, repo_type: str = "model") -> bool:
    """Whether ``reference`` must load from the local cache only (hub unreachable but cached).

    Raises ``RecipeError`` at once when it is neither local nor cached and the hub is disabled
    (``HF_HUB_OFFLINE`` ...) or does not answer a TCP connect within a few seconds.
    """
    if _is_local(reference):
        return False
    cached = _dataset_cached(reference) if repo_type == "dataset" else _model_cached(reference)
    offline = _offline_env(repo_type)
    if cached:
        return offline is not None or not hub_reachable()
    if offline is not None:
        why = f"offline: {offline}"
    elif hub_reachable():
        return False
    else:
        host, port = _hub_endpoint()
        why = f"no connection to {host}:{port} within {HUB_PROBE_TIMEOUT_S:g} s"
    download = "hf download" + (" --repo-type dataset" if repo_type == "dataset" else "")
    raise RecipeError(f"{key}: {reference!r} is not a local path and the Hugging Face Hub is "
                      f"unreachable ({why}); download it first ({download} {reference}) or point "
                      f"{key.rsplit('.', 1)[-1]} at a local copy")


# --------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------


class TokenBlocks(torch.utils.data.Dataset):
    """Fixed-length token blocks as causal-LM samples (``labels`` = ``input_ids``)."""

    def __init__(self, blocks: torch.Tensor) -> None:
        self.blocks = blocks

    def __len__(self) -> int:
        return int(self.blocks.shape[0])

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        ids = self.blocks[index]
        return {"input_ids": ids, "labels": ids.clone()}


def read_texts(data: Mapping[str, Any], *, local_files_only: bool = False) -> list[str]:
    """The documents of ``data``: each ``.txt`` file whole, each ``.jsonl`` record's text field,
    or each non-empty row of an HF dataset split."""
    field_name = data["text_field"]
    if data["files"] is not None:
        texts: list[str] = []
        for reference in data["files"]:
            path = resolve_builtin(reference)
            if path.suffix == ".txt":
                texts.append(path.read_text(encoding="utf-8"))
                continue
            for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as e:
                    raise RecipeError(f"recipe.data.files: {reference}:{number}: invalid JSON "
                                      f"({e.msg})") from None
                if not isinstance(record, Mapping) or not isinstance(record.get(field_name), str):
                    raise RecipeError(f"recipe.data.text_field: {reference}:{number} has no "
                                      f"string field {field_name!r}")
                texts.append(record[field_name])
        return texts
    return _read_hub_dataset(data, local_files_only=local_files_only)


def _require_datasets() -> Any:
    try:
        import datasets
    except ImportError:
        raise RecipeError("recipe.data.dataset: the 'datasets' package is not installed; "
                          "pip install 'coreai-palettize-plugins[hub]' (or use data.files)") from None
    return datasets


def _read_hub_dataset(data: Mapping[str, Any], *, local_files_only: bool) -> list[str]:
    datasets = _require_datasets()
    download_config = datasets.DownloadConfig(local_files_only=local_files_only)
    table = datasets.load_dataset(data["dataset"], data["dataset_config"], split=data["split"],
                                  download_config=download_config)
    if data["text_field"] not in table.column_names:
        raise RecipeError(f"recipe.data.text_field: {data['text_field']!r} is not a column of "
                          f"{data['dataset']}; valid: {', '.join(table.column_names)}")
    return [t for t in table[data["text_field"]] if isinstance(t, str) and t.strip()]


def tokenize_blocks(texts: Sequence[str], tokenizer: Any, seq_len: int) -> torch.Tensor:
    """Tokenize, join the documents with EOS, cut into ``(n, seq_len)`` blocks (tail dropped)."""
    eos = tokenizer.eos_token_id
    if eos is None:
        raise RecipeError("recipe.model.tokenizer: the tokenizer has no EOS token to separate "
                          "documents")
    encoded = tokenizer(list(texts), add_special_tokens=False)["input_ids"]
    stream = [token for ids in encoded for token in (*ids, eos)]
    count = len(stream) // seq_len
    return torch.tensor(stream[: count * seq_len], dtype=torch.long).view(count, seq_len)


def split_blocks(blocks: torch.Tensor, eval_fraction: float,
                 max_train_blocks: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(train, eval): the last ``eval_fraction`` of the blocks are held out (deterministic)."""
    held_out = math.ceil(len(blocks) * eval_fraction) if eval_fraction > 0 else 0
    train, evaluation = blocks[: len(blocks) - held_out], blocks[len(blocks) - held_out:]
    if max_train_blocks is not None:
        train = train[:max_train_blocks]
    return train, evaluation


# --------------------------------------------------------------------------------------------
# Model and tokenizer
# --------------------------------------------------------------------------------------------


def load_tokenizer(reference: str, *, local_files_only: bool = False) -> Any:
    """``builtin:``/local ``tokenizer.json`` -> ``PreTrainedTokenizerFast``; else AutoTokenizer."""
    path = resolve_builtin(reference)
    if path.is_file() and path.suffix == ".json":
        from tokenizers import Tokenizer
        from transformers import PreTrainedTokenizerFast

        vocab = Tokenizer.from_file(str(path)).get_vocab()
        specials = {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>",
                    "unk_token": "<unk>"}
        return PreTrainedTokenizerFast(tokenizer_file=str(path),
                                       **{k: v for k, v in specials.items() if v in vocab})
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path) if path.exists() else reference,
                                         local_files_only=local_files_only)


def build_model(model_section: Mapping[str, Any], tokenizer: Any, *,
                local_files_only: bool = False) -> nn.Module:
    """The recipe's model: pretrained from ``name_or_path`` or built from ``config`` (random)."""
    dtype = getattr(torch, model_section["dtype"])
    if model_section["config"] is not None:
        cls, config_cls = _model_class_and_config(model_section["config"])
        fields = {k: v for k, v in model_section["config"].items() if k != "architecture"}
        fields.setdefault("architectures", [cls.__name__])  # load_palettized(dir) reads it
        fields.setdefault("vocab_size", len(tokenizer))
        for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
            fields.setdefault(name, getattr(tokenizer, name, None))
        return cls(config_cls(**fields)).to(dtype)
    from transformers import AutoModelForCausalLM

    reference = model_section["name_or_path"]
    path = resolve_builtin(reference)
    return AutoModelForCausalLM.from_pretrained(str(path) if path.exists() else reference,
                                                dtype=dtype, local_files_only=local_files_only)


@torch.no_grad()
def perplexity(model: nn.Module, blocks: torch.Tensor, batch_size: int = 8) -> float | None:
    """exp of the token-weighted mean next-token NLL over ``blocks`` (eval mode, no grad)."""
    if len(blocks) == 0:
        return None
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    total_nll, total_tokens = 0.0, 0
    try:
        for start in range(0, len(blocks), batch_size):
            ids = blocks[start:start + batch_size].to(device)
            logits = model(input_ids=ids, use_cache=False).logits
            for row, targets in zip(logits, ids):
                total_nll += float(F.cross_entropy(row[:-1].float(), targets[1:], reduction="sum"))
                total_tokens += targets.numel() - 1
    finally:
        model.train(was_training)
    return math.exp(total_nll / total_tokens)


# --------------------------------------------------------------------------------------------
# Runner
# --------------------------------------------------------------------------------------------


class RecipeSnapshotCallback(TrainerCallback):
    """Writes the resolved recipe into every checkpoint directory (main process only)."""

    def __init__(self, recipe_yaml: str) -> None:
        self.recipe_yaml = recipe_yaml

    def on_save(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                **kwargs: Any) -> None:
        checkpoint = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        if state.is_world_process_zero and checkpoint.is_dir():
            (checkpoint / RECIPE_FILE).write_text(self.recipe_yaml)


def _existing_ancestor(path: Path) -> Path:
    path = path.absolute()
    while not path.exists():
        path = path.parent
    return path


def _remove_created(path: Path, keep: Path) -> None:
    """Remove ``path`` and its parents up to ``keep`` if a failed run left them empty."""
    path = path.absolute()
    with contextlib.suppress(OSError):
        while path != keep and path.is_dir() and not any(path.iterdir()):
            path.rmdir()
            path = path.parent


def _check_hub_references(recipe: Recipe) -> tuple[bool, bool, bool]:
    """Fail fast (one line) for hub references that cannot load; returns which of model,
    tokenizer and dataset must load from the local cache only."""
    model_ref = recipe.model["name_or_path"]
    tokenizer_key = "tokenizer" if recipe.model["tokenizer"] else "name_or_path"
    local_model = model_ref is not None and check_hub_access(model_ref, "recipe.model.name_or_path")
    local_tokenizer = check_hub_access(recipe.model["tokenizer"] or model_ref,
                                       f"recipe.model.{tokenizer_key}")
    local_dataset = False
    if recipe.data["dataset"] is not None:
        _require_datasets()
        local_dataset = check_hub_access(recipe.data["dataset"], "recipe.data.dataset",
                                         repo_type="dataset")
    return local_model, local_tokenizer, local_dataset


def _train_and_eval_blocks(recipe: Recipe, tokenizer: Any, *, local_files_only: bool,
                           ) -> tuple[torch.Tensor, torch.Tensor]:
    data = recipe.data
    blocks = tokenize_blocks(read_texts(data, local_files_only=local_files_only), tokenizer,
                             data["seq_len"])
    train, evaluation = split_blocks(blocks, data["eval_fraction"], data["max_train_blocks"])
    if len(train) == 0:
        raise RecipeError(f"recipe.data: {blocks.numel()} tokens make {len(blocks)} block(s) of "
                          f"seq_len {data['seq_len']}, none left for training; add text or lower "
                          "data.seq_len / data.eval_fraction")
    return train, evaluation


def finetune(source: str | os.PathLike | Mapping[str, Any] | Recipe,
             overrides: Sequence[str] = ()) -> dict[str, Any]:
    """Run a recipe: validate, load model and data, palettize, fine-tune, export, evaluate.

    Returns (and writes to ``<export dir>/finetune_results.json``, or the output dir when nothing
    is exported) held-out perplexities of the dense, freshly palettized and fine-tuned model, the
    k-means time, bits per weight and the artifact paths and sizes. The returned dict also holds
    the ``CompressionReport`` (``"report"``) and the ``Trainer`` (``"trainer"``, its ``model`` is
    the fine-tuned palettized model); those two are not in the JSON file.
    """
    from transformers import Trainer, default_data_collator, set_seed

    from .hf import PalettizationTrainerCallback

    if isinstance(source, Recipe):  # validated again: its sections may have been edited
        recipe = validate_recipe(source.to_dict(), name=source.name, source=source.source)
    else:
        recipe = load_recipe(source, overrides)
    local_model, local_tokenizer, local_dataset = _check_hub_references(recipe)

    args = recipe.training_args
    tokenizer = load_tokenizer(recipe.model["tokenizer"] or recipe.model["name_or_path"],
                               local_files_only=local_tokenizer)
    train_blocks, eval_blocks = _train_and_eval_blocks(recipe, tokenizer,
                                                       local_files_only=local_dataset)
    set_seed(args.seed)
    model = build_model(recipe.model, tokenizer, local_files_only=local_model).to(args.device)
    batch = args.per_device_eval_batch_size
    dense_ppl = perplexity(model, eval_blocks, batch)

    recipe_yaml = recipe.to_yaml()
    callback = PalettizationTrainerCallback(
        recipe.palettize, export_dir=recipe.export_dir, export_formats=recipe.export["formats"],
        extra_export_files=lambda directory: (directory / RECIPE_FILE).write_text(recipe_yaml),
        key="recipe.palettize")
    keep = _existing_ancestor(recipe.output_dir)
    try:  # builds the palettized structure (on_init_end)
        trainer = Trainer(model=model, args=args, train_dataset=TokenBlocks(train_blocks),
                          eval_dataset=TokenBlocks(eval_blocks) if len(eval_blocks) else None,
                          data_collator=default_data_collator, processing_class=tokenizer,
                          callbacks=[callback, RecipeSnapshotCallback(recipe_yaml)])
    except BaseException:  # e.g. a modules regex that matches no module
        _remove_created(recipe.output_dir, keep)
        raise

    resume = recipe.resume_from_checkpoint
    if resume is True:
        resume = _last_checkpoint(recipe.output_dir)
    prepare_seconds = palettized_ppl = None
    if not resume:  # on resume, train() loads the checkpoint's LUTs and indices instead
        started = time.perf_counter()
        callback.engine.cluster()
        prepare_seconds = time.perf_counter() - started
        palettized_ppl = perplexity(trainer.model, eval_blocks, batch)
    train_output = trainer.train(resume_from_checkpoint=resume)
    finetuned_ppl = perplexity(trainer.model, eval_blocks, batch)

    report = callback.report or callback.engine.report()
    exported = callback.export_result
    results: dict[str, Any] = {
        "recipe": recipe.name,
        "perplexity": {"dense": dense_ppl, "palettized": palettized_ppl,
                       "finetuned": finetuned_ppl},
        "prepare_seconds": prepare_seconds,
        "train_seconds": train_output.metrics.get("train_runtime"),
        "global_step": trainer.state.global_step,
        "resumed_from": resume or None,
        "train_blocks": len(train_blocks),
        "eval_blocks": len(eval_blocks),
        "seq_len": recipe.data["seq_len"],
        "bits_per_weight": report.bits_per_weight,
        "compression_ratio": report.compression_ratio,
        "palettized_layers": len(report.layers),
        "dense_layers": len(report.dense_layers),
        "dense_bytes": report.dense_bytes,
        "palettized_bytes": report.palettized_bytes,
        "output_dir": str(recipe.output_dir),
        "export_dir": str(exported.directory) if exported else None,
        "artifacts": {fmt: str(p) for fmt, p in exported.written.items()} if exported else {},
        "artifact_bytes": {fmt: report.extra.get(f"{fmt}_artifact_bytes")
                           for fmt in (exported.written if exported else {})},
        "export_errors": dict(exported.errors) if exported else {},
    }
    if args.should_save:
        results["results_file"] = str(_write_results(
            results, Path(results["export_dir"] or recipe.output_dir)))
    return {**results, "report": report, "trainer": trainer}


def _write_results(results: Mapping[str, Any], directory: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / RESULTS_FILE
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps({**results, "results_file": str(path)}, indent=2) + "\n")
    os.replace(tmp, path)
    return path


def format_summary(results: Mapping[str, Any]) -> str:
    """A few lines for the end of a run: perplexities, k-means time, size, where things are."""

    def ppl(value: float | None) -> str:
        return "n/a" if value is None else f"{value:.2f}"

    p = results["perplexity"]
    lines = [
        f"{results['recipe']}: held-out perplexity dense {ppl(p['dense'])} | palettized "
        f"{ppl(p['palettized'])} | fine-tuned {ppl(p['finetuned'])} "
        f"({results['eval_blocks']} blocks x {results['seq_len']} tokens)",
        ("k-means (prepare) skipped: resumed from " + str(results["resumed_from"])
         if results["prepare_seconds"] is None
         else f"k-means (prepare) {results['prepare_seconds']:.2f} s")
        + (f"; training {results['train_seconds']:.1f} s, {results['global_step']} steps"
           if results.get("train_seconds") is not None else ""),
        f"{results['palettized_layers']} weights palettized, {results['dense_layers']} dense; "
        f"{results['bits_per_weight']:.3f} bits/weight; {results['dense_bytes'] / 1024:.1f} KiB "
        f"-> {results['palettized_bytes'] / 1024:.1f} KiB ({results['compression_ratio']:.2f}x)",
    ]
    for fmt, path in results["artifacts"].items():
        size = results["artifact_bytes"].get(fmt)
        lines.append(f"  {fmt}: {path}" + (f" ({size / 1024:.1f} KiB)" if size else ""))
    for fmt, error in results["export_errors"].items():
        lines.append(f"  {fmt}: not written ({error})")
    if results.get("results_file"):
        lines.append(f"  results: {results['results_file']}")
    return "\n".join(lines)
