"""Validation primitives: the one-line ``RecipeError``, the value checks that raise it, and the
read-only containers a validated recipe is made of."""

from __future__ import annotations

import difflib
from collections.abc import Mapping, Sequence
from typing import Any


class RecipeError(ValueError):
    """A bad recipe, or one that cannot run here. The message is one line naming the key."""


def one_line(error: BaseException) -> str:
    """The innermost cause's message, first line (HF wraps config errors in tracebacks)."""
    while error.__cause__ is not None:
        error = error.__cause__
    lines = [line.strip() for line in str(error).strip().splitlines() if line.strip()]
    return lines[0] if lines else type(error).__name__


def unknown_key(path: str, name: str, valid: Sequence[str], what: str | None = None) -> RecipeError:
    """``<path>.<name>: unknown key; valid: ...`` (close matches where the list is long)."""
    valid = sorted(valid)
    if len(valid) <= 12 or what is None:
        hint = ", ".join(valid)
    else:
        close = difflib.get_close_matches(name, valid, n=3, cutoff=0.6)
        hint = ", ".join(close) if close else what
    return RecipeError(f"{path}.{name}: unknown key; valid: {hint}")


def positive_int(value: Any, key: str, *, optional: bool = False) -> None:
    if value is None and optional:
        return
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise RecipeError(f"{key}: must be a positive integer{' or null' if optional else ''}, "
                          f"got {value!r}")


def nonempty_string(value: Any, key: str) -> str:
    if not isinstance(value, str) or not value:
        raise RecipeError(f"{key}: must be a non-empty string, got {value!r}")
    return value


class ReadOnlyDict(dict):
    """A ``dict`` that refuses edits: recipe sections are validated once, when they are built."""

    def _refuse(self, *args: Any, **kwargs: Any) -> None:
        raise TypeError("recipe sections are read-only; build a new recipe "
                        "(load_recipe with overrides, or dataclasses.replace)")

    __setitem__ = __delitem__ = __ior__ = clear = pop = popitem = setdefault = update = _refuse

    def __reduce__(self) -> tuple[Any, ...]:  # copy, deepcopy and pickle without __setitem__
        return type(self), (dict(self),)


def freeze(value: Any) -> Any:
    """Mappings -> ``ReadOnlyDict``, lists -> tuples, recursively."""
    if isinstance(value, Mapping):
        return ReadOnlyDict({k: freeze(v) for k, v in value.items()})
    if isinstance(value, (list, tuple)):
        return tuple(freeze(v) for v in value)
    return value


def thaw(value: Any) -> Any:
    """The inverse of ``freeze``: plain dicts and lists (what YAML, JSON and HF expect)."""
    if isinstance(value, Mapping):
        return {k: thaw(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [thaw(v) for v in value]
    return value


def as_mapping(value: Any, key: str) -> dict[str, Any]:
    """A section's plain mapping (None: empty); anything else is an error."""
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise RecipeError(f"{key}: must be a mapping, got {value!r}")
    return thaw(value)
