"""What a checkpoint holds besides the model's own tensors (the engine's ``state_dict``), and the
check that a restore brought every palettized weight's state."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from .. import _coreai_compat as compat
from ..accuracy.budget import Allocation
from ..accuracy.calibration import CalibrationStats
from ..core.checks import PalettizeConfigError

__all__ = ["engine_state", "read_engine_state", "require_restored"]

VERSION = 1


def engine_state(step: int, config_yaml: str, calibration: CalibrationStats | None,
                 allocation: Allocation | None) -> dict[str, Any]:
    """The PAT step, the coreai-opt config, and the calibration's and budget's results."""
    state: dict[str, Any] = {"version": VERSION, "step": step, "config": config_yaml}
    if calibration is not None:
        state["calibration"] = calibration.to_dict()
    if allocation is not None:
        state["budget"] = allocation.to_dict()
    return state


def read_engine_state(state: Mapping[str, Any], config_yaml: str
                      ) -> tuple[int, CalibrationStats | None]:
    """The step and calibration stats of ``engine_state``'s output.

    Raises:
        PalettizeConfigError: the checkpoint was palettized with another config.
    """
    saved = state.get("config")
    if saved is not None and saved != config_yaml:
        raise PalettizeConfigError("", "the checkpoint was palettized with a different config "
                                   "than this run's; resume with the same palettize settings")
    calibration = state.get("calibration")
    return int(state.get("step", 0)), CalibrationStats(**calibration) if calibration else None


def require_restored(tensors: list[compat.PalettizedTensor], restored: list[bool]) -> None:
    """Every palettized weight has restored centroids and indices.

    Raises:
        RuntimeError: naming the weights without them, instead of silently re-clustering or
            re-deriving them.
    """
    missing = [t.name for t, ok in zip(tensors, restored) if not ok]
    if missing:
        raise RuntimeError(
            f"the loaded checkpoint has no palettized state (centroids/indices) for "
            f"{len(missing)} weight(s): {', '.join(missing[:5])}"
            f"{' ...' if len(missing) > 5 else ''}; it does not come from this config")
