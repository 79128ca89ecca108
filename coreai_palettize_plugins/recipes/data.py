"""Recipe data: documents from local files or an HF dataset -> fixed-length token blocks, split
into a training set and a held-out tail."""

from __future__ import annotations

import json
import math
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from .checks import RecipeError
from .schema import DataSection, resolve_builtin


class TokenBlocks(torch.utils.data.Dataset):
    """Fixed-length token blocks as causal-LM samples (``labels`` = ``input_ids``)."""

    def __init__(self, blocks: torch.Tensor) -> None:
        self.blocks = blocks

    def __len__(self) -> int:
        return int(self.blocks.shape[0])

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        ids = self.blocks[index]
        return {"input_ids": ids, "labels": ids.clone()}


def read_texts(data: DataSection | Mapping[str, Any], *, local_files_only: bool = False,
               ) -> list[str]:
    """The documents of ``data``: each ``.txt`` file whole, each ``.jsonl`` record's text field,
    or each non-empty row of an HF dataset split. A mapping is validated as a ``data`` section."""
    data = DataSection.from_mapping(data)
    if data.files is None:
        return _read_hub_dataset(data, local_files_only=local_files_only)
    texts: list[str] = []
    for reference in data.files:
        path = resolve_builtin(reference)
        if path.suffix == ".txt":
            texts.append(path.read_text(encoding="utf-8"))
            continue
        for number, record in jsonl_records(path, reference):
            if not isinstance(record, Mapping) or not isinstance(record.get(data.text_field), str):
                raise RecipeError(f"recipe.data.text_field: {reference}:{number} has no "
                                  f"string field {data.text_field!r}")
            texts.append(record[data.text_field])
    return texts


def jsonl_records(path: Path, reference: str) -> Iterator[tuple[int, Any]]:
    """(line number, parsed record) for each non-empty line of a ``.jsonl`` file; invalid JSON
    is a ``RecipeError`` naming ``reference`` and the line."""
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise RecipeError(f"recipe.data.files: {reference}:{number}: invalid JSON "
                              f"({e.msg})") from None
        yield number, record


def require_datasets() -> Any:
    """The ``datasets`` module, or a one-line ``RecipeError`` saying how to install it."""
    try:
        import datasets
    except ImportError:
        raise RecipeError("recipe.data.dataset: the 'datasets' package is not installed; "
                          "pip install 'coreai-palettize-plugins[hub]' (or use data.files)") from None
    return datasets


def _read_hub_dataset(data: DataSection, *, local_files_only: bool) -> list[str]:
    datasets = require_datasets()
    download_config = datasets.DownloadConfig(local_files_only=local_files_only)
    table = datasets.load_dataset(data.dataset, data.dataset_config, split=data.split,
                                  download_config=download_config)
    if data.text_field not in table.column_names:
        raise RecipeError(f"recipe.data.text_field: {data.text_field!r} is not a column of "
                          f"{data.dataset}; valid: {', '.join(table.column_names)}")
    return [t for t in table[data.text_field] if isinstance(t, str) and t.strip()]


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


def train_and_eval_blocks(data: DataSection, tokenizer: Any, *, local_files_only: bool = False,
                          ) -> tuple[torch.Tensor, torch.Tensor]:
    """The recipe's (train, held-out) blocks; an error if no block is left for training."""
    blocks = tokenize_blocks(read_texts(data, local_files_only=local_files_only), tokenizer,
                             data.seq_len)
    train, evaluation = split_blocks(blocks, data.eval_fraction, data.max_train_blocks)
    if len(train) == 0:
        raise RecipeError(f"recipe.data: {blocks.numel()} tokens make {len(blocks)} block(s) of "
                          f"seq_len {data.seq_len}, none left for training; add text or lower "
                          "data.seq_len / data.eval_fraction")
    return train, evaluation
