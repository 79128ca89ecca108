"""Structure inputs without data: one sample a model's forward accepts, built from its config and
its forward's signature (no list of model classes).

Hugging Face's ``Trainer`` gives a callback the model at ``on_init_end`` but no data, and the
palettized structure must exist before the optimizer and the DDP wrap. ``model.dummy_inputs`` hold
``input_ids`` only (CLIP needs ``pixel_values`` too; ViT, Whisper, ResNet, Wav2Vec2 take no
``input_ids``). So each input the forward takes is built from the config attribute that sizes it:

- ``input_ids`` / ``decoder_input_ids`` / ``attention_mask`` / ``token_type_ids``: token ids
  below ``vocab_size`` (of the config, or of the sub-config that has one);
- ``pixel_values``: ``(1, num_channels, *image_size)`` (224 where the config has no size);
- ``input_features``: ``(1, num_mel_bins, 2 * max_source_positions)`` (a conv frontend with
  stride 2, as Whisper), else ``(1, frames, input_feat_per_channel * input_channels)``;
- ``input_values``: a waveform long enough for the conv feature encoder (``conv_kernel`` /
  ``conv_stride``), else a spectrogram ``(1, max_length, num_mel_bins)``.

Only the structure is built from these values (which modules run and consume which weights);
the export traces a real data sample (``on_train_begin``).
"""

from __future__ import annotations

import inspect
from collections.abc import Iterator, Mapping
from typing import Any

import torch
import torch.nn as nn

__all__ = ["synthetic_candidates"]

_TOKENS = 8         # text length
_FRAMES = 32        # audio frames after the feature encoder
_IMAGE = 224        # image side when the config names none


def _configs(config: Any) -> Iterator[Any]:
    """The config, then its sub-configs (``text_config``, ``vision_config``, ...)."""
    if config is None:
        return
    yield config
    for name in dir(config):
        if name.endswith("_config") and not name.startswith("_"):
            try:
                sub = getattr(config, name)
            except Exception:  # a property that needs more state
                continue
            if sub is not None and hasattr(sub, "to_dict") and sub is not config:
                yield sub


def _find(config: Any, *names: str, prefer: str = "") -> Any:
    """The first config (sub-configs whose attribute name contains ``prefer`` first) that has
    every one of ``names`` set: its values, or None."""
    found = list(_configs(config))
    if prefer:
        found.sort(key=lambda c: prefer not in type(c).__name__.lower())
    for c in found:
        values = [getattr(c, n, None) for n in names]
        if all(v is not None for v in values):
            return values[0] if len(values) == 1 else values
    return None


def _token_ids(config: Any) -> torch.Tensor | None:
    vocab = _find(config, "vocab_size", prefer="text")
    if not isinstance(vocab, int) or vocab <= 0:
        return None
    length = min(_TOKENS, int(_find(config, "max_position_embeddings", prefer="text") or _TOKENS))
    return (torch.arange(length) % max(vocab - 3, 1) + min(3, vocab - 1)).unsqueeze(0)


def _pixels(config: Any) -> torch.Tensor | None:
    size = _find(config, "image_size", prefer="vision")
    channels = _find(config, "num_channels", prefer="vision") or 3
    if size is None:
        if _find(config, "num_channels") is None:
            return None  # not an image model
        size = _IMAGE
    height, width = (size, size) if isinstance(size, int) else tuple(size)[-2:]
    return torch.randn(1, int(channels), int(height), int(width),
                       generator=torch.Generator().manual_seed(0))


def _features(config: Any) -> torch.Tensor | None:
    g = torch.Generator().manual_seed(0)
    mel = _find(config, "num_mel_bins", "max_source_positions")
    if mel is not None:
        return torch.randn(1, int(mel[0]), 2 * int(mel[1]), generator=g)
    per_channel = _find(config, "input_feat_per_channel")
    if per_channel is not None:
        channels = int(_find(config, "input_channels") or 1)
        return torch.randn(1, 4 * _FRAMES, int(per_channel) * channels, generator=g)
    return None


def _values(config: Any) -> torch.Tensor | None:
    g = torch.Generator().manual_seed(0)
    convs = _find(config, "conv_kernel", "conv_stride")
    if convs is not None:
        frames = max(_FRAMES, 2 * int(_find(config, "mask_time_length") or 1))
        length = frames
        for kernel, stride in reversed(list(zip(*convs))):
            length = (length - 1) * int(stride) + int(kernel)   # inverse of a valid conv
        return torch.randn(1, length, generator=g)
    spectrogram = _find(config, "max_length", "num_mel_bins")
    if spectrogram is not None:
        return torch.randn(1, int(spectrogram[0]), int(spectrogram[1]), generator=g)
    return None


def _decoder_ids(config: Any) -> torch.Tensor | None:
    """Decoder tokens of an encoder-decoder (Whisper, T5, BART): its forward needs them (or
    labels) whatever the encoder's input is."""
    ids = _token_ids(config)
    length = _find(config, "max_target_positions")
    return ids[:, : int(length)] if ids is not None and isinstance(length, int) else ids


_MAKERS = {"input_ids": _token_ids, "pixel_values": _pixels, "input_features": _features,
           "input_values": _values, "decoder_input_ids": _decoder_ids}


def _parameters(model: nn.Module) -> Mapping[str, inspect.Parameter]:
    try:
        return inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return {}


def _same(a: Mapping[str, Any], b: Mapping[str, Any]) -> bool:
    def shapes(m: Mapping[str, Any]) -> dict[str, Any]:
        return {k: tuple(v.shape) if isinstance(v, torch.Tensor) else v for k, v in m.items()}

    return shapes(a) == shapes(b)


def synthetic_candidates(model: nn.Module, base: Mapping[str, Any] | None = None
                         ) -> list[dict[str, Any]]:
    """Keyword inputs for ``model.forward`` built from its config, most complete first:

    1. ``base`` (a tokenizer sample, ``dummy_inputs``) plus every other input the forward takes
       that the config can size (CLIP: ``input_ids`` and ``pixel_values``);
    2. ``base`` alone, or the model's ``main_input_name`` alone;
    3. that with token inputs of shape ``(1, 2, L)`` (multiple-choice heads take choices).

    Duplicates are dropped; an empty list means the config sizes none of the inputs."""
    config = getattr(model, "config", None)
    params = _parameters(model)
    base = dict(base or {})
    made: dict[str, torch.Tensor] = {}
    for name, make in _MAKERS.items():
        if name in params and name not in base:
            value = make(config)
            if value is not None:
                made[name] = value
    if "input_ids" in made and "attention_mask" in params:
        made["attention_mask"] = torch.ones_like(made["input_ids"])
    main = getattr(model, "main_input_name", None)
    candidates = [{**base, **made}]
    if base:
        candidates.append(base)
    elif main in made:
        only = {main: made[main]}
        if main == "input_ids" and "attention_mask" in made:
            only["attention_mask"] = made["attention_mask"]
        candidates.append(only)
    token = candidates[-1].get("input_ids")
    if isinstance(token, torch.Tensor) and token.dim() == 2:  # multiple choice: (1, choices, L)
        candidates.append({k: v.unsqueeze(1).expand(-1, 2, *v.shape[1:])
                           if isinstance(v, torch.Tensor) and v.dim() == 2 else v
                           for k, v in candidates[-1].items()})
    unique: list[dict[str, Any]] = []
    for candidate in candidates:
        if candidate and not any(_same(candidate, u) for u in unique):
            unique.append(candidate)
    return unique
