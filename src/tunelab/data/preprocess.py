"""From raw inputs (images, texts, waveforms) to model inputs, exactly as evaluation does it.

One description of the preprocessing (``settings``) is saved beside every export and inside
every served model, so ``tunelab-predict``, ``mlflow models serve`` and ``tunelab-eval`` feed a
model the same tensors its test split got during training.
"""

from __future__ import annotations

import base64
import io
from pathlib import Path

import numpy as np
import torch

from tunelab.errors import TunelabError


def image_eval_transform(size: int, mean, std, interpolation: str = "bilinear"):
    """Resize (no crop: task images are already framed), tensor, normalise: the eval transform."""
    from timm.data import create_transform

    return create_transform(input_size=(3, int(size), int(size)), mean=tuple(mean), std=tuple(std),
                            interpolation=interpolation, is_training=False, crop_pct=1.0)


def settings_from(dm, adapter) -> dict:
    """What a model needs done to raw inputs, as plain JSON (the tokenizer is saved separately)."""
    if adapter.modality == "image":
        return {"modality": "image", **dm.eval_settings()}
    config = adapter.data_config
    if adapter.modality == "text":
        return {"modality": "text", "max_length": int(dm.max_length)}
    return {"modality": "audio", "sampling_rate": int(config["sampling_rate"]), "max_seconds": float(dm.max_seconds)}


def decode_image(value):
    """A PIL image from a path, raw bytes or a base64 string (what a client posts to a server)."""
    from PIL import Image

    if isinstance(value, Image.Image):
        return value.convert("RGB")
    if isinstance(value, str) and _is_file(value):
        return Image.open(value).convert("RGB")
    try:
        raw = value if isinstance(value, (bytes, bytearray)) else base64.b64decode(value, validate=True)
        return Image.open(io.BytesIO(raw)).convert("RGB")
    except Exception as err:  # noqa: BLE001 - anything undecodable gets one clear message
        raise TunelabError(f"cannot read an image from the input ({type(err).__name__}); send a file path, "
                           "image bytes or base64-encoded image bytes.") from None


def _is_file(text: str) -> bool:
    try:
        return Path(text).is_file()
    except OSError:  # a base64 string is longer than any file name
        return False


def encode_image(image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


class Preprocessor:
    """``settings`` + the tokenizer / feature extractor (text, audio) -> a batch of model inputs."""

    def __init__(self, settings: dict, processor=None):
        self.settings, self.processor = settings, processor
        self.modality = settings["modality"]
        if self.modality == "image":
            self.transform = image_eval_transform(settings["size"], settings["mean"], settings["std"],
                                                  settings.get("interpolation", "bilinear"))
        elif processor is None:
            raise TunelabError(f"{self.modality} preprocessing needs the model's tokenizer / feature extractor.")

    def __call__(self, items: list):
        if self.modality == "image":
            return torch.stack([self.transform(decode_image(item)) for item in items])
        if self.modality == "text":
            return dict(self.processor([str(t) for t in items], padding=True, truncation=True,
                                       max_length=self.settings["max_length"], return_tensors="pt"))
        rate = self.settings["sampling_rate"]
        length = int(round(self.settings["max_seconds"] * rate))
        waves = [_centre(self._wave(item, rate), length) for item in items]
        features = self.processor(waves, sampling_rate=rate, padding="longest", return_attention_mask=True,
                                  return_tensors="pt")
        return {"input_values": features["input_values"], "attention_mask": features["attention_mask"]}

    @staticmethod
    def _wave(item, rate: int) -> np.ndarray:
        if isinstance(item, (str, Path)):
            from tunelab.data.audio import read_audio

            return read_audio(str(item), rate)
        return np.asarray(item, dtype=np.float32)


def _centre(wave: np.ndarray, length: int) -> np.ndarray:
    """The centre ``length`` samples, as the eval split crops them."""
    extra = len(wave) - length
    return wave[extra // 2: extra // 2 + length] if extra > 0 else wave
