"""The kinds of input tunelab trains on (image, text, audio), each described once.

Training, evaluation, export, ``tunelab-predict``, the served MLflow model and monitoring ask a
``Modality`` instead of testing a name: which files hold it, which entry of the model's data
config preprocesses it, how an exported folder loads that processor back. How raw inputs become
tensors lives in ``data/preprocess.py``, shared by the training data modules and serving.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from tunelab.errors import TunelabError

# Every suffix here opens with the reader its modality uses (PIL; soundfile's libsndfile >= 1.1 for
# .mp3), tested in tests/data/test_data.py. A GIF is read as its first frame.
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp", ".gif")
AUDIO_SUFFIXES = (".wav", ".flac", ".ogg", ".mp3")
PAIR_COLUMN = "text_pair"  # the second text of a model trained on text pairs, as served and predicted


@dataclass(frozen=True)
class Modality:
    name: str  # Adapter.modality and TaskDataModule.modality; the served model's input column
    suffixes: tuple[str, ...]  # the files a folder holds ((): text comes in tables)
    processor_key: str | None  # the model's data_config entry that preprocesses raw inputs
    processor_class: str | None  # the transformers Auto class that loads it back from an export
    csv_column: str  # the column tunelab-predict reads from a CSV by default
    example_model: str  # a shipped model choice that takes this input, for error messages

    @property
    def variable_length(self) -> bool:
        """Batches are dicts of (batch, length) tensors (text, audio), not one image tensor."""
        return self.processor_key is not None

    def processor(self, data_config: dict):
        """The tokenizer / feature extractor a model's data config holds (None for images)."""
        return data_config.get(self.processor_key) if self.processor_key else None

    def load_processor(self, folder: Path):
        """The processor an export saved, loaded without running code shipped with it."""
        if not self.processor_class:
            return None
        import transformers

        loader = getattr(transformers, self.processor_class)
        try:  # False, not transformers' default: that asks at a terminal whether to run the folder's code
            return loader.from_pretrained(folder, trust_remote_code=False)
        except ValueError as err:  # an auto_map naming Python in the folder, or no processor at all
            raise TunelabError(f"cannot read the preprocessing in {folder} ({' '.join(str(err).split())[:300]}); "
                               "tunelab never runs code shipped with a model (trust_remote_code).") from None

    def files_under(self, folder: Path) -> list[str]:
        """The files of this modality under ``folder``, sorted."""
        if not self.suffixes:
            raise TunelabError(f"a {self.name} model labels a CSV with a {self.csv_column} column, not a folder.")
        files = sorted(str(p) for p in Path(folder).rglob("*") if p.suffix.lower() in self.suffixes)
        if not files:
            raise TunelabError(f"no {self.name} files ({', '.join(self.suffixes)}) under {folder}.")
        return files


IMAGE = Modality("image", IMAGE_SUFFIXES, None, None, "path", "model=efficientnet_lite0")
TEXT = Modality("text", (), "tokenizer", "AutoTokenizer", "text", "model=minilm")
AUDIO = Modality("audio", AUDIO_SUFFIXES, "feature_extractor", "AutoFeatureExtractor", "path", "model=wav2vec2_tiny")
MODALITIES = {m.name: m for m in (IMAGE, TEXT, AUDIO)}


def modality(name: str) -> Modality:
    if name not in MODALITIES:
        raise TunelabError(f"unknown input modality {name!r}; tunelab knows {', '.join(MODALITIES)}.")
    return MODALITIES[name]


def modality_of(meta: dict) -> Modality:
    """The modality a trained model's description (export, checkpoint, served model) records."""
    return modality(meta["preprocess"]["modality"])
