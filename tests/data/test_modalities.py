"""One modality registry: what training reads, serving reads, and the same tensors from both.

Serving (``Preprocessor``: tunelab-predict, the MLflow pyfunc model, tunelab-monitor) must feed a
model exactly what the test split fed it during training, for every modality and every setting
that changes the inputs (text pairs, fixed padding, no truncation, audio crops).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import write_text_csv

from tunelab.data.modalities import AUDIO, IMAGE, MODALITIES, modality
from tunelab.data.preprocess import Preprocessor, settings_from
from tunelab.errors import TunelabError


def test_every_suffix_opens_with_its_reader(tmp_path):
    """The suffixes folder sources and tunelab-predict accept are exactly what PIL and soundfile read."""
    import soundfile as sf
    from PIL import Image

    from tunelab.data.preprocess import load_image, read_audio

    for suffix in IMAGE.suffixes:
        path = tmp_path / f"a{suffix}"
        Image.new("L" if suffix in (".pgm",) else "RGB", (8, 6), 90).save(path)
        assert load_image(str(path)).size == (8, 6), suffix
    for suffix in AUDIO.suffixes:
        path = tmp_path / f"a{suffix}"
        sf.write(path, np.sin(np.arange(1600) / 5).astype(np.float32), 16000)
        assert abs(len(read_audio(str(path), 16000)) - 1600) < 1200, suffix  # mp3 pads its frames


def test_the_sources_and_predict_use_the_registry_suffixes(tmp_path):
    from tunelab.deploy.exported import read_inputs
    from tunelab.data.audio import AUDIO_EXTENSIONS
    from tunelab.data.sources import IMAGE_EXTENSIONS

    assert IMAGE_EXTENSIONS is IMAGE.suffixes and AUDIO_EXTENSIONS is AUDIO.suffixes
    for suffix in (*IMAGE.suffixes, ".txt"):
        (tmp_path / f"x{suffix}").write_bytes(b"")
    found = read_inputs(tmp_path, {"modality": "image"}, None)
    assert sorted(Path(f).suffix for f in found) == sorted(IMAGE.suffixes)
    with pytest.raises(TunelabError, match="text model labels a CSV"):
        read_inputs(tmp_path, {"modality": "text"}, None)


def test_every_data_module_names_a_known_modality():
    from tunelab.data.datamodule import TaskDataModule

    def subclasses(cls):
        return [c for sub in cls.__subclasses__() for c in (sub, *subclasses(sub))]

    from tunelab.data.audio import AudioDataModule
    from tunelab.data.images import ImageDataModule
    from tunelab.data.text import TextDataModule

    assert {ImageDataModule, TextDataModule, AudioDataModule} <= set(subclasses(TaskDataModule))
    kinds = {c.modality for c in subclasses(TaskDataModule)}
    assert kinds == set(MODALITIES), kinds
    with pytest.raises(TunelabError, match="tunelab knows image, text, audio"):
        modality("video")
    # every shipped model choice is built by tests/config/test_configs.py, which checks its adapter's modality here too


@pytest.mark.parametrize("settings", [
    {"max_length": 64},
    {"max_length": 12, "padding": "max_length"},
    {"max_length": 64, "pair": True},
])
def test_served_text_is_tokenised_like_the_test_split(tiny_bert, tmp_path, settings):
    from tunelab.adapters.text import text_adapter
    from tunelab.data.text import TextDataModule, load_text_table

    csv = write_text_csv(tmp_path / "texts.csv")
    pair = settings.pop("pair", False)
    adapter = text_adapter(num_outputs=3, path=str(tiny_bert))
    source = (lambda: load_text_table(str(csv), text_pair_column="other")) if pair else (lambda: load_text_table(str(csv)))
    dm = TextDataModule(source, num_workers=0, **settings).scan()
    dm.set_model_data_config(adapter.data_config)
    table, idx = dm.splits["test"]
    raw = [(table.items[i], table.pairs[i]) if pair else table.items[i] for i in idx[:6]]
    served = Preprocessor(settings_from(dm), adapter.data_config["tokenizer"])(raw)
    trained = dm.first_inputs("test", 6)
    assert served.keys() == trained.keys()
    for key in trained:
        assert torch.equal(served[key], trained[key]), key
    assert settings_from(dm)["pairs"] is pair


def test_served_audio_is_cropped_and_extracted_like_the_test_split(tiny_wav2vec2, audio_folder):
    from tunelab.adapters.speech import speech_adapter
    from tunelab.data.audio import AudioDataModule, load_audio_folder
    from tunelab.data.preprocess import read_audio

    adapter = speech_adapter(num_outputs=3, path=str(tiny_wav2vec2))
    dm = AudioDataModule(lambda: load_audio_folder(str(audio_folder)), max_seconds=0.25, num_workers=0).scan()
    dm.set_model_data_config(adapter.data_config)
    table, idx = dm.splits["test"]
    files = [table.items[i] for i in idx[:4]]
    preprocess = Preprocessor(settings_from(dm), adapter.data_config["feature_extractor"])
    trained = dm.first_inputs("test", 4)
    from_files = preprocess(files)
    from_samples = preprocess([read_audio(f, dm.sampling_rate).tolist() for f in files])  # what a client posts
    for served in (from_files, from_samples):
        for key in trained:
            assert torch.allclose(served[key].float(), trained[key].float()), key
    stereo = np.stack([np.asarray(read_audio(files[0], dm.sampling_rate))] * 2, axis=1)  # (samples, channels)
    assert torch.allclose(preprocess([stereo])["input_values"], trained["input_values"][:1])
    with pytest.raises(TunelabError, match="has no samples"):
        preprocess([[]])
