"""Speech fine-tuning: Wav2Vec2 / HuBERT adapters loaded through model.path, audio data read,
resampled and padded, and the errors a user meets (empty file, unusable sample rate)."""

from __future__ import annotations

import numpy as np
import pytest
import soundfile as sf
import torch

from tunelab.adapters.speech import speech_adapter
from tunelab.data.audio import AudioDataModule, load_audio_csv, load_audio_folder, read_audio
from tunelab.engine.build import build_parts
from tunelab.errors import TunelabError
from conftest import save_tiny_speech_model

SPEECH_GROUPS = ["feature_encoder", "feature_projection", "layer.0", "layer.1", "head"]


@pytest.mark.parametrize("fixture", ["tiny_wav2vec2", "tiny_hubert"])
def test_speech_groups_from_a_saved_checkpoint(fixture, request):
    folder = request.getfixturevalue(fixture)
    adapter = speech_adapter(num_outputs=4, path=str(folder))
    assert adapter.group_names == SPEECH_GROUPS and adapter.frozen_groups == ("feature_encoder",)
    grouped = sorted(n for g in adapter.groups for n in g.param_names)
    assert grouped == sorted(n for n, _ in adapter.model.named_parameters())
    assert all(n.startswith("backbone.feature_extractor.") for n in adapter.groups[0].param_names)
    assert adapter.data_config["sampling_rate"] == 16000
    from safetensors.torch import load_file

    saved = load_file(str(folder / "model.safetensors"))
    key = "encoder.layers.1.attention.k_proj.weight"
    assert torch.equal(dict(adapter.model.backbone.named_parameters())[key], saved[key])


def test_stable_layer_norm_joins_the_top_layer(tmp_path):
    folder = save_tiny_speech_model(tmp_path / "stable", "wav2vec2", do_stable_layer_norm=True)
    adapter = speech_adapter(num_outputs=2, path=str(folder))
    assert adapter.group_names[-2] == "layer.1+layer_norm"
    assert "backbone.encoder.layer_norm.weight" in adapter.groups[-2].param_names


def test_padding_does_not_change_a_clips_prediction(tiny_wav2vec2):
    adapter = speech_adapter(num_outputs=3, path=str(tiny_wav2vec2))
    model, fe = adapter.model.eval(), adapter.data_config["feature_extractor"]
    rng = np.random.default_rng(0)
    waves = [rng.standard_normal(8000).astype(np.float32), rng.standard_normal(5000).astype(np.float32)]
    with torch.no_grad():
        alone = model(dict(fe([waves[1]], sampling_rate=16000, return_attention_mask=True, return_tensors="pt")))
        batch = model(dict(fe(waves, sampling_rate=16000, padding=True, return_attention_mask=True, return_tensors="pt")))
    assert torch.allclose(batch[1], alone[0], atol=1e-4)


def test_audio_is_resampled_to_the_models_rate(tmp_path):
    t = np.arange(8000) / 8000
    sf.write(tmp_path / "tone.wav", np.stack([np.sin(2 * np.pi * 440 * t)] * 2, axis=1).astype(np.float32), 8000)
    wave = read_audio(str(tmp_path / "tone.wav"), 16000)
    assert wave.dtype == np.float32 and wave.ndim == 1 and len(wave) == 16000
    spectrum = np.abs(np.fft.rfft(wave))
    assert abs(np.argmax(spectrum) * 16000 / len(wave) - 440) < 2  # still a 440 Hz tone


def test_clips_are_cropped_and_batches_masked(tiny_wav2vec2, audio_folder):
    adapter = speech_adapter(num_outputs=3, path=str(tiny_wav2vec2))
    dm = AudioDataModule(lambda: load_audio_folder(str(audio_folder)), max_seconds=0.25, batch_size=4, num_workers=0).scan()
    dm.set_model_data_config(adapter.data_config)
    x, y = next(iter(dm.train_dataloader()))
    assert x["input_values"].shape == (4, 4000) and x["attention_mask"].shape == (4, 4000)
    assert y.tolist() and adapter.model(x).shape == (4, 3)


