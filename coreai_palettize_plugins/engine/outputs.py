"""The engine's report and export half (``Palettization`` inherits it): the compression report,
the export (one process, rank 0 of a DDP run, or an FSDP2 model gathered to rank 0) and the end of
training. The phases it calls (``export.phase``) never see the engine."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch.nn as nn

from ..core import strategies
from ..core._inputs import CallSpec
from ..core._inputs import as_call_spec as as_example_inputs
from ..export import phase as export_step
from ..export.report import CompressionReport
from ..export.writer import ExportResult
from . import fsdp

__all__ = ["ReportAndExport"]


class ReportAndExport:
    """``report``, ``export``, ``finish_training`` and friends: a mixin of ``Palettization``,
    whose state (``model``, ``settings``, ``tensors()``, ``stop_training()`` ...) they read."""

    model: nn.Module | None
    settings: Any
    example_inputs: CallSpec

    def _trace_record(self) -> dict[str, Any]:
        return self._attached.trace_record(self.settings)

    def report(self) -> CompressionReport:
        """The compression report (whole-model sizes; dense weights with their reasons)."""
        self._require_clustered()
        if fsdp.model_is_sharded(self.model):  # every rank takes part
            return fsdp.report(self)
        return export_step.report(self.model, self._trace_record(), self.calibration_stats,
                                  self.allocation)

    def _require_clustered(self) -> None:
        self._require_attached()
        export_step.require_clustered(self.tensors())

    def set_export_inputs(self, example_inputs: Any) -> None:
        """Trace the export with these inputs (e.g. a real data sample) instead of attach's:
        anything ``attach`` takes (a tensor, a tuple, a mapping of keywords, a ``CallSpec``)."""
        self.example_inputs = as_example_inputs(example_inputs, self.model).detached_cpu()

    def export(
        self,
        directory: str | Path | None = None,
        *,
        formats: Sequence[str] | None = None,
        metadata: Mapping[str, Any] | None = None,
        extra_files: Callable[[Path], None] | None = None,
        configure_model: Callable[[nn.Module], None] | None = None,
        strict: bool = False,
    ) -> ExportResult:
        """Write ``.aimodel``, the packed artifact and the report to ``directory`` (atomic).

        ``configure_model(fresh)`` may adjust the rebuilt export copy (e.g. disable a KV cache);
        ``extra_files(tmp_dir)`` may add files (config, tokenizer) before the rename.

        Raises:
            ValueError: no ``directory`` and no ``palettize.export.dir``.
            ExportError: with ``strict``, a format could not be written.
        """
        self._require_clustered()
        directory = directory or self.settings.export.dir
        if directory is None:
            raise ValueError("no export directory: pass one or set palettize.export.dir")
        return export_step.export(
            self.model, directory, compact=self.compact, allocation=self.allocation,
            extra_files=extra_files, config=self.config, example_inputs=self.example_inputs,
            factory=lambda: export_step.new_model(self._model_factory, self._skeleton,
                                                  configure_model),
            formats=formats if formats is not None else self.settings.export.formats,
            report=self.report(), metadata=metadata, strict=strict,
            adapters=export_step.adapter_export(self.adapters, self.settings.adapters))

    def finish_training(self, default_export_dir: str | Path, **export_kwargs: Any
                        ) -> ExportResult | None:
        """End of training: leave training mode, then export on rank 0 (if any format is set)
        to ``palettize.export.dir`` or ``default_export_dir``. Returns the result on rank 0."""
        self.stop_training()
        if self.distiller is not None:  # frees the teacher
            self.distiller.remove()
        result = None
        if self.settings.export.formats:
            result = self.export_on_main(self.settings.export.dir or default_export_dir,
                                         **export_kwargs)
        for t in self.tensors():           # what the export's reads cached: the first eval
            strategies.drop_cache(t.fake)  # forward after training caches it again
        return result

    def export_on_main(self, directory: str | Path | None = None, **kwargs: Any
                       ) -> ExportResult | None:
        """``export`` on global rank 0 only; the other ranks wait for it without a deadline
        (not at a barrier bounded by the process group's timeout). An FSDP2 model's full state
        is gathered to rank 0 first (every rank takes part)."""
        if fsdp.model_is_sharded(self.model):
            return fsdp.export_on_main(self, directory, **kwargs)
        return export_step.on_main(self.dist, lambda: self.export(directory, **kwargs))

    def check_export_dir(self, default_export_dir: str | Path) -> None:
        """Refuse a bad export directory before training (``palettize.export.dir``, else
        ``default_export_dir``), on rank 0; nothing is created. Raises PalettizeConfigError."""
        if self.settings.export.formats:
            export_step.check_dir(self.dist, self.settings.export.dir or default_export_dir)
