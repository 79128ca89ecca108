"""Put the packaged ``palettize`` and ``callbacks/palettize`` config groups on every Hydra app's
search path, so ``defaults: [palettize: w4]`` or ``palettize=w4`` works with no files copied.

Hydra imports every ``hydra_plugins`` module whenever a Hydra app starts, so this one stays cheap:
Hydra, OmegaConf and the standard library only. The configs are served by a small config source
(scheme ``coreai-palettize://``) reading ``coreai_palettize_plugins/conf`` from disk. The group's
schema, ``palettize/base`` (``PalettizeSettings``, which the YAML options extend), is served from
the ConfigStore entry ``coreai_palettize_plugins.settings`` registers when imported; the source
imports it (torch, coreai-opt) only then, i.e. only in apps that use the group. (Registering it
from here at start-up would not do: Hydra snapshots the ConfigStore when composition starts.
When the app imported the package before composing, the snapshot has the schema and Hydra's own
``structured://`` source serves it.)
"""

from __future__ import annotations

import importlib
import importlib.util
from pathlib import Path

from hydra.core.config_search_path import ConfigSearchPath
from hydra.core.config_store import ConfigStore
from hydra.core.object_type import ObjectType
from hydra.plugins.config_source import ConfigLoadError, ConfigResult, ConfigSource
from hydra.plugins.search_path_plugin import SearchPathPlugin
from omegaconf import OmegaConf

PACKAGE = "coreai_palettize_plugins"
SCHEME = "coreai-palettize"
SEARCH_PATH = f"{SCHEME}://{PACKAGE}/conf"
PROVIDER = "coreai-palettize-plugins"
SCHEMAS = ("palettize/base.yaml",)
"""Structured configs registered in the ConfigStore by ``import coreai_palettize_plugins.settings``."""


def packaged_conf_dir() -> Path | None:
    """``coreai_palettize_plugins/conf`` on disk, located without importing the package."""
    try:
        spec = importlib.util.find_spec(PACKAGE)
    except (ImportError, ValueError):
        return None
    for location in (spec.submodule_search_locations or []) if spec is not None else []:
        conf = Path(location) / "conf"
        if conf.is_dir():
            return conf
    return None


class PalettizeConfigSource(ConfigSource):
    """The package's ``conf/`` directory, plus the ``palettize/base`` schema on demand."""

    def __init__(self, provider: str, path: str) -> None:
        super().__init__(provider=provider, path=path)
        self.root = packaged_conf_dir()
        store = ConfigStore.instance()
        self.missing_schemas = {s for s in SCHEMAS if store.get_type(s) != ObjectType.CONFIG}

    def __deepcopy__(self, memo: dict) -> PalettizeConfigSource:
        # Hydra deep-copies its repository, ConfigStore included, when a composition starts: serve
        # a schema only if that snapshot lacks it (a config shadowing a schema makes Hydra warn).
        return type(self)(self.provider, self.full_path())

    @staticmethod
    def scheme() -> str:
        return SCHEME

    def _path(self, config_path: str) -> Path | None:
        return self.root / config_path if self.root is not None else None

    def load_config(self, config_path: str) -> ConfigResult:
        normalized = self._normalize_file_name(config_path)
        if normalized in self.missing_schemas and self.root is not None:
            importlib.import_module(f"{PACKAGE}.settings")  # its import registers the schema
            node = ConfigStore.instance().load(normalized)
            return ConfigResult(config=node.node, path=self.full_path(), provider=self.provider,
                                header={"package": node.package})
        file = self._path(normalized)
        if file is None or not file.is_file():
            raise ConfigLoadError(f"Config not found : {self.full_path()}/{normalized}")
        with file.open(encoding="utf-8") as stream:
            header = self._get_header_dict(stream.read(512))
        return ConfigResult(config=OmegaConf.load(file), path=self.full_path(),
                            provider=self.provider, header=header)

    def available(self) -> bool:
        return self.root is not None

    def is_group(self, config_path: str) -> bool:
        path = self._path(config_path)
        return path is not None and path.is_dir()

    def is_config(self, config_path: str) -> bool:
        normalized = self._normalize_file_name(config_path)
        path = self._path(normalized)
        return path is not None and (normalized in self.missing_schemas or path.is_file())

    def list(self, config_path: str, results_filter: ObjectType | None) -> list[str]:
        directory = self._path(config_path)
        if directory is None or not directory.is_dir():
            return []
        names = {entry.name for entry in directory.iterdir()}
        names |= {schema.rpartition("/")[2] for schema in self.missing_schemas
                  if schema.rpartition("/")[0] == config_path.strip("/")}
        files: list[str] = []
        for name in sorted(names):
            self._list_add_result(files=files, file_path=f"{config_path}/{name}".lstrip("/"),
                                  file_name=name, results_filter=results_filter)
        return files


class PalettizeSearchPathPlugin(SearchPathPlugin):
    """Appends ``coreai-palettize://coreai_palettize_plugins/conf`` to every app's search path,
    after the app's own config directory (whose configs therefore win on a name clash)."""

    def manipulate_search_path(self, search_path: ConfigSearchPath) -> None:
        if packaged_conf_dir() is not None:
            search_path.append(provider=PROVIDER, path=SEARCH_PATH)
