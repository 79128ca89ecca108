"""Recipe model side: the tokenizer, the model (pretrained or built from its config) and the
held-out perplexity used to judge it."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from .checks import thaw
from .schema import ModelSection, _model_class_and_config, resolve_builtin


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


def build_model(model_section: ModelSection | Mapping[str, Any], tokenizer: Any, *,
                local_files_only: bool = False) -> nn.Module:
    """The recipe's model: pretrained from ``name_or_path`` or built from ``config`` (random).
    A mapping is validated as a ``model`` section."""
    section = ModelSection.from_mapping(model_section)
    dtype = getattr(torch, section.dtype)
    if section.config is not None:
        cls, config_cls = _model_class_and_config(section.config)
        fields = {k: v for k, v in thaw(section.config).items() if k != "architecture"}
        fields.setdefault("architectures", [cls.__name__])  # load_palettized(dir) reads it
        fields.setdefault("vocab_size", len(tokenizer))
        for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
            fields.setdefault(name, getattr(tokenizer, name, None))
        return cls(config_cls(**fields)).to(dtype)
    from transformers import AutoModelForCausalLM

    reference = section.name_or_path
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