def test_audio_csv_and_folder_agree(audio_folder):
    rows = ["file,kind"] + [f"{p.relative_to(audio_folder)},{p.parent.name}" for p in sorted(audio_folder.rglob("*.wav"))]
    (audio_folder / "clips.csv").write_text("\n".join(rows) + "\n")
    folder = load_audio_folder(str(audio_folder))
    table = load_audio_csv(str(audio_folder / "clips.csv"), path_column="file", label_column="kind")
    assert table.classes == folder.classes == ["tone_0", "tone_1", "tone_2"] and table.items == folder.items


def test_empty_audio_file_is_named(tiny_wav2vec2, audio_folder):
    sf.write(audio_folder / "tone_1" / "silent.wav", np.zeros(0, dtype=np.float32), 8000)
    adapter = speech_adapter(num_outputs=3, path=str(tiny_wav2vec2))
    dm = AudioDataModule(lambda: load_audio_folder(str(audio_folder)), num_workers=0).scan()
    with pytest.raises(TunelabError, match=r"audio file .*silent.wav is empty"):
        dm.set_model_data_config(adapter.data_config)


def test_corrupt_audio_file_is_named(tiny_wav2vec2, audio_folder):
    (audio_folder / "tone_0" / "0.wav").write_bytes(b"RIFF not really audio")
    adapter = speech_adapter(num_outputs=3, path=str(tiny_wav2vec2))
    dm = AudioDataModule(lambda: load_audio_folder(str(audio_folder)), num_workers=0).scan()
    with pytest.raises(TunelabError, match=r"cannot read audio file .*0.wav"):
        dm.set_model_data_config(adapter.data_config)


def test_sample_rate_the_model_cannot_take(cfg_factory, tiny_wav2vec2, audio_folder):
    cfg = cfg_factory("model=hf_speech", f"model.path={tiny_wav2vec2}", "data=audio_folder",
                      f"data.source.root={audio_folder}", "data.resample=false")
    with pytest.raises(TunelabError, match=r"sampled at 8000 Hz but the model takes 16000 Hz and data.resample=false"):
        build_parts(cfg)


def test_a_text_model_is_not_a_speech_model(tiny_bert):
    with pytest.raises(TunelabError, match=r"holds a 'bert' model; the speech adapter takes"):
        speech_adapter(num_outputs=2, path=str(tiny_bert))


def test_spoken_digits_are_synthesised(spoken_digits):
    table = load_audio_folder(str(spoken_digits))
    assert table.classes == [f"{i}_{w}" for i, w in enumerate(
        ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"])]
    assert np.bincount(table.labels).tolist() == [4] * 10
    info = sf.info(table.items[0])
    assert info.samplerate == 22050 and 0.2 < info.duration < 2.0
    wave = read_audio(table.items[0], 16000)
    assert np.abs(wave).max() > 0.05  # speech, not silence


def test_bad_speech_settings_are_named(tiny_wav2vec2, audio_folder, tmp_path):
    with pytest.raises(TunelabError, match=r"model.frozen_groups names unknown groups \['conv'\]"):
        speech_adapter(num_outputs=2, path=str(tiny_wav2vec2), frozen_groups=["conv"])
    with pytest.raises(TunelabError, match="data.max_seconds must be > 0"):
        AudioDataModule(lambda: load_audio_folder(str(audio_folder)), max_seconds=0)
    with pytest.raises(TunelabError, match="does not exist"):
        load_audio_folder(str(tmp_path / "nowhere"))
    (tmp_path / "no_audio" / "a").mkdir(parents=True)
    with pytest.raises(TunelabError, match="no .wav/.flac/.ogg/.mp3 files in class sub-folders"):
        load_audio_folder(str(tmp_path / "no_audio"))


def test_spoken_digits_without_synthesis_or_espeak(tmp_path, monkeypatch):
    from tunelab.data import spoken_digits

    with pytest.raises(TunelabError, match="run `python scripts/make_spoken_digits.py"):
        spoken_digits.load_spoken_digits(str(tmp_path / "none"), synthesize_missing=False)
    monkeypatch.setattr(spoken_digits.shutil, "which", lambda name: None)
    with pytest.raises(TunelabError, match="espeak-ng is not installed: `sudo apt-get install espeak-ng`"):
        spoken_digits.synthesize(tmp_path / "none")
