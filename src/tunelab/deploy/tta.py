"""Test-time augmentation for ``tunelab-eval`` (``tta=`` in conf/eval.yaml): every image seen as
several views, the model's softmax probabilities (classification) or its predictions
(regression) averaged over them.

The views are cut from the tensors the evaluation transform made, so each is exactly the
mirrored or cropped image, normalised like the test split:

- ``flip``: the image and its left-right mirror (2 views);
- ``crops``: the four corners and the centre of a resize to ``size / CROP_PCT``, each ``size``
  px (5 views; 64 px crops of a 73 px resize);
- ``flip_crops``: those five crops and their mirrors (10 views).

A mirror is another image for data that is not left-right symmetric: a mirrored digit is
another digit (or none), so ``flip`` can cost accuracy there (docs/after-training.md measures it).
"""

from __future__ import annotations

import math
from typing import Annotated

import torch
from torch.utils.data import DataLoader
from torchvision.transforms.v2 import functional as F

from tunelab.config.settings import choice
from tunelab.data.modalities import IMAGE
from tunelab.engine import evaluation
from tunelab.errors import TunelabError

MODES = {"flip": 2, "crops": 5, "flip_crops": 10}  # views per image
# the side of a crop over the side of the resize it is cut from: timm's default (224 of 256)
CROP_PCT = 0.875


def requested(tta: Annotated[str | None, choice(*MODES, null=True)], modality: str) -> str | None:
    """conf/eval.yaml's ``tta`` for data of ``modality``: the mode, or None (plain metrics only).
    The value is checked when the eval config is composed (deploy/evaluate.py); here, before the
    model loads, data that is not images is refused: there is nothing to flip or crop."""
    if tta is not None and modality != IMAGE.name:
        raise TunelabError(f"tta={tta}: test-time augmentation flips and crops images, and this data is {modality}; "
                           "drop tta (or tta=null) to evaluate it.")
    return tta


def views(images: torch.Tensor, mode: str, size: int) -> list[torch.Tensor]:
    """The views of a batch of images ``(B, C, H, W)``: ``mode``'s list, each ``(B, C, size, size)``."""
    if mode == "flip":
        return [images, F.horizontal_flip(images)]
    crops = F.five_crop if mode == "crops" else F.ten_crop  # ten_crop: the five crops of the mirror too
    return list(crops(images, [size, size]))


def resize_for(mode: str, size: int) -> int:
    """The side the images are resized to before ``mode`` cuts its views of side ``size``."""
    return size if mode == "flip" else math.floor(size / CROP_PCT)


class Averaged(torch.nn.Module):
    """A ``Predictor`` over ``mode``'s views of each image. Returns the log of the mean softmax
    probabilities (so the report's softmax gives the averaged probabilities back), or the mean
    regression prediction. One view at a time: memory as plain evaluation, whatever the view count."""

    def __init__(self, predictor: torch.nn.Module, mode: str, size: int):
        super().__init__()
        self.predictor, self.mode, self.size = predictor, mode, size

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        outputs = [self.predictor(view).float() for view in views(images, self.mode, self.size)]
        if self.predictor.task == "regression":
            return torch.stack(outputs).mean(0)
        if self.predictor.task == "multilabel":  # each label's mean probability, as the logit the report's sigmoid reads
            return torch.logit(torch.stack([out.sigmoid() for out in outputs]).mean(0), eps=1e-7)
        probs = torch.stack([out.softmax(-1) for out in outputs]).mean(0)
        return probs.clamp_min(torch.finfo(probs.dtype).tiny).log()  # tiny: no -inf where every view said 0


def predict(predictor: torch.nn.Module, dm, split: str, mode: str, device) -> evaluation.Outputs:
    """``split`` of image data module ``dm`` through ``predictor``, averaged over ``mode``'s views."""
    size = dm.eval_settings()["size"]
    side = resize_for(mode, size)
    dataset = dm.dataset(split) if side == size else dm.resized_dataset(split, side)
    loader = DataLoader(dataset, batch_size=dm.eval_batch_size, num_workers=dm.num_workers, collate_fn=dm.collate)
    return evaluation.predict(Averaged(predictor, mode, size), loader, device)
