"""Audio data: a folder per class of audio files, or a table of paths and labels, read with
``soundfile``, mixed to mono, resampled to the model's rate and cropped to ``max_seconds``;
the model's feature extractor normalises and pads each batch."""

from __future__ import annotations

from typing import Annotated, Callable, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from tunelab.config.settings import BOOL, POSITIVE, checked
from tunelab.data.datamodule import TaskDataModule
from tunelab.data.modalities import AUDIO_SUFFIXES
from tunelab.data.multilabel import collate_labels, label_at
from tunelab.data.preprocess import centre_crop, extract_features, read_audio
from tunelab.data.folders import MAX_ENTRIES, scan_class_folders
from tunelab.data.sampling import sample_seed
from tunelab.data.table import Table, load_path_table
from tunelab.errors import TunelabError

AUDIO_EXTENSIONS = AUDIO_SUFFIXES


def load_audio_folder(root: str, extensions: Sequence[str] = AUDIO_EXTENSIONS, max_entries: int = MAX_ENTRIES) -> Table:
    """One sub-folder per class of audio files (class names sorted), read as image folders are
    (data/folders.py)."""
    found = scan_class_folders(root, extensions, max_entries)
    return Table(found.paths, found.labels, found.classes, str(found.root))


# A table of audio paths and labels: the same table reader image_csv uses (data/table.py).
load_audio_csv = load_path_table


def check_audio_file(path: str, rate: int, resample: bool) -> None:
    """Fail before training on a file that cannot become model input."""
    import soundfile as sf

    try:
        info = sf.info(path)
    except (RuntimeError, OSError) as err:  # soundfile raises LibsndfileError (a RuntimeError)
        raise TunelabError(f"cannot read audio file {path}: {str(err).splitlines()[0]}") from None
    if info.frames == 0:
        raise TunelabError(f"audio file {path} is empty (0 samples); remove it or re-record it.")
    if info.samplerate != rate and not resample:
        raise TunelabError(f"audio file {path} is sampled at {info.samplerate} Hz but the model takes {rate} Hz "
                           "and data.resample=false; set data.resample=true or convert the files.")


class _Clips(Dataset):
    """Waveforms cropped to ``length`` samples: a random (seeded) window when training, the
    centre otherwise. Shorter clips stay short; the batch pads them and masks the padding."""

    def __init__(self, table: Table, indices: np.ndarray, rate: int, length: int, random_crop: bool, seed: int):
        self.table, self.indices, self.rate, self.length = table, indices, rate, length
        self.random_crop, self.seed = random_crop, seed

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, key):
        epoch, i = key if isinstance(key, tuple) else (None, key)
        j = int(self.indices[i])
        wave = read_audio(self.table.items[j], self.rate)
        extra = len(wave) - self.length
        if extra > 0 and self.random_crop and epoch is not None:
            start = int(np.random.default_rng(sample_seed(self.seed, epoch, j)).integers(0, extra + 1))
            return wave[start: start + self.length], label_at(self.table.labels, j)
        return centre_crop(wave, self.length), label_at(self.table.labels, j)  # what serving crops too


class AudioDataModule(TaskDataModule):
    """Audio clips for Wav2Vec2 / HuBERT-style models (raw waveforms in, the model's rate)."""

    modality = "audio"

    @checked("data")
    def __init__(self, source: Callable[[], Table], name: str = "audio", max_seconds: Annotated[float, POSITIVE] = 2.0,
                 resample: Annotated[bool, BOOL] = True, random_crop: Annotated[bool, BOOL] = True, **kwargs):
        super().__init__(source, name=name, **kwargs)
        self.max_seconds, self.resample, self.random_crop = max_seconds, resample, random_crop

    def set_model_data_config(self, data_config: dict) -> None:
        """Check every file against the model's sample rate before any training."""
        super().set_model_data_config(data_config)
        if "feature_extractor" not in data_config:
            return  # not an audio model: build_parts reports the mismatch
        self.scan()
        rate = self.sampling_rate
        for name, (table, idx) in self.splits.items():
            for i in idx:
                check_audio_file(table.items[int(i)], rate, self.resample)

    @property
    def sampling_rate(self) -> int:
        if "sampling_rate" not in self.model_data_config:
            raise TunelabError("audio data needs a speech model's feature extractor (model=wav2vec2_tiny).")
        return int(self.model_data_config["sampling_rate"])

    def dataset(self, split: str, training: bool = False) -> Dataset:
        self.scan()
        table, idx = self.splits[split]
        length = int(round(self.max_seconds * self.sampling_rate))
        return _Clips(table, idx, self.sampling_rate, length, self.random_crop and training, self.seed)

    def collate(self, batch: list) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        waves, labels = zip(*batch)
        features = extract_features(self.model_data_config["feature_extractor"], waves, self.sampling_rate)
        return features, collate_labels(labels)

    def eval_settings(self) -> dict:
        return {"sampling_rate": self.sampling_rate, "max_seconds": float(self.max_seconds)}
