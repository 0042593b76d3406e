"""Shifted copies of an image split: the out-of-distribution checks a data config can declare.

    ood:
      rotated: {rotate: 30}          degrees, counter-clockwise, black fill
      noised: {noise: 0.25}          Gaussian noise, std as a fraction of the 0..255 range
      blurred: {blur: 1.5}           Gaussian blur radius in pixels
      low_contrast: {contrast: 0.4}  contrast factor (1 = unchanged)
      scanned: {source: {...}}       any image source (e.g. a folder) with the same classes

Several keys in one entry apply in that order. Noise is seeded per image, so an OOD split
is the same images every time it is evaluated.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch
from PIL import Image, ImageEnhance, ImageFilter

from tunelab.errors import TunelabError

SHIFTS = ("rotate", "noise", "blur", "contrast")


def _rotate(degrees: float):
    return lambda im: im.rotate(float(degrees), resample=Image.BILINEAR, fillcolor=0)


def _noise(std: float):
    def apply(im: Image.Image) -> Image.Image:
        array = np.asarray(im).astype(np.float32)
        noise = torch.randn(array.shape).numpy() * float(std) * 255.0  # the dataset seeds torch per image
        return Image.fromarray(np.clip(array + noise, 0, 255).astype(np.uint8))
    return apply


def _blur(radius: float):
    return lambda im: im.filter(ImageFilter.GaussianBlur(float(radius)))


def _contrast(factor: float):
    return lambda im: ImageEnhance.Contrast(im).enhance(float(factor))


def image_shift(name: str, spec: dict) -> Callable[[Image.Image], Image.Image]:
    unknown = [k for k in spec if k not in SHIFTS]
    if unknown or not spec:
        raise TunelabError(f"data.ood.{name}: unknown shift {unknown or '(empty)'}; use {', '.join(SHIFTS)} "
                           "or source: {...} for images of your own.")
    steps = [{"rotate": _rotate, "noise": _noise, "blur": _blur, "contrast": _contrast}[k](v) for k, v in spec.items()]

    def apply(im: Image.Image) -> Image.Image:
        for step in steps:
            im = step(im)
        return im
    return apply
