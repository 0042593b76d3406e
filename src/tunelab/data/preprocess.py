"""From raw inputs (images, texts, waveforms) to model inputs: one copy of each step, used by the
training data modules and by serving alike.

One description of the preprocessing (``settings``, a data module's ``eval_settings``) is saved
beside every export and inside every served model, so ``tunelab-predict``, ``mlflow models serve``
and ``tunelab-eval`` feed a model the same tensors its test split got during training.
"""

from __future__ import annotations

import base64
import io
from math import gcd
from pathlib import Path

import numpy as np
import torch

from tunelab.data.modalities import IMAGE, TEXT, modality
from tunelab.data.table import ItemError
from tunelab.errors import TunelabError


# -- images --------------------------------------------------------------------------------------
def unreadable_image_errors() -> tuple:
    """What PIL raises for a file that is not (or no longer) an image: UnidentifiedImageError and
    "truncated" are OSErrors, a broken PNG chunk is a SyntaxError, a decompression bomb its own type."""
    from PIL import Image

    return OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError


def load_image(item):
    """An image array or file as RGB (grayscale -> 3 channels, as pretrained stems expect)."""
    from PIL import Image

    if isinstance(item, np.ndarray):
        return Image.fromarray(item).convert("RGB")
    try:
        with Image.open(item) as img:
            return img.convert("RGB")
    except unreadable_image_errors() as err:  # ItemError: one clean line even from inside a DataLoader worker
        reason = " ".join(str(err).replace(repr(str(item)), "").split()) or type(err).__name__
        raise ItemError(f"cannot read image {item}: {reason}; remove or replace the file.") from None


def decode_image(value):
    """A PIL image from a path, raw bytes or a base64 string (what a client posts to a server)."""
    from PIL import Image

    if isinstance(value, Image.Image):
        return value.convert("RGB")
    if isinstance(value, np.ndarray) or (isinstance(value, (str, Path)) and _is_file(str(value))):
        return load_image(value)
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


def image_eval_transform(size: int, mean, std, interpolation: str = "bilinear"):
    """Resize (no crop: task images are already framed), tensor, normalise: the eval transform."""
    from timm.data import create_transform

    return create_transform(input_size=(3, int(size), int(size)), mean=tuple(mean), std=tuple(std),
                            interpolation=interpolation, is_training=False, crop_pct=1.0)


# -- audio ---------------------------------------------------------------------------------------
def read_audio(path: str, rate: int) -> np.ndarray:
    """Mono float32 samples at ``rate`` Hz (polyphase resampling, which filters aliasing)."""
    import soundfile as sf

    try:
        samples, source_rate = sf.read(path, dtype="float32", always_2d=True)
    except (RuntimeError, OSError) as err:  # ItemError: one clean line even from a DataLoader worker
        raise ItemError(f"cannot read audio file {path}: {str(err).splitlines()[0]}") from None
    return resample(samples.mean(axis=1), int(source_rate), rate)


