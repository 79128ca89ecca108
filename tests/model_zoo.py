"""Model classes shipped in transformers, built from tiny configs (random init, no downloads), each
with a small dataset of fixed-shape samples its forward accepts through the HF ``Trainer``.

``build(family) -> Family``; ``FAMILIES`` lists them. Shapes divide into w4's 16-channel groups
where the architecture allows it, as real checkpoints do.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn as nn

VOCAB = 256


@dataclass
class Family:
    name: str
    model: nn.Module
    samples: list[dict[str, torch.Tensor]]
    output: str                      # the output compared after reload (logits, ...)
    extra: dict | None = None        # constant keywords the collator adds (CLIP's return_loss)

    def collate(self, samples: list[dict]) -> dict:
        from transformers import default_data_collator

        return {**default_data_collator(samples), **(self.extra or {})}


def _tokens(n: int, length: int, seed: int) -> torch.Tensor:
    return torch.randint(3, VOCAB, (n, length), generator=torch.Generator().manual_seed(seed))


def _causal_lm(model: nn.Module, n: int = 16, length: int = 16) -> list[dict[str, torch.Tensor]]:
    ids = _tokens(n, length, 1)
    return [{"input_ids": row, "labels": row.clone()} for row in ids]


def _seq2seq(n: int = 16) -> list[dict[str, torch.Tensor]]:
    ids, labels = _tokens(n, 12, 1), _tokens(n, 8, 2)
    return [{"input_ids": i, "attention_mask": torch.ones_like(i), "labels": label}
            for i, label in zip(ids, labels)]


def _classifier(n: int = 16) -> list[dict[str, torch.Tensor]]:
    ids = _tokens(n, 12, 1)
    return [{"input_ids": row, "attention_mask": torch.ones_like(row),
             "labels": torch.tensor(i % 2)} for i, row in enumerate(ids)]


LLM = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
           num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)


def _llama():
    import transformers as T

    return T.LlamaForCausalLM(T.LlamaConfig(**LLM))


def _qwen2_tied():
    import transformers as T

    return T.Qwen2ForCausalLM(T.Qwen2Config(**LLM, tie_word_embeddings=True))


def _phi3():
    import transformers as T

    return T.Phi3ForCausalLM(T.Phi3Config(**LLM, pad_token_id=0))


def _gemma3():
    import transformers as T

    return T.Gemma3ForCausalLM(T.Gemma3TextConfig(**LLM, head_dim=16, sliding_window=8))


def _gpt2():
    import transformers as T

    return T.GPT2LMHeadModel(T.GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=VOCAB,
                                          n_positions=64))


def _mixtral():
    import transformers as T

    return T.MixtralForCausalLM(T.MixtralConfig(**{**LLM, "intermediate_size": 64},
                                                num_local_experts=4, num_experts_per_tok=2))


def _qwen3_moe():
    import transformers as T

    config = T.Qwen3MoeConfig(**{**LLM, "intermediate_size": 64}, num_experts=4,
                              num_experts_per_tok=2, moe_intermediate_size=64, head_dim=16,
                              decoder_sparse_step=1)
    return T.Qwen3MoeForCausalLM(config)


def _t5():
    import transformers as T

    return T.T5ForConditionalGeneration(T.T5Config(
        vocab_size=VOCAB, d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=4,
        decoder_start_token_id=0, pad_token_id=0))


def _bart():
    import transformers as T

    return T.BartForConditionalGeneration(T.BartConfig(
        vocab_size=VOCAB, d_model=64, encoder_layers=2, decoder_layers=2,
        encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=128,
        decoder_ffn_dim=128, max_position_embeddings=64))


def _whisper():
    import transformers as T

    return T.WhisperForConditionalGeneration(T.WhisperConfig(
        vocab_size=VOCAB, num_mel_bins=16, d_model=64, encoder_layers=2, decoder_layers=2,
        encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=128,
        decoder_ffn_dim=128, max_source_positions=32, max_target_positions=32,
        decoder_start_token_id=1, pad_token_id=0, eos_token_id=2, bos_token_id=1))


def _vit():
    import transformers as T

    return T.ViTForImageClassification(T.ViTConfig(
        image_size=32, patch_size=8, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=128, num_labels=10))


def _bert():
    import transformers as T

    return T.BertForSequenceClassification(T.BertConfig(
        vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=128, num_labels=2, max_position_embeddings=66))


def _roberta():
    import transformers as T

    return T.RobertaForSequenceClassification(T.RobertaConfig(
        vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=128, num_labels=2, max_position_embeddings=66))


# ------------------------------------------------------------------ vision, audio, contrastive

IMAGE = dict(image_size=32, num_channels=3)
BERTISH = dict(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
               intermediate_size=128, max_position_embeddings=66)


def _resnet():
    import transformers as T

    return T.ResNetForImageClassification(T.ResNetConfig(
        embedding_size=16, hidden_sizes=[32, 64], depths=[1, 1], layer_type="basic",
        num_labels=10))


def _convnext():
    import transformers as T

    return T.ConvNextForImageClassification(T.ConvNextConfig(
        **IMAGE, patch_size=4, num_stages=2, hidden_sizes=[32, 64], depths=[1, 1], num_labels=10))


def _swin():
    import transformers as T

    return T.SwinForImageClassification(T.SwinConfig(
        **IMAGE, patch_size=4, embed_dim=32, depths=[1, 1], num_heads=[2, 4], window_size=4,
        num_labels=10))


def _deit():
    import transformers as T

    return T.DeiTForImageClassification(T.DeiTConfig(
        **IMAGE, patch_size=8, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=128, num_labels=10))


def _wav2vec2():
    import transformers as T

    return T.Wav2Vec2ForSequenceClassification(T.Wav2Vec2Config(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
        conv_dim=(32, 32), conv_stride=(5, 4), conv_kernel=(10, 8), num_conv_pos_embeddings=16,
        num_conv_pos_embedding_groups=4, classifier_proj_size=32, num_labels=4,
        mask_time_length=4))


def _hubert():
    import transformers as T

    return T.HubertForSequenceClassification(T.HubertConfig(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
        conv_dim=(32, 32), conv_stride=(5, 4), conv_kernel=(10, 8), num_conv_pos_embeddings=16,
        num_conv_pos_embedding_groups=4, classifier_proj_size=32, num_labels=4,
        mask_time_length=4))


def _ast():
    import transformers as T

    return T.ASTForAudioClassification(T.ASTConfig(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
        num_mel_bins=32, max_length=64, patch_size=16, frequency_stride=16, time_stride=16,
        num_labels=4))


def _clip():
    import transformers as T

    text = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=4, max_position_embeddings=32, bos_token_id=1,
                eos_token_id=2, pad_token_id=0)
    vision = dict(**IMAGE, patch_size=8, hidden_size=64, intermediate_size=128,
                  num_hidden_layers=2, num_attention_heads=4)
    return T.CLIPModel(T.CLIPConfig(text_config=text, vision_config=vision, projection_dim=32))


def _siglip():
    import transformers as T

    text = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=4, max_position_embeddings=32)
    vision = dict(**IMAGE, patch_size=8, hidden_size=64, intermediate_size=128,
                  num_hidden_layers=2, num_attention_heads=4)
    return T.SiglipModel(T.SiglipConfig(text_config=text, vision_config=vision))


def _distilbert_tokens():
    import transformers as T

    return T.DistilBertForTokenClassification(T.DistilBertConfig(
        vocab_size=VOCAB, dim=64, n_layers=2, n_heads=4, hidden_dim=128,
        max_position_embeddings=64, num_labels=5))


def _electra_qa():
    import transformers as T

    return T.ElectraForQuestionAnswering(T.ElectraConfig(**BERTISH, embedding_size=64))


def _roberta_choice():
    import transformers as T

    return T.RobertaForMultipleChoice(T.RobertaConfig(**BERTISH))


def _bert_mlm():
    import transformers as T

    return T.BertForMaskedLM(T.BertConfig(**BERTISH))


def _marian():
    import transformers as T

    return T.MarianMTModel(T.MarianConfig(
        vocab_size=VOCAB, d_model=64, encoder_layers=2, decoder_layers=2,
        encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=128,
        decoder_ffn_dim=128, max_position_embeddings=64, decoder_start_token_id=0,
        pad_token_id=0))


def _pixels(n: int = 16, classes: int = 10, size: int = 32) -> list[dict[str, torch.Tensor]]:
    pixels = torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(1))
    return [{"pixel_values": p, "labels": torch.tensor(i % classes)} for i, p in enumerate(pixels)]


def _waveforms(n: int = 16, length: int = 1600) -> list[dict[str, torch.Tensor]]:
    audio = torch.randn(n, length, generator=torch.Generator().manual_seed(1))
    return [{"input_values": a, "labels": torch.tensor(i % 4)} for i, a in enumerate(audio)]


def _spectrograms(n: int = 16) -> list[dict[str, torch.Tensor]]:
    frames = torch.randn(n, 64, 32, generator=torch.Generator().manual_seed(1))
    return [{"input_values": f, "labels": torch.tensor(i % 4)} for i, f in enumerate(frames)]


def _image_text(n: int = 16) -> list[dict[str, torch.Tensor]]:
    pixels = torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    return [{"input_ids": ids, "pixel_values": p} for ids, p in zip(_tokens(n, 12, 2), pixels)]


def _token_labels(n: int = 16) -> list[dict[str, torch.Tensor]]:
    ids = _tokens(n, 12, 1)
    return [{"input_ids": row, "attention_mask": torch.ones_like(row),
             "labels": row % 5} for row in ids]


def _spans(n: int = 16) -> list[dict[str, torch.Tensor]]:
    ids = _tokens(n, 12, 1)
    return [{"input_ids": row, "attention_mask": torch.ones_like(row),
             "start_positions": torch.tensor(i % 6), "end_positions": torch.tensor(i % 6 + 3)}
            for i, row in enumerate(ids)]


def _choices(n: int = 16, k: int = 3) -> list[dict[str, torch.Tensor]]:
    ids = _tokens(n * k, 12, 1).view(n, k, 12)
    return [{"input_ids": row, "attention_mask": torch.ones_like(row),
             "labels": torch.tensor(i % k)} for i, row in enumerate(ids)]


def _masked(n: int = 16) -> list[dict[str, torch.Tensor]]:
    ids = _tokens(n, 12, 1)
    labels = torch.full_like(ids, -100)
    labels[:, ::3] = ids[:, ::3]
    return [{"input_ids": i, "attention_mask": torch.ones_like(i), "labels": label}
            for i, label in zip(ids, labels)]


def _whisper_samples(n: int = 16) -> list[dict[str, torch.Tensor]]:
    features = torch.randn(n, 16, 64, generator=torch.Generator().manual_seed(1))
    return [{"input_features": f, "labels": label} for f, label in zip(features, _tokens(n, 6, 2))]


def _vit_samples(n: int = 16) -> list[dict[str, torch.Tensor]]:
    pixels = torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    return [{"pixel_values": p, "labels": torch.tensor(i % 10)} for i, p in enumerate(pixels)]


_BUILDERS: dict[str, tuple[Callable[[], nn.Module], Callable[..., list], str]] = {
    "gpt2": (_gpt2, _causal_lm, "logits"),
    "bert": (_bert, lambda m: _classifier(), "logits"),
    "roberta": (_roberta, lambda m: _classifier(), "logits"),
    "t5": (_t5, lambda m: _seq2seq(), "logits"),
    "bart": (_bart, lambda m: _seq2seq(), "logits"),
    "whisper": (_whisper, lambda m: _whisper_samples(), "logits"),
    "vit": (_vit, lambda m: _vit_samples(), "logits"),
    "llama": (_llama, _causal_lm, "logits"),
    "qwen2_tied": (_qwen2_tied, _causal_lm, "logits"),
    "phi3": (_phi3, _causal_lm, "logits"),
    "gemma3": (_gemma3, _causal_lm, "logits"),
    "mixtral": (_mixtral, _causal_lm, "logits"),
    "qwen3_moe": (_qwen3_moe, _causal_lm, "logits"),
    "resnet": (_resnet, lambda m: _pixels(), "logits"),
    "convnext": (_convnext, lambda m: _pixels(), "logits"),
    "swin": (_swin, lambda m: _pixels(), "logits"),
    "deit": (_deit, lambda m: _pixels(), "logits"),
    "wav2vec2": (_wav2vec2, lambda m: _waveforms(), "logits"),
    "hubert": (_hubert, lambda m: _waveforms(), "logits"),
    "ast": (_ast, lambda m: _spectrograms(), "logits"),
    "clip": (_clip, lambda m: _image_text(), "logits_per_image"),
    "siglip": (_siglip, lambda m: _image_text(), "logits_per_image"),
    "distilbert_tokens": (_distilbert_tokens, lambda m: _token_labels(), "logits"),
    "electra_qa": (_electra_qa, lambda m: _spans(), "start_logits"),
    "roberta_choice": (_roberta_choice, lambda m: _choices(), "logits"),
    "bert_mlm": (_bert_mlm, lambda m: _masked(), "logits"),
    "marian": (_marian, lambda m: _seq2seq(), "logits"),
}
# Constant keywords the data collator adds per family (contrastive models compute their loss
# only when asked).
_EXTRA = {"clip": {"return_loss": True}, "siglip": {"return_loss": True}}
FAMILIES = list(_BUILDERS)


def build(name: str, seed: int = 0) -> Family:
    make_model, make_samples, output = _BUILDERS[name]
    torch.manual_seed(seed)
    model = make_model()
    return Family(name, model, make_samples(model), output, _EXTRA.get(name))


def linear_like_weights(model: nn.Module) -> dict[str, tuple[int, ...]]:
    """Every weight that computes like a linear layer or a convolution: ``{name: shape}``
    (nn.Linear, convs, HF Conv1D, MultiheadAttention in_proj, fused 3-D expert parameters)."""
    from torch.nn.utils.parametrize import ParametrizationList
    from transformers.pytorch_utils import Conv1D

    kinds = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d,
             nn.ConvTranspose3d, Conv1D)
    found: dict[str, tuple[int, ...]] = {}
    for module_name, module in model.named_modules():
        prefix = f"{module_name}." if module_name else ""
        if isinstance(module, kinds):
            found[prefix + "weight"] = tuple(module.weight.shape)
        elif isinstance(module, ParametrizationList):
            continue  # the originals of a parametrized weight (weight_norm): counted as it
        elif isinstance(module, nn.MultiheadAttention) and module.in_proj_weight is not None:
            found[prefix + "in_proj_weight"] = tuple(module.in_proj_weight.shape)
        else:
            for name, p in module.named_parameters(recurse=False):
                if p.dim() == 3 and p.shape[0] > 1 and p.is_floating_point():  # experts (E, ., .)
                    found[prefix + name] = tuple(p.shape)
    return found


def palettized(model: nn.Module, name: str) -> bool:
    """Whether weight ``name`` of ``model`` is palettized (tied aliases included; a torch
    parametrization such as ``weight_norm`` alone does not count)."""
    import torch.nn.utils.parametrize as parametrize

    module_name, _, attr = name.rpartition(".")
    module = model.get_submodule(module_name)
    if not parametrize.is_parametrized(module, attr):
        return False
    return any(type(p).__module__.split(".")[0] != "torch"
               for p in module.parametrizations[attr])


class _Records(logging.Handler):
    """Collects the warnings of a logger."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.warnings: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.warnings.append(record.getMessage())


