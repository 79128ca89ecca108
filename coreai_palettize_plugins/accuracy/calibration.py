"""``palettize.calibration``: sensitivity-weighted k-means from the training data (SqueezeLLM).

The sensitivity of a weight element is the diagonal Fisher information: the mean over calibration
batches of the squared gradient of the model's own training loss (Lightning ``training_step``,
HF ``Trainer.compute_loss``) with respect to it, taken on the dense weights before k-means.
coreai-opt's weighted 1-D k-means then places the centroids closer to the sensitive values.

How it runs (``calibrate``, called by ``Palettization.cluster`` while clustering is deferred):

- the data: the first ``samples`` (or ``batches`` x batch size) samples of the train dataset, in
  order, collated in training-size batches by the loader's own ``collate_fn``; global batch ``b``
  goes to rank ``b % world``. The train dataloader is never iterated (its sampler, workers and RNG
  stay untouched). Streamed datasets: the first batches of a new iterator of the loader, per rank;
- the pass: eval mode (no dropout, no batch-norm statistic updates), gradients only for the
  palettized weights, each squared into a float64 accumulator by a post-accumulate hook that frees
  the gradient at once; no optimizer step; mode, ``requires_grad``, existing ``.grad`` and the RNG
  (torch CPU/CUDA, ``random``, numpy) restored afterwards. Peak memory: one forward/backward plus
  8 bytes per palettized weight (the float64 sums; the fp32 sensitivities replace them tensor by
  tensor), i.e. a training step's weight gradients plus the sensitivities;
- distributed: one all-reduce of the sums and counts, so every rank holds the identical result,
  equal to one process given the same batches (float64 sums of exact float64 squares);
- ``path``: saved there (rank 0, atomically) after computing; if the file exists it is loaded
  (rank 0, broadcast) instead, and the log says which. coreai-opt's own sensitivity files
  (``<module>.parametrizations.weight.original`` keys) load too.

coreai-opt's ``calibration_mode`` is not used: it writes a full ``state_dict`` to ``$TMPDIR`` and
re-clusters every weight on every rank.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import random
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from .. import _coreai_compat as compat
from ..core import sharding
from ..core._utils import is_int
from ..core.checks import PalettizeConfigError, build_section, choices, section_mapping
from ..core.dist_context import DistContext

__all__ = ["CalibrationData", "CalibrationSettings", "CalibrationStats", "build_calibration",
           "compute_sensitivities", "kmeans_weights", "load_sensitivities", "move_to_device",
           "save_sensitivities"]

log = logging.getLogger(__name__)

KEYS = ("samples", "batches", "path", "show_progress")
FILE_FORMAT = "coreai-palettize-sensitivities"


# --------------------------------------------------------------------------------------------
# What the adapters hand in, what calibration reports
# --------------------------------------------------------------------------------------------


@dataclass
class CalibrationData:
    """What an adapter hands the engine: the loss and where the training data is.

    ``loss(batch, batch_index)``: the model's own training loss of one collated batch (moved to
    the device by the adapter). ``dataset`` + ``collate_fn`` + ``batch_size``: the deterministic
    plan (see the module docstring); else ``loader`` is iterated (a new iterator).
    """

    loss: Callable[[Any, int], torch.Tensor]
    loader: Iterable[Any] | None = None
    dataset: Any = None
    collate_fn: Callable[[list[Any]], Any] | None = None
    batch_size: int | None = None

    @classmethod
    def from_loader(cls, loss: Callable[[Any, int], torch.Tensor], loader: Any,
                    batch_size: int | None = None) -> CalibrationData:
        """From a torch ``DataLoader`` (its dataset, collate_fn, batch size) or any iterable."""
        return cls(loss=loss, loader=loader, dataset=getattr(loader, "dataset", None),
                   collate_fn=getattr(loader, "collate_fn", None),
                   batch_size=batch_size or getattr(loader, "batch_size", None))


@dataclass
class CalibrationStats:
    """What calibration did (``report.calibration``, ``report.json``)."""

    source: str            # "computed" or "loaded"
    samples: int
    batches: int
    seconds: float
    weights: int
    world_size: int
    path: str | None = None
    data: str = ""         # how the batches were chosen

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# --------------------------------------------------------------------------------------------
# Settings
# --------------------------------------------------------------------------------------------


@dataclass
class CalibrationSettings:
    """``palettize.calibration``: exactly one of ``samples``/``batches``; optional ``path``.

    All fields null (the Hydra schema's default node) means off, like ``calibration: null``.
    """

    samples: int | None = None
    batches: int | None = None
    path: str | None = None
    show_progress: bool = True

    def __post_init__(self) -> None:
        given = [k for k in ("samples", "batches") if getattr(self, k) is not None]
        if len(given) != 1:
            raise PalettizeConfigError(
                "", "set exactly one of samples, batches (e.g. {samples: 128})"
                + ("; got both" if len(given) == 2 else ""))
        value = getattr(self, given[0])
        if not is_int(value) or value < 1:
            raise PalettizeConfigError(given[0], f"must be an integer >= 1, got {value!r}")
        if self.path is not None:
            self.path = os.fspath(self.path)
            if not self.path or Path(self.path).is_dir():
                raise PalettizeConfigError("path", f"must be a file path, got {self.path!r}")
        if not isinstance(self.show_progress, bool):
            raise PalettizeConfigError("show_progress",
                                       f"must be true or false, got {self.show_progress!r}")


def build_calibration(value: Any) -> CalibrationSettings | None:
    """``palettize.calibration`` from null, a mapping or ``CalibrationSettings`` (None: off).

    Raises:
        PalettizeConfigError: naming ``calibration.<key>`` and the valid keys or values.
    """
    if value is None or isinstance(value, CalibrationSettings):
        return value
    if dataclasses_like(value):
        value = asdict(value)
    section = section_mapping(CalibrationSettings, value, "calibration", f"must be null or a "
                              f"mapping with one of samples, batches (keys: {choices(KEYS)}), "
                              f"got {value!r}")
    if all(section.get(k) is None for k in ("samples", "batches", "path")):
        return None  # the Hydra schema's all-null node
    return build_section(CalibrationSettings, section, "calibration")


def dataclasses_like(value: Any) -> bool:
    import dataclasses

    return dataclasses.is_dataclass(value) and not isinstance(value, type)


# --------------------------------------------------------------------------------------------
# Computing sensitivities
# --------------------------------------------------------------------------------------------


def palettized_weights(model: nn.Module) -> dict[str, nn.Parameter]:
    """``{fully qualified weight name: dense Parameter}``: the palettized weights of a prepared
    model, else every floating-point parameter of 2+ dimensions."""
    tensors = compat.fake_palettized_tensors(model)
    if tensors:
        return {t.name: t.original for t in tensors}
    return {n: p for n, p in model.named_parameters() if p.dim() >= 2 and p.is_floating_point()}


def _batch_size(batch: Any) -> int:
    """Samples in a batch: the first dimension of its first tensor (1 if it has none)."""
    if isinstance(batch, torch.Tensor):
        return int(batch.shape[0]) if batch.dim() else 1
    values = batch.values() if isinstance(batch, Mapping) else batch
    if isinstance(values, Iterable) and not isinstance(batch, (str, bytes)):
        for value in values:
            size = _batch_size(value)
            if size:
                return size
    return 0


def move_to_device(batch: Any, device: torch.device) -> Any:
    """Tensors of a (nested) batch moved to ``device``."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device)
    if isinstance(batch, Mapping):
        moved = {k: move_to_device(v, device) for k, v in batch.items()}
        try:
            return type(batch)(moved)
        except TypeError:
            return moved
    if isinstance(batch, (list, tuple)):
        return type(batch)(move_to_device(v, device) for v in batch)
    return batch


@contextlib.contextmanager
def _calibration_mode(model: nn.Module, params: Mapping[str, nn.Parameter]) -> Iterator[None]:
    """Eval mode, gradients for ``params`` only, RNG and every changed flag restored after."""
    everything = {id(p): p for p in [*model.parameters(), *params.values()]}
    saved = {k: (p.requires_grad, p.grad) for k, p in everything.items()}
    modes = [(m, m.training) for m in model.modules()]
    cuda = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
    py_state = random.getstate()
    np_state = _numpy_state()
    with torch.random.fork_rng(devices=cuda):
        try:
            model.eval()
            for p in everything.values():
                p.grad = None
                p.requires_grad_(False)
            for p in params.values():
                p.requires_grad_(True)
            with torch.enable_grad():
                yield
        finally:
            for key, p in everything.items():
                p.requires_grad_(saved[key][0])
                p.grad = saved[key][1]
            for module, training in modes:
                module.training = training
            random.setstate(py_state)
            if np_state is not None:
                import numpy

                numpy.random.set_state(np_state)


def _numpy_state() -> Any:
    try:
        import numpy
    except ImportError:
        return None
    return numpy.random.get_state()


def _accumulate(params: Mapping[str, nn.Parameter], loss_fn: Callable[[Any, int], torch.Tensor],
                batches: Iterable[tuple[int, Any]], progress: Any = None
                ) -> tuple[dict[str, torch.Tensor], int, int]:
    """Sums of squared gradients (float64) over ``batches`` on this rank, and the batch and sample
    counts. Each gradient is squared into its sum and freed as soon as it is accumulated."""
    sums = {name: torch.zeros_like(p, dtype=torch.float64) for name, p in params.items()}
    handles = []
    for name, p in params.items():
        def square_into(param: torch.Tensor, acc: torch.Tensor = sums[name]) -> None:
            grad = param.grad
            acc.addcmul_(grad, grad)  # float64: the square of a float32 is exact
            param.grad = None
        handles.append(p.register_post_accumulate_grad_hook(square_into))
    n_batches = n_samples = 0
    try:
        for index, batch in batches:
            loss = _checked_loss(loss_fn(batch, index))
            loss.float().backward()
            n_batches += 1
            n_samples += _batch_size(batch)
            if progress is not None:
                progress.update(1)
    finally:
        for handle in handles:
            handle.remove()
    return sums, n_batches, n_samples


def _accumulate_sharded(tensors: list[compat.PalettizedTensor],
                        loss_fn: Callable[[Any, int], torch.Tensor],
                        batches: Iterable[tuple[int, Any]], pad: Callable[[], tuple[int, Any]],
                        ctx: DistContext, progress: Any = None
                        ) -> tuple[dict[str, torch.Tensor], int, int]:
    """FSDP2: this rank's rows of each weight's sum of squared per-batch gradients (float64),
    over every rank's batches, and this rank's batch and sample counts.

    The sharded parameters never see a per-batch gradient (FSDP2 reduce-scatters the average),
    so a tensor hook on each weight as its parametrization receives it (the unsharded weight,
    one batch of this rank) squares the gradient and reduce-scatters the square, one weight at a
    time. Every rank's backward must reach the same weights (as FSDP2's own reduce-scatter
    needs); a rank out of batches runs a zero-weighted ``pad`` batch while others still have
    some, so the collectives pair up."""
    sharded = {t.name for t in tensors if sharding.is_sharded(t.original)}
    sums = {t.name: torch.zeros((t.original.to_local() if t.name in sharded else t.original).shape,
                                dtype=torch.float64, device=t.original.device) for t in tensors}
    hooked: set[int] = set()
    grad_handles: list[Any] = []

    def square_into(name: str, grad: torch.Tensor) -> None:
        squared = grad.detach().double().square()
        if name in sharded:
            sums[name] += sharding.reduce_scatter_rows(squared)
        else:  # a weight every rank holds whole (not sharded): sum the whole square
            sums[name] += ctx.all_reduce([squared])[0]

    def on_weight(name: str) -> Callable[[nn.Module, tuple[Any, ...]], None]:
        def hook(module: nn.Module, args: tuple[Any, ...]) -> None:
            weight = args[0] if args else None
            if (isinstance(weight, torch.Tensor) and weight.requires_grad
                    and torch.is_grad_enabled() and id(weight) not in hooked):
                hooked.add(id(weight))  # once per batch (a recomputed forward sees it again)
                grad_handles.append(weight.register_hook(
                    lambda grad, name=name: square_into(name, grad)))
        return hook

    handles = [t.fake.register_forward_pre_hook(on_weight(t.name)) for t in tensors]
    n_batches = n_samples = 0
    mine = iter(batches)
    try:
        while True:
            item = next(mine, None)
            (pending,) = ctx.all_reduce([torch.tensor([int(item is not None)])])
            if not int(pending.item()):
                break
            counted = item is not None
            index, batch = item if counted else pad()
            loss = _checked_loss(loss_fn(batch, index))
            (loss.float() * (1.0 if counted else 0.0)).backward()
            for handle in grad_handles:
                handle.remove()
            grad_handles.clear()
            hooked.clear()
            if counted:
                n_batches += 1
                n_samples += _batch_size(batch)
                if progress is not None:
                    progress.update(1)
    finally:
        for handle in [*handles, *grad_handles]:
            handle.remove()
    return sums, n_batches, n_samples


def _checked_loss(loss: Any) -> torch.Tensor:
    if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
        raise RuntimeError(f"palettize.calibration: the loss must be a scalar tensor, got "
                           f"{type(loss).__name__}")
    if not loss.requires_grad:
        raise RuntimeError("palettize.calibration: the loss does not depend on the "
                           "palettized weights (no gradient)")
    return loss


def _all_reduce(sums: dict[str, torch.Tensor], n_batches: int, n_samples: int,
                ctx: DistContext) -> tuple[int, int]:
    """Sum the per-rank sums and counts in place on every rank (one async all-reduce each)."""
    if not ctx.active:
        return n_batches, n_samples
    counts = torch.tensor([n_batches, n_samples], dtype=torch.float64)
    *reduced, counts = ctx.all_reduce([*sums.values(), counts])
    for key, tensor in zip(list(sums), reduced):
        sums[key] = tensor
    return int(counts[0].item()), int(counts[1].item())


def _means(sums: dict[str, torch.Tensor], n_batches: int) -> dict[str, torch.Tensor]:
    """float32 means, each float64 sum freed as its mean is made."""
    out = {}
    for name in list(sums):
        out[name] = (sums.pop(name) / max(n_batches, 1)).float()
    return out


def compute_sensitivities(
    model: nn.Module,
    loss_fn: Callable[[Any], torch.Tensor],
    batches: Iterable[Any],
    *,
    params: Mapping[str, nn.Parameter] | None = None,
    show_progress: bool = False,
    dist: DistContext | None = None,
) -> dict[str, torch.Tensor]:
    """Diagonal Fisher sensitivities: the mean over ``batches`` of ``grad(loss_fn(batch))**2``.

    Returns ``{fully qualified weight name: float32 tensor of the weight's shape}``, e.g.
    ``model.layers.0.self_attn.q_proj.weight``. ``params`` (default ``palettized_weights(model)``:
    the palettized weights of a prepared model, else every parameter of 2+ dimensions) chooses
    the weights. Under ``torch.distributed`` (``dist``, default: the default process group) the
    sums and counts are all-reduced: every rank passes its own batches and gets the identical
    result. Nothing of the model changes (see
    the module docstring). A prepared model must still be unclustered (deferred), so that its
    forward uses the dense weights.
    """
    params = dict(params) if params is not None else palettized_weights(model)
    dist = dist or DistContext.current()
    progress = _progress(None, show_progress and dist.is_main)
    with _calibration_mode(model, params), progress:
        sums, n_batches, n_samples = _accumulate(
            params, lambda batch, _: loss_fn(batch), enumerate(batches), progress)
    n_batches, _ = _all_reduce(sums, n_batches, n_samples, dist)
    if n_batches == 0:
        raise ValueError("compute_sensitivities: no batch to calibrate on")
    return _means(sums, n_batches)


def _progress(total: int | None, show: bool) -> Any:
    """A tqdm bar when ``show`` (the caller passes it on rank 0 only)."""
    from tqdm.auto import tqdm

    # tqdm reads TQDM_DISABLE itself unless ``disable`` is passed explicitly.
    kwargs = {} if show else {"disable": True}
    return tqdm(total=total, desc="palettize: calibrating", unit="batch", **kwargs)


def kmeans_weights(sensitivity: torch.Tensor, peak: float | None = None,
                   floor: float | None = None) -> torch.Tensor:
    """The weights coreai-opt's k-means gets, normalized as its ``calibration_mode`` does: divided
    by the tensor's maximum, zeros raised to the smallest non-zero value, floored at 1e-12.

    ``peak``/``floor``: the whole tensor's maximum and smallest non-zero normalized value when
    ``sensitivity`` is one shard of it (FSDP2; ``kmeans_weight_bounds``)."""
    s = sensitivity.detach().float().cpu()
    top = torch.tensor(peak if peak is not None else (s.max().item() if s.numel() else 0.0),
                       dtype=torch.float32)
    if not top > 0:
        return torch.ones_like(s)
    s = s / top
    zeros = s == 0
    if zeros.any():
        s[zeros] = s[s > 0].min() if floor is None else torch.tensor(floor, dtype=torch.float32)
    return s.clamp_(min=1e-12)


def kmeans_weight_bounds(shards: Mapping[str, torch.Tensor], ctx: DistContext
                         ) -> dict[str, tuple[float, float | None]]:
    """Per name, the ``(peak, floor)`` ``kmeans_weights`` needs for each rank's shard of a
    tensor to be normalized as the whole tensor would be (two small all-gathers)."""
    names = list(shards)
    local = [shards[n].max().item() if shards[n].numel() else 0.0 for n in names]
    peaks = [max(v) for v in zip(*ctx.all_gather_object(local))] if names else []
    floors = []
    for name, peak in zip(names, peaks):
        if not peak > 0:
            floors.append(math.inf)
            continue
        s = shards[name].detach().float().cpu() / torch.tensor(peak, dtype=torch.float32)
        floors.append(s[s > 0].min().item() if bool((s > 0).any()) else math.inf)
    floors = [min(v) for v in zip(*ctx.all_gather_object(floors))] if names else []
    return {n: (p, f if math.isfinite(f) else None) for n, p, f in zip(names, peaks, floors)}


# --------------------------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------------------------


def save_sensitivities(path: str | os.PathLike, sensitivities: Mapping[str, torch.Tensor],
                       **meta: Any) -> None:
    """Write ``{name: fp32 tensor}`` (+ ``meta``: batches, samples) atomically with torch.save."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    payload = {"format": FILE_FORMAT, "version": 1, "meta": dict(meta),
               "sensitivities": {k: v.detach().cpu().contiguous() for k, v in sensitivities.items()}}
    torch.save(payload, tmp)
    os.replace(tmp, target)


def load_sensitivities(path: str | os.PathLike, tensors: list[compat.PalettizedTensor],
                       rows: Callable[[compat.PalettizedTensor], tuple[int, int]] | None = None
                       ) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """``({weight name: fp32 tensor}, meta)`` for ``tensors`` from a file of ``save_sensitivities``
    or a plain ``{name: tensor}`` file (coreai-opt's ``<module>.parametrizations.weight.original``
    keys accepted). ``rows(t)``: only those ``[start, end)`` rows of each tensor (an FSDP2
    shard), read from a memory-mapped file.

    Raises:
        PalettizeConfigError: ``calibration.path`` unreadable, or a weight missing or mis-shaped.
    """
    key = "calibration.path"
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True, mmap=rows is not None)
    except Exception as e:
        raise PalettizeConfigError(key, f"cannot read {path} ({type(e).__name__}: "
                                   f"{str(e).splitlines()[0] if str(e) else ''}); delete it to "
                                   "recompute") from None
    meta: dict[str, Any] = {}
    if isinstance(payload, Mapping) and payload.get("format") == FILE_FORMAT:
        meta, payload = dict(payload.get("meta") or {}), payload["sensitivities"]
    if not isinstance(payload, Mapping):
        raise PalettizeConfigError(key, f"{path} holds no {{weight name: tensor}} mapping")
    out, missing = {}, []
    for t in tensors:
        value = payload.get(t.name, payload.get(t.state_prefix + "original"))
        if not isinstance(value, torch.Tensor):
            missing.append(t.name)
        elif tuple(value.shape) != tuple(t.original.shape):
            raise PalettizeConfigError(key, f"{path}: {t.name} has shape {tuple(value.shape)}, "
                                       f"the weight {tuple(t.original.shape)}; delete it to recompute")
        elif rows is not None:  # one shard: only its rows are read (memory-mapped)
            start, end = rows(t)
            out[t.name] = value[start:end].float().clone()
        else:
            out[t.name] = value.float()
    if missing:
        more = " ..." if len(missing) > 3 else ""
        raise PalettizeConfigError(key, f"{path} has no sensitivities for {len(missing)} palettized "
                                   f"weight(s) ({', '.join(missing[:3])}{more}); delete it to "
                                   "recompute")
    return out, meta
