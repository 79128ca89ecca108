"""Tiny models of several families (built from configs: no downloads) and their data, for the
tests of how the plugin calls any model (``test_inputs.py``, ``test_any_model.py``)."""

from __future__ import annotations

import torch
import torch.nn as nn

VOCAB = 256


class ItemDataset(torch.utils.data.Dataset):
    """A fixed list of samples (dicts or tuples), collated by the default collators."""

    def __init__(self, items: list) -> None:
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int):
        return self.items[index]


def _generator(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def seq2seq_data(n: int = 8, source: int = 10, target: int = 6, features: tuple | None = None
                 ) -> ItemDataset:
    """``{input_ids, attention_mask, labels}`` (or ``{input_features, labels}``) samples; labels
    end in ``-100`` padding as ``DataCollatorForSeq2Seq`` pads them."""
    g = _generator()
    items = []
    for _ in range(n):
        labels = torch.randint(3, VOCAB, (target,), generator=g)
        labels[-2:] = -100
        if features is not None:
            items.append({"input_features": torch.randn(*features, generator=g), "labels": labels})
        else:
            items.append({"input_ids": torch.randint(3, VOCAB, (source,), generator=g),
                          "attention_mask": torch.ones(source, dtype=torch.long),
                          "labels": labels})
    return ItemDataset(items)


def classification_data(n: int = 8, length: int = 10, classes: int = 2) -> ItemDataset:
    g = _generator()
    return ItemDataset([{"input_ids": torch.randint(3, VOCAB, (length,), generator=g),
                         "attention_mask": torch.ones(length, dtype=torch.long),
                         "labels": torch.tensor(i % classes)} for i in range(n)])


def image_data(n: int = 8, size: int = 16, classes: int = 4) -> ItemDataset:
    g = _generator()
    return ItemDataset([{"pixel_values": torch.randn(3, size, size, generator=g),
                         "labels": torch.tensor(i % classes)} for i in range(n)])


def hf_model(family: str) -> nn.Module:
    """A 1-2 layer, 32-64 wide transformers model of ``family`` (random init, seed 0)."""
    import transformers as T

    torch.manual_seed(0)
    if family == "t5":
        return T.T5ForConditionalGeneration(T.T5Config(
            vocab_size=VOCAB, d_model=32, d_kv=16, d_ff=64, num_layers=1, num_heads=2,
            decoder_start_token_id=0, pad_token_id=0))
    if family == "bart":
        return T.BartForConditionalGeneration(T.BartConfig(
            vocab_size=VOCAB, d_model=32, encoder_layers=1, decoder_layers=1,
            encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=64,
            decoder_ffn_dim=64, max_position_embeddings=32))
    if family == "whisper":
        return T.WhisperForConditionalGeneration(T.WhisperConfig(
            vocab_size=VOCAB, num_mel_bins=16, d_model=32, encoder_layers=1, decoder_layers=1,
            encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=64,
            decoder_ffn_dim=64, max_source_positions=16, max_target_positions=16,
            decoder_start_token_id=1, pad_token_id=0, eos_token_id=2, bos_token_id=1))
    if family in ("bert", "roberta"):
        options = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=1,
                       num_attention_heads=2, intermediate_size=64, num_labels=2,
                       max_position_embeddings=34)
        if family == "bert":
            return T.BertForSequenceClassification(T.BertConfig(**options))
        return T.RobertaForSequenceClassification(T.RobertaConfig(**options))
    if family == "vit":
        return T.ViTForImageClassification(T.ViTConfig(
            image_size=16, patch_size=4, hidden_size=32, num_hidden_layers=1,
            num_attention_heads=2, intermediate_size=64, num_labels=4))
    raise KeyError(family)


def hf_data(family: str) -> ItemDataset:
    if family in ("t5", "bart"):
        return seq2seq_data()
    if family == "whisper":
        return seq2seq_data(features=(16, 32))   # (mel bins, 2 * max_source_positions)
    if family in ("bert", "roberta"):
        return classification_data()
    if family == "vit":
        return image_data()
    raise KeyError(family)


# ------------------------------------------------------------------------------------- Lightning


def lightning_demo(vocab: int = 64):
    """Lightning's own demo ``LightningTransformer`` (``forward(inputs, target)``), with a small
    demo ``Transformer`` inside and no WikiText2 download."""
    from lightning.pytorch.demos.transformer import LightningTransformer, Transformer

    class TinyDemo(LightningTransformer):
        def __init__(self) -> None:
            super().__init__(vocab_size=vocab)
            self.model = Transformer(vocab_size=vocab, ninp=32, nhead=2, nhid=32, nlayers=1)

        def prepare_data(self) -> None:  # the demo downloads WikiText2 here
            pass

    torch.manual_seed(0)
    return TinyDemo()


def token_pairs(n: int = 8, length: int = 12, vocab: int = 64) -> ItemDataset:
    """``(inputs, target)`` tuples, as the demo's WikiText2 yields them."""
    tokens = torch.randint(0, vocab, (n, length + 1), generator=_generator())
    return ItemDataset([(row[:-1], row[1:]) for row in tokens])


def keyword_only_module():
    """A LightningModule with dict batches and a keyword-only ``forward(*, features, scale)``."""
    import lightning.pytorch as pl

    class KeywordOnly(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.encoder = nn.Linear(16, 32)
            self.head = nn.Linear(32, 16)

        def forward(self, *, features: torch.Tensor, scale: float | None = None) -> torch.Tensor:
            out = self.head(torch.relu(self.encoder(features)))
            return out if scale is None else out * scale

        def training_step(self, batch, batch_idx):
            return nn.functional.mse_loss(self(features=batch["features"]), batch["target"])

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.01)

    torch.manual_seed(0)
    return KeywordOnly()


def feature_dicts(n: int = 8) -> ItemDataset:
    g = _generator()
    return ItemDataset([{"features": torch.randn(16, generator=g),
                         "target": torch.randn(16, generator=g)} for _ in range(n)])


def forwardless_module(network: nn.Module | None = None, classes: int = 16):
    """A LightningModule without ``forward``: ``training_step`` calls ``self.model(x)`` (a tiny
    transformers ConvNeXt by default; torchvision has no CPU build for torch 2.13 here), as many
    Lightning projects do."""
    import lightning.pytorch as pl

    class NoForward(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.model = convnext(classes) if network is None else network
            self.loss = nn.CrossEntropyLoss()

        def training_step(self, batch, batch_idx):
            x, y = batch
            out = self.model(x)
            return self.loss(getattr(out, "logits", out), y)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.01)

    torch.manual_seed(0)
    return NoForward()


def convnext(classes: int = 16) -> nn.Module:
    import transformers as T

    torch.manual_seed(0)
    return T.ConvNextForImageClassification(T.ConvNextConfig(
        image_size=32, num_channels=3, patch_size=4, num_stages=2, hidden_sizes=[32, 64],
        depths=[1, 1], num_labels=classes))


def image_pairs(n: int = 8, size: int = 32, classes: int = 16) -> ItemDataset:
    """``(image, label)`` tuples, as torchvision datasets yield them."""
    g = _generator()
    return ItemDataset([(torch.randn(3, size, size, generator=g), i % classes) for i in range(n)])