def run_family(name: str, out_dir, *, steps: int = 2, **callback_kwargs) -> dict:
    """Train ``steps`` optimizer steps with the HF Trainer and the callback's default arguments
    (plus ``callback_kwargs``) passed to ``Trainer(callbacks=...)`` and nothing else, export,
    reload with ``load_palettized``; returns the facts."""
    import time

    from transformers import Trainer, TrainingArguments, default_data_collator

    from coreai_palettize_plugins import load_palettized
    from coreai_palettize_plugins.hf import PalettizationTrainerCallback

    started = time.perf_counter()
    family = build(name)
    weights = linear_like_weights(family.model)
    all_params = {n: p.numel() for n, p in family.model.named_parameters()}  # tied: once
    callback = PalettizationTrainerCallback(**callback_kwargs)
    args = TrainingArguments(str(out_dir), max_steps=steps, per_device_train_batch_size=4,
                             learning_rate=1e-3, report_to=[], use_cpu=True, disable_tqdm=True,
                             save_strategy="no", seed=0)
    records = _Records()
    hf_log = logging.getLogger("coreai_palettize_plugins.hf")
    hf_log.addHandler(records)
    try:
        trainer = Trainer(model=family.model, args=args, train_dataset=family.samples,
                          data_collator=family.collate, callbacks=[callback])
        attached_at_init = callback.engine.attached
        trainer.train()
    finally:
        hf_log.removeHandler(records)
    model = trainer.model.eval()
    report, result = callback.report, callback.export_result
    dense = {d.name: d.reason for d in report.dense_layers}
    total = sum(torch.Size(s).numel() for s in weights.values())
    share = sum(torch.Size(s).numel() for n, s in weights.items() if palettized(model, n)) / total
    batch = {k: v for k, v in default_data_collator(family.samples[:2]).items()}
    with torch.no_grad():
        trained = getattr(model(**batch), family.output)
        loaded = load_palettized(result.directory).eval()
        reloaded = getattr(loaded(**batch), family.output)
    return {
        "family": name,
        "model": type(family.model).__name__,
        "weights": weights,
        "palettized": {n for n in weights if palettized(model, n)},
        "dense_reasons": dense,
        "palettized_share": share,
        "share_of_all_parameters": sum(n for name_, n in all_params.items()
                                       if palettized(model, name_)) / sum(all_params.values()),
        "bits_per_weight": report.bits_per_weight,
        "written": sorted(result.written),
        "errors": dict(result.errors),
        "attached_at_init": attached_at_init,
        "adapter_warnings": records.warnings,
        "log_history": list(trainer.state.log_history),
        "result": result,
        "reload_max_diff": float((trained - reloaded).abs().max()),
        "seconds": time.perf_counter() - started,
    }