def resample(mono: np.ndarray, source_rate: int, rate: int) -> np.ndarray:
    if source_rate == rate:
        return mono
    from scipy.signal import resample_poly

    g = gcd(source_rate, int(rate))
    return resample_poly(mono, rate // g, source_rate // g).astype(np.float32)


def as_wave(item, rate: int) -> np.ndarray:
    """A served input as training reads a file: a path is read and resampled; samples (already at
    the model's rate) are mixed to mono. An empty clip is refused, as in training."""
    if isinstance(item, (str, Path)):
        return read_audio(str(item), rate)
    wave = np.asarray(item, dtype=np.float32)
    wave = wave.mean(axis=-1) if wave.ndim == 2 else wave.reshape(-1)
    if wave.size == 0:
        raise TunelabError("an audio input has no samples; send a file path or a list of samples.")
    return wave


def centre_crop(wave: np.ndarray, length: int) -> np.ndarray:
    """The centre ``length`` samples (evaluation's crop); a shorter clip stays whole."""
    extra = len(wave) - length
    return wave[extra // 2: extra // 2 + length] if extra > 0 else wave


def extract_features(extractor, waves: list, rate: int) -> dict[str, torch.Tensor]:
    """A batch of clips through the model's feature extractor, padded and masked."""
    features = extractor(list(waves), sampling_rate=rate, padding="longest", return_attention_mask=True,
                         return_tensors="pt")
    return {"input_values": features["input_values"], "attention_mask": features["attention_mask"]}


# -- text ----------------------------------------------------------------------------------------
def encode_texts(tokenizer, texts: list[str], pairs: list[str] | None, truncation: bool, max_length: int,
                 origin: str) -> dict[str, list]:
    """Token ids per text (and pair); a text longer than ``max_length`` without truncation is refused."""
    encodings = tokenizer(texts, pairs, truncation=truncation, max_length=max_length)
    longest = max((len(ids) for ids in encodings["input_ids"]), default=0)
    if longest > max_length:
        raise TunelabError(f"{origin} has {longest} tokens > data.max_length={max_length} and "
                           "data.truncation=false; enable truncation or raise max_length.")
    return dict(encodings)


def pad_tokens(tokenizer, features: list[dict], padding: str, max_length: int) -> dict[str, torch.Tensor]:
    """Encoded texts as one batch, padded to the longest (or to ``max_length``) on the tokenizer's side."""
    width = max_length if padding == "max_length" else max(len(f["input_ids"]) for f in features)
    pad_values = {"input_ids": tokenizer.pad_token_id, "attention_mask": 0, "token_type_ids": tokenizer.pad_token_type_id}
    out = {}
    for key in features[0]:
        rows = []
        for f in features:
            gap = [pad_values.get(key, 0)] * (width - len(f[key]))
            rows.append(gap + list(f[key]) if tokenizer.padding_side == "left" else list(f[key]) + gap)
        out[key] = torch.tensor(rows, dtype=torch.long)
    return out


# -- serving ---------------------------------------------------------------------------------------
def example_input(settings: dict):
    """One raw input a client could send to the served model."""
    kind = modality(settings["modality"])
    if kind is TEXT:
        return "an example review"
    if kind is IMAGE:
        from PIL import Image

        return encode_image(Image.new("RGB", (settings["size"], settings["size"]), (128, 128, 128)))
    return np.zeros(int(0.1 * settings["sampling_rate"]), dtype=np.float32).tolist()  # 0.1 s of silence


def settings_from(dm) -> dict:
    """What a model needs done to raw inputs, as plain JSON (the processor is saved separately)."""
    return {"modality": dm.modality, **dm.eval_settings()}


class Preprocessor:
    """``settings`` + the tokenizer / feature extractor (text, audio) -> a batch of model inputs,
    through the same steps the data modules take for the test split."""

    def __init__(self, settings: dict, processor=None):
        self.settings, self.processor = settings, processor
        self.kind = modality(settings["modality"])
        if self.kind is IMAGE:
            self.transform = image_eval_transform(settings["size"], settings["mean"], settings["std"],
                                                  settings.get("interpolation", "bilinear"))
        elif processor is None:
            raise TunelabError(f"{self.kind.name} preprocessing needs the model's tokenizer / feature extractor.")

    def __call__(self, items: list):
        if self.kind is IMAGE:
            return torch.stack([self.transform(decode_image(item)) for item in items])
        if self.kind is TEXT:
            return self._texts(items)
        rate = self.settings["sampling_rate"]
        length = int(round(self.settings["max_seconds"] * rate))
        return extract_features(self.processor, [centre_crop(as_wave(item, rate), length) for item in items], rate)

    def _texts(self, items: list) -> dict[str, torch.Tensor]:
        """Texts, or (text, pair) rows for a model trained on pairs (settings saved before pairs were
        recorded mean single texts, truncated, padded to the longest)."""
        s = self.settings
        pairs = [str(item[1]) for item in items] if s.get("pairs") else None
        texts = [str(item[0]) if pairs is not None else str(item) for item in items]
        encoded = encode_texts(self.processor, texts, pairs, s.get("truncation", True), s["max_length"], "an input text")
        features = [{k: v[i] for k, v in encoded.items()} for i in range(len(texts))]
        return pad_tokens(self.processor, features, s.get("padding", "longest"), s["max_length"])
